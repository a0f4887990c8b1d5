"""In-process fakes of what a `CallSession` talks to, for the fast lane's scenarios: each
implements the real protocol of `pipeline/providers.py` or `pipeline/contracts.py` and
records what it was asked, with the times of the event loop's clock (virtual in the fast
lane, see `tests/test_fast_calls.py`).

    Caller          the scripted caller: when each utterance starts, its words, its length;
                    makes the inbound audio (a loud square wave for speech, mu-law silence)
    ScriptedSTT     "transcribes" the caller's audio: an interim once an utterance has
                    played `interim_after_s`, the final after each Finalize
    ScriptedLLM     streams scripted replies token by token, and tool calls
    CharTTS         `bytes_per_char` of audio per character of text
    EnergyModel     the VAD's model, replaced by an energy threshold (why: see the test
                    module's docstring); the real VADBatcher and VADStream run around it
    MemoryStore, RecordingControl, ScriptedTools
                    the app's side: the call's records, hang-up and transfer, tools
    Phone           Twilio's side of the audio: plays what it gets at 8000 B/s, sends
                    marks back once played, drops what is unplayed on `clear`
    PhoneTransport  the media-level `MediaTransport` between the call and the `Phone`
    TickingClock    the loop's clock as the session reads it (why: its docstring)

Must not import FastAPI, SQLAlchemy, a vendor SDK, or the app's `api/`, `store/` and
`adapters/`: the fast lane is the pipeline against its contracts alone.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contracts import AgentConfig, MediaSink, StreamStart, ToolContext, ToolOutcome
from pipeline.providers import (
    LLMDelta,
    LLMUnavailable,
    Message,
    STTEvent,
    ToolCall,
    Transcript,
)
from pipeline.silero import SileroModel
from utils import FRAME_BYTES, MULAW_SILENCE, SAMPLE_RATE

FRAME_S = FRAME_BYTES / SAMPLE_RATE
SPEECH_FRAME = bytes([0x00, 0x80]) * (FRAME_BYTES // 2)
"""20 ms of "speech": mu-law's loudest codes, alternating sign (a full-scale square wave)."""
SILENT_FRAME = bytes([MULAW_SILENCE]) * FRAME_BYTES


def now() -> float:
    return asyncio.get_running_loop().time()


def word_tokens(text: str) -> list[str]:
    """Word-ish tokens with their leading whitespace, as Ollama streams them."""
    return re.findall(r"\s*\S+", text)


# --- the caller ---------------------------------------------------------------------------


@dataclass
class Utterance:
    """The caller says `text`, `at` seconds after the call's first frame, for `seconds`."""

    at: float
    text: str
    seconds: float = 1.0
    audio_start: float | None = None
    """Audio time of its first frame once sent (seconds of the inbound stream)."""


@dataclass
class Caller:
    utterances: list[Utterance] = field(default_factory=list)
    frames_sent: int = 0

    def next_frame(self) -> bytes:
        """The caller's next 20 ms of audio, on its own timeline (`frames_sent` * 20 ms); a
        phone sends a frame once it has all of it, so 20 ms after that."""
        t = self.frames_sent * FRAME_S
        self.frames_sent += 1
        for utterance in self.utterances:
            if utterance.at <= t < utterance.at + utterance.seconds:
                if utterance.audio_start is None:
                    utterance.audio_start = t
                return SPEECH_FRAME
        return SILENT_FRAME


# --- speech to text -----------------------------------------------------------------------


