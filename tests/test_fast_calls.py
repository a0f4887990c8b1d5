"""Scripted calls on a virtual clock: the real `CallSession` against in-process fakes of
its providers, store, call control and media transport (`tests/fakes.py`).

Each scenario is a timeline of seconds, as in the real-time wire tests
(`tests/test_live_call.py`, the backbone), but the event loop is looptime's: its clock
jumps to the next timer whenever every task waits, so a 25 s call takes about 0.2 s of
CPU, and every time it records is exact and the same on every run. The session reads
that clock (through `fakes.TickingClock`), and so do the fakes. Each scenario makes its
own looptime loop; looptime's pytest plugin stays off (`-p no:looptime` in pyproject).

Run the fast lane alone: `pytest -m fast tests/test_text.py tests/test_fast_calls.py`
(`pytest -m fast` alone finds the same tests, after importing the whole suite).

The VAD: the real `VADStream` and `VADBatcher` run, with an energy threshold in place of
the Silero network (`fakes.EnergyModel`), inline rather than on the model's thread.
- Silero on espeak-made clips reacts 0-3 windows late depending on the onset's phase
  and the phoneme (pipeline/vad.py): timings would carry that spread, and a scenario
  wants to assert the session's own timings to the window.
- Offloaded inference finishes in real time on a thread while the loop's clock is
  virtual: looptime would have to step the clock while it waits, and a scenario's times
  would depend on the machine's load.
- Silero on real speech is covered by tests/test_vad.py and by the wire tests; what is
  tested here is what the session does with the VAD's events.
The caller's speech is therefore a full-scale square wave and its silence mu-law zero;
what it "says" is the scripted STT's business (`fakes.ScriptedSTT`).

Must not import the app around the pipeline (`main`, `api/`, `store/`, `adapters/`,
`runtime/`), nor patch any of our modules: the session runs as it is, on its contracts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import looptime
import pytest

from pipeline.contracts import AgentConfig, PipelineDeps, ToolOutcome
from pipeline.metrics import PipelineMetrics
from pipeline.playout import RESUME_BACKUP_S
from pipeline.providers import ToolCall
from pipeline.silero import VADBatcher
from tests.fakes import (
    Caller,
    CharTTS,
    EnergyModel,
    MemoryStore,
    Phone,
    PhoneTransport,
    RecordingControl,
    Reply,
    ScriptedLLM,
    ScriptedSTT,
    ScriptedTools,
    TickingClock,
    ToolScript,
    Utterance,
)
from utils import SAMPLE_RATE
from voice_pipeline import REPROMPT_LINE, SILENCE_GOODBYE, WATCHDOG_S, CallManager

pytestmark = pytest.mark.fast

T = TypeVar("T")

VIRTUAL_LIMIT_S = 600.0
"""A scenario that has not ended by this virtual time fails (looptime's end of time)."""

GREETING = "Hi, this is Acme. How can I help?"
BACKCHANNELS = ["uh-huh", "uh huh", "mm-hmm", "yeah", "right", "okay"]


def run_virtual(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run `scenario` on a fresh looptime loop whose clock starts at 0; fail if it leaves a
    task running."""

    async def main() -> T:
        result = await scenario()
        current = asyncio.current_task()
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        assert not leaked, f"the call left tasks running: {leaked}"
        return result

    with asyncio.Runner(
        loop_factory=lambda: looptime.new_event_loop(start=0.0, end=VIRTUAL_LIMIT_S, noop_cycles=0)
    ) as runner:
        return runner.run(main())


@dataclass
class FastCall:
    """One scripted call: its fakes, and what they recorded once it has run."""

    replies: list[Reply] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    hangup_at: float | None = None
    tools: dict[str, ToolScript] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = AgentConfig(
            call_id="call-1",
            agent_id="agent-1",
            system_prompt="You are Acme's assistant.",
            first_message=GREETING,
            backchannel_phrases=BACKCHANNELS,
            **self.agent,
        )
        self.caller = Caller(self.utterances)
        self.stt = ScriptedSTT(self.caller)
        self.llm = ScriptedLLM(self.replies)
        self.tts = CharTTS()
        self.store = MemoryStore(self.config)
        self.control = RecordingControl()
        self.tool_runner = ScriptedTools(self.tools) if self.tools else None
        self.metrics = PipelineMetrics()
        self.phone = Phone(self.caller)
        self.vad_models: list[EnergyModel] = []
        self.ended_at: float | None = None

    def _batcher(self) -> VADBatcher:
        model = EnergyModel()
        self.vad_models.append(model)
        return VADBatcher(model, offload=False, max_wait_ms=0)

    def run(self) -> str | None:
        async def call() -> str | None:
            loop = asyncio.get_running_loop()
            deps = PipelineDeps(
                stt=self.stt,
                llm=self.llm,
                tts=self.tts,
                store=self.store,
                control=self.control,
                metrics=self.metrics,
                vad_batcher=self._batcher,
                tools=self.tool_runner,
                clock=TickingClock(loop),
            )
            transport = PhoneTransport(
                self.phone, call_id=self.config.call_id, hangup_at=self.hangup_at
            )
            self.transport = transport
            await CallManager(deps).handle(transport)
            self.ended_at = loop.time()
            return self.store.ended_reason

        return run_virtual(call)

    def speech_seconds(self, text: str) -> float:
        return self.tts.seconds_of(text)

    def audio_seconds(self, texts: Iterable[str]) -> float:
        """Seconds of audio the fake TTS made for these texts (a speech's chunks)."""
        return sum(self.tts.seconds_of(text) for text in texts)

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def audio_clock(utterance: Utterance) -> float:
    """When the caller started saying it, on the loop's clock: the stream starts at 0."""
    assert utterance.audio_start is not None
    return utterance.audio_start


# --- barge-in -----------------------------------------------------------------------------

ANSWER = (
    "The pro plan costs forty nine dollars a month per seat. It adds call recording, CRM "
    "sync and priority support, and most teams start with the free trial."
)


def test_barge_in_stops_the_agent_and_the_turn_keeps_only_what_was_heard() -> None:
    question = Utterance(at=2.5, text="What does the pro plan cost?", seconds=1.5)
    interruption = Utterance(at=7.0, text="Wait, do you have discounts?", seconds=1.2)
    call = FastCall(
        replies=[Reply(ANSWER), Reply("Yes, twenty percent off yearly plans.")],
        utterances=[question, interruption],
        hangup_at=14.0,
    )
    assert call.run() == "customer-ended-call"

    # the agent went quiet once the VAD had heard 60 ms of speech (two 32 ms windows, the
    # first full one after the onset, and the frame that completes them), and stayed quiet
    onset = audio_clock(interruption)
    clear = next(t for t in call.phone.clears if t > onset)
    assert 0.064 <= clear - onset <= 0.064 + 0.032 + 0.02
    answer_played = call.phone.heard_between(onset - 5, clear)
    assert call.phone.heard_between(clear, clear + 1.3) == 0.0  # nothing until the reply

    # the interrupted turn is what the caller heard: whole words, a prefix of the answer
    role, heard = call.store.said()[2]
    assert role == "assistant" and call.store.turns[2]["interrupted"] is True
    assert len(heard) < len(ANSWER) and ANSWER.startswith(heard) and ANSWER[len(heard)] == " "
    played_chars = answer_played * SAMPLE_RATE / call.tts.bytes_per_char
    assert played_chars - 8 <= len(heard) <= played_chars + 1  # at most a word short

    # the next answer's prompt carries exactly that, then the caller's new turn
    assert call.store.said()[3] == ("user", interruption.text)
    second = call.llm.requests[1].messages
    assert second[-2:] == [
        {"role": "assistant", "content": heard},
        {"role": "user", "content": interruption.text},
    ]
    assert call.store.said()[4] == ("assistant", "Yes, twenty percent off yearly plans.")
    assert call.counter("aisdr_barge_ins_total", outcome="interrupted") == 1
    assert "barge_in" in call.store.event_types()
    assert call.vad_models[0].batches > 0  # the VAD's windows went through the batcher


# --- backchannel --------------------------------------------------------------------------


def test_a_backchannel_pauses_the_answer_which_then_resumes_uninterrupted() -> None:
    question = Utterance(at=2.5, text="What does the pro plan cost?", seconds=1.5)
    backchannel = Utterance(at=7.0, text="uh-huh", seconds=0.4)
    call = FastCall(replies=[Reply(ANSWER)], utterances=[question, backchannel], hangup_at=20.0)
    assert call.run() == "customer-ended-call"

    onset = audio_clock(backchannel)
    clear = next(t for t in call.phone.clears if t > onset)
    # paused as fast as for a real interruption: the VAD cannot tell "uh-huh" from "stop"
    assert 0.064 <= clear - onset <= 0.064 + 0.032 + 0.02
    resumed = next(p.start for p in call.phone.played if p.start > clear)
    # resumed once the transcript said "uh-huh" and 300 ms of silence ended the utterance
    # (end_of_speech_ms), at the next whole VAD window and frame
    said = backchannel.seconds + 0.3
    assert said <= resumed - onset <= said + 0.032 + 0.02

    # one answer, whole and not interrupted; "uh-huh" is not a turn
    assert call.store.said() == [
        ("assistant", GREETING),
        ("user", question.text),
        ("assistant", ANSWER),
    ]
    assert call.store.turns[2]["interrupted"] is False
    assert len(call.llm.requests) == 1
    # all of it was played once, plus what the caller heard last before the pause again:
    # RESUME_BACKUP_S, and the playout lag the marks taught (under 0.1 s here)
    answer_audio = call.audio_seconds(text for t, text in call.tts.requests if t > 4.0)
    repeated = call.phone.heard_between(question.at, call.ended_at or 0.0) - answer_audio
    assert RESUME_BACKUP_S <= repeated <= RESUME_BACKUP_S + 0.1
    assert call.counter("aisdr_barge_ins_total", outcome="resumed") == 1
    resumed_events = [d for t, d, _ in call.store.events if t == "barge_in_resumed"]
    assert resumed_events == [{"reason": "backchannel"}]


# --- silence ------------------------------------------------------------------------------


def test_silence_reprompts_then_says_goodbye_and_hangs_up() -> None:
    call = FastCall(agent={"silence_timeout_s": 10.0})
    assert call.run() == "silence-timeout"

    assert call.store.said() == [
        ("assistant", GREETING),
        ("assistant", REPROMPT_LINE),
        ("assistant", SILENCE_GOODBYE),
    ]
    greeting, reprompt, goodbye = call.phone.played
    # each line comes 10 s after the last one was heard (known by its mark's return), on
    # the watchdog's grid, plus the TTS's time to first audio; then it plays through
    least = 10.0 + call.phone.mark_lag_s + call.tts.first_audio_s
    assert least <= reprompt.start - greeting.end <= least + WATCHDOG_S
    assert least <= goodbye.start - reprompt.end <= least + WATCHDOG_S
    assert reprompt.seconds == pytest.approx(call.speech_seconds(REPROMPT_LINE))
    assert goodbye.seconds == pytest.approx(call.speech_seconds(SILENCE_GOODBYE))
    # hung up once the goodbye had played, not before
    [(hung_up_at, call_sid)] = call.control.hang_ups
    assert call_sid == call.transport.call_sid
    assert hung_up_at == pytest.approx(goodbye.end + call.phone.mark_lag_s, abs=0.01)
    assert call.store.event_types().count("silence_reprompt") == 1
    assert call.llm.requests == []


# --- tool call ----------------------------------------------------------------------------


def test_a_slow_tool_gets_a_filler_then_its_result_is_answered() -> None:
    question = Utterance(at=2.5, text="Can you book me for Tuesday at ten?", seconds=1.5)
    booking = ToolCall("book_meeting", {"day": "Tuesday", "time": "10:00"})
    filler = "Let me check the calendar."
    answer = "You're booked for Tuesday at ten."
    call = FastCall(
        replies=[Reply(tool_calls=[booking]), Reply(answer)],
        utterances=[question],
        tools={
            "book_meeting": ToolScript(
                ToolOutcome(result={"booked": True, "slot": "Tue 10:00"}),
                seconds=2.5,
                filler=filler,
            )
        },
        hangup_at=16.0,
    )
    assert call.run() == "customer-ended-call"

    # the tool ran once, for this call, with the arguments the LLM gave
    assert call.tool_runner is not None
    [(ran, ctx, started, finished)] = call.tool_runner.runs
    assert ran == booking and ctx.config.call_id == "call-1"
    assert ctx.idempotency_key.startswith("call-1:book_meeting:")
    assert finished - started == pytest.approx(2.5)
    # the filler was asked for after 1 s of waiting, and heard while the tool ran
    filler_at = next((t for t, text in call.tts.requests if text == filler), None)
    assert filler_at is not None, "no filler was spoken"
    assert filler_at - started == pytest.approx(1.0, abs=0.01)
    assert call.phone.playing_at(filler_at + 0.3)
    # the second round sees the call and its result, and its answer follows the filler
    second = call.llm.requests[1]
    assert second.tools is not None and second.tools[0]["function"]["name"] == "book_meeting"
    tool_message = second.messages[-1]
    assert tool_message["role"] == "tool" and tool_message["tool_name"] == "book_meeting"
    assert '"booked": true' in tool_message["content"]
    assert second.at >= finished
    [answer_at] = [t for t, text in call.tts.requests if text == answer]
    assert answer_at >= second.at

    role, text = call.store.said()[2]
    assert (role, text) == ("assistant", f"{filler} {answer}")
    assert call.store.turns[2]["tool_calls"] == [
        {"function": {"name": "book_meeting", "arguments": booking.arguments}}
    ]
    assert ("tool_called", {"name": "book_meeting", "action": None}) in [
        (t, d) for t, d, _ in call.store.events
    ]