class ScriptedStream:
    """One live "transcription": knows the caller's script and how much audio it got."""

    def __init__(self, caller: Caller, latency_s: float, interim_after_s: float) -> None:
        self.caller = caller
        self.latency_s = latency_s
        self.interim_after_s = interim_after_s
        self.reconnects = 0
        self.audio_bytes = 0
        self.finalizes: list[float] = []
        self.speaking_hints: list[tuple[float, bool]] = []
        self._events: asyncio.Queue[STTEvent] = asyncio.Queue()
        self._interimed: set[int] = set()
        self._finalized: set[int] = set()
        self._pending = 0

    @property
    def audio_time(self) -> float:
        return self.audio_bytes / SAMPLE_RATE

    def _heard(self) -> list[tuple[int, Utterance]]:
        """Utterances whose audio has started reaching the transcriber."""
        return [
            (i, u)
            for i, u in enumerate(self.caller.utterances)
            if u.audio_start is not None and u.audio_start < self.audio_time
        ]

    def _deliver(self, event: Transcript) -> None:
        """Sent `latency_s` from now, stamped with its arrival."""

        def arrive() -> None:
            event.received_at = now()
            self._events.put_nowait(event)

        asyncio.get_running_loop().call_later(self.latency_s, arrive)

    def push_audio(self, mulaw: bytes) -> bool:
        self.audio_bytes += len(mulaw)
        self._pending += len(mulaw)
        for i, utterance in self._heard():
            assert utterance.audio_start is not None
            into = self.audio_time - utterance.audio_start
            if (
                i not in self._interimed
                and i not in self._finalized
                and (into >= self.interim_after_s)
            ):
                self._interimed.add(i)
                words = utterance.text.split()
                self._deliver(Transcript(" ".join(words[: max(len(words) // 2, 1)]), False, False))
        return self._pending >= 20 * FRAME_BYTES

    async def send_audio(self, mulaw: bytes) -> None:
        self.push_audio(mulaw)
        await self.send_pending()

    async def send_pending(self) -> None:
        self._pending = 0

    def caller_speaking(self, speaking: bool) -> None:
        self.speaking_hints.append((now(), speaking))

    async def finalize(self) -> None:
        """The final of everything heard and not yet final, as Deepgram flushes it (an empty
        one when there is nothing)."""
        self.finalizes.append(now())
        fresh = [(i, u) for i, u in self._heard() if i not in self._finalized]
        self._finalized.update(i for i, _ in fresh)
        text = " ".join(u.text for _, u in fresh)
        self._deliver(Transcript(text, True, False, from_finalize=True))

    async def events(self) -> AsyncIterator[STTEvent]:
        while True:
            yield await self._events.get()


class ScriptedSTT:
    def __init__(self, caller: Caller, *, latency_s: float = 0.05, interim_after_s: float = 0.3):
        self.caller = caller
        self.latency_s = latency_s
        self.interim_after_s = interim_after_s
        self.streams: list[ScriptedStream] = []

    def open(self, *, language: str, tag: str = "") -> AbstractAsyncContextManager[ScriptedStream]:
        @asynccontextmanager
        async def stream() -> AsyncIterator[ScriptedStream]:
            opened = ScriptedStream(self.caller, self.latency_s, self.interim_after_s)
            self.streams.append(opened)
            yield opened

        return stream()


# --- language model -----------------------------------------------------------------------


@dataclass
class Reply:
    """One LLM round: `text` streamed in word-ish tokens, then `tool_calls`."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    first_token_s: float = 0.2
    token_s: float = 0.01


@dataclass
class LLMRequest:
    at: float
    messages: list[Message]
    tools: list[dict[str, Any]] | None


class ScriptedLLM:
    """Answers each request with the next scripted `Reply`; an exhausted script fails as an
    unreachable server would (the call then speaks its fallback line)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[LLMRequest] = []

    async def stream_chat(
        self,
        messages: list[Message],
        *,
        model: str,
        temperature: float,
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[LLMDelta, None]:
        self.requests.append(LLMRequest(now(), [dict(m) for m in messages], tools))
        if not self.replies:
            raise LLMUnavailable("the script has no more replies")
        reply = self.replies.pop(0)
        await asyncio.sleep(reply.first_token_s)
        for i, token in enumerate(word_tokens(reply.text)):
            if i:
                await asyncio.sleep(reply.token_s)
            yield LLMDelta(text=token)
        if reply.tool_calls:
            yield LLMDelta(tool_calls=list(reply.tool_calls))
        yield LLMDelta(done=True)

    async def complete_json(
        self, messages: list[Message], *, model: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        return {}


# --- text to speech -----------------------------------------------------------------------


class CharTTS:
    """`bytes_per_char` of audio per character, the first after `first_audio_s`, then in
    pieces of `piece_bytes` as fast as they are taken."""

    def __init__(
        self, *, bytes_per_char: int = 400, first_audio_s: float = 0.1, piece_bytes: int = 1600
    ) -> None:
        self.bytes_per_char = bytes_per_char
        self.first_audio_s = first_audio_s
        self.piece_bytes = piece_bytes
        self.requests: list[tuple[float, str]] = []

    def seconds_of(self, text: str) -> float:
        return len(text) * self.bytes_per_char / SAMPLE_RATE

    async def synthesize(self, text: str, *, voice: str) -> AsyncGenerator[bytes, None]:
        self.requests.append((now(), text))
        await asyncio.sleep(self.first_audio_s)
        audio = bytes([0x7F]) * (len(text) * self.bytes_per_char)
        for start in range(0, len(audio), self.piece_bytes):
            yield audio[start : start + self.piece_bytes]


# --- voice activity -----------------------------------------------------------------------


class EnergyModel(SileroModel):
    """Silero's place in the real `VADBatcher`: a window is speech (0.95) when its mean
    power is over `power` (by default: more than half of it is the caller's square wave),
    else silence (0.02). Batched like the model, inline (no thread), so decisions land on
    exact window boundaries of the audio."""

    def __init__(self, power: float = 0.45) -> None:  # no ONNX session: nothing to load
        self.power = power
        self.batches = 0

    def infer(self, windows: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batches += 1
        power = np.mean(np.square(windows), axis=1)
        return np.where(power > self.power, 0.95, 0.02).astype(np.float32), states


# --- the app's side -----------------------------------------------------------------------


@dataclass
class MemoryStore:
    """A `CallStore` in memory: what the call recorded, in the order it was written."""

    config: AgentConfig | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any], float | None]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    started: dict[str, str] = field(default_factory=dict)
    ended_reason: str | None = None

    async def load_config(self, call_id: str) -> AgentConfig | None:
        return self.config if self.config and self.config.call_id == call_id else None

    async def stream_started(self, call_id: str, *, stream_sid: str, call_sid: str) -> None:
        self.started = {"stream_sid": stream_sid, "call_sid": call_sid}

    async def add_turn(self, call_id: str, **fields: Any) -> None:
        self.turns.append(fields)

    async def add_event(
        self, call_id: str, type_: str, data: dict[str, Any], call_time_s: float | None = None
    ) -> None:
        self.events.append((type_, data, call_time_s))

    async def set_fields(self, call_id: str, **fields: Any) -> None:
        self.fields.update(fields)

    async def finish(self, call_id: str, *, ended_reason: str) -> None:
        assert self.ended_reason is None, "finished twice"
        self.ended_reason = ended_reason

    def said(self) -> list[tuple[str, str]]:
        return [(t["role"], t["text"]) for t in self.turns]

    def event_types(self) -> list[str]:
        return [type_ for type_, _, _ in self.events]


@dataclass
class RecordingControl:
    """A `CallControl` that records each action with its time."""

    hang_ups: list[tuple[float, str]] = field(default_factory=list)
    transfers: list[tuple[float, str, str]] = field(default_factory=list)

    async def hang_up(self, call_sid: str) -> None:
        self.hang_ups.append((now(), call_sid))

    async def transfer(self, call_sid: str, *, number: str, caller_id: str) -> None:
        self.transfers.append((now(), call_sid, number))


@dataclass
class ToolScript:
    """How a scripted tool behaves: it takes `seconds`, then returns `outcome`."""

    outcome: ToolOutcome
    seconds: float = 0.0
    filler: str | None = None


class ScriptedTools:
    """A `ToolRunner` over scripted tools; records each run (call, context, start, end)."""

    def __init__(self, tools: dict[str, ToolScript]) -> None:
        self.tools = tools
        self.runs: list[tuple[ToolCall, ToolContext, float, float]] = []

    def schemas(self, config: AgentConfig) -> list[dict[str, Any]]:
        return [
            {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
            for name in self.tools
        ]

    def filler_for(self, config: AgentConfig, name: str) -> str | None:
        script = self.tools.get(name)
        return script.filler if script else None

    async def run(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        started = now()
        script = self.tools[call.name]
        await asyncio.sleep(script.seconds)
        self.runs.append((call, ctx, started, now()))
        return script.outcome


# --- the phone and its media stream -------------------------------------------------------


@dataclass
class Played:
    """Agent audio the phone played without a gap: clock times, bytes."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Phone:
    """Twilio's side of the outbound audio: plays what it is sent at 8000 bytes/s after
    what it holds already, sends each mark back `mark_lag_s` after the audio before it has
    played, and on `clear` drops what has not played and sends back its pending marks at
    once (PROTOCOLS A3-A4). Inbound, it carries the `Caller`'s frames every 20 ms."""

    def __init__(self, caller: Caller, *, mark_lag_s: float = 0.05) -> None:
        self.caller = caller
        self.mark_lag_s = mark_lag_s
        self.play_end = 0.0
        self.played: list[Played] = []
        self.bytes_received = 0
        self.clears: list[float] = []
        self.marks_sent: list[tuple[float, str]] = []
        self.marks_back: list[tuple[float, str, bool]] = []
        """(when, name, cleared): each mark sent back, and whether a clear sent it."""
        self._pending: dict[str, asyncio.TimerHandle] = {}
        self.on_mark: Callable[[str], None] | None = None

    def audio(self, n_bytes: int) -> None:
        t = now()
        self.bytes_received += n_bytes
        start = max(t, self.play_end)
        self.play_end = start + n_bytes / SAMPLE_RATE
        if self.played and abs(self.played[-1].end - start) < 1e-9:
            self.played[-1].end = self.play_end
        else:
            self.played.append(Played(start, self.play_end))

    def mark(self, name: str) -> None:
        t = now()
        self.marks_sent.append((t, name))
        due = max(self.play_end, t) + self.mark_lag_s - t
        self._pending[name] = asyncio.get_running_loop().call_later(due, self._send_back, name)

    def clear(self) -> None:
        t = now()
        self.clears.append(t)
        while self.played and self.played[-1].start >= t:
            self.played.pop()
        if self.played and self.played[-1].end > t:
            self.played[-1].end = t
        self.play_end = min(self.play_end, t)
        for name, handle in list(self._pending.items()):
            handle.cancel()
            self._send_back(name, cleared=True)

    def _send_back(self, name: str, cleared: bool = False) -> None:
        self._pending.pop(name, None)
        self.marks_back.append((now(), name, cleared))
        if self.on_mark is not None:
            self.on_mark(name)

    def heard_between(self, start: float, end: float) -> float:
        """Seconds of agent audio played between two clock times."""
        return sum(max(0.0, min(p.end, end) - max(p.start, start)) for p in self.played)

    def playing_at(self, t: float) -> bool:
        return any(p.start <= t < p.end for p in self.played)


class PhoneTransport:
    """The `MediaTransport` over a `Phone`: the stream starts at once, the caller's frames
    go to the sink every 20 ms of the clock, marks come back as the phone plays them, and
    the stream stops at `hangup_at` (the caller hangs up) unless the call closed it."""

    def __init__(self, phone: Phone, *, call_id: str, hangup_at: float | None = None) -> None:
        self.phone = phone
        self.call_id = call_id
        self.hangup_at = hangup_at
        self.stream_sid = "MZ" + "0" * 32
        self.call_sid = "CA" + "0" * 32
        self.closed: list[tuple[float, int]] = []

    async def start(self) -> StreamStart | None:
        return StreamStart(self.stream_sid, self.call_sid, {"call_id": self.call_id})

    async def run(self, sink: MediaSink) -> None:
        started = now()
        self.phone.on_mark = sink.on_mark
        try:
            while not self.closed:
                due = started + (self.phone.caller.frames_sent + 1) * FRAME_S
                if self.hangup_at is not None and due > started + self.hangup_at:
                    return  # the caller's `stop`
                await asyncio.sleep(due - now())
                if not self.closed:
                    sink.on_audio(self.phone.caller.next_frame())
        finally:
            self.phone.on_mark = None

    async def send_audio(self, audio: bytes | bytearray) -> None:
        assert not self.closed, "audio sent after close"
        self.phone.audio(len(audio))

    async def send_mark(self, name: str) -> None:
        self.phone.mark(name)

    async def send_clear(self) -> None:
        self.phone.clear()

    async def close(self, code: int = 1000) -> None:
        self.closed.append((now(), code))


class TickingClock:
    """The loop's clock, read as a session reads a real one: each reading is later than
    the last, by 1 ns when the loop's time has not moved.

    A virtual loop's time stands still while tasks run; a real clock does not. Code that
    waits for the clock to pass a threshold made by float sums (the pacer's `lead >
    LEAD_S`, with `lead` a sum of 0.1 s sends: 0.30000000000000004) would otherwise
    sleep ~1e-17 s again and again at the same instant, for ever. A real clock moves on in
    one turn; so does this one, and it never drifts from the loop's by more than the
    readings of one instant, in nanoseconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._time = loop.time
        self._last = float("-inf")

    def __call__(self) -> float:
        self._last = max(self._time(), self._last + 1e-9)
        return self._last
