"""Live calls: one `CallSession` per media stream, started by the `CallManager`.

Role: a call's orchestration: its lifecycle and the TaskGroup of its loops, turn-taking
and barge-in decisions, timers, and call control (hang-up, transfer). The session owns its
parts and gives each only what it needs:

    listener    caller audio -> STT and VAD buffers; the inbound loop     pipeline/listener.py
    playout     speech -> paced media, marks, clear and rewind, heard     pipeline/playout.py
    answer      retrieval, LLM rounds, tools and fillers, LLM fallbacks   pipeline/answer.py
    synthesis   text chunks -> TTS audio into the speech, TTS fallback    pipeline/synthesis.py
    recorder    the single writer to the `CallStore`                      pipeline/recorder.py

Per call, one `asyncio.TaskGroup` runs the long-lived loops::

    _receive_loop   the transport decodes inbound media into the session's `MediaSink`
                    (audio -> listener, marks -> playout, DTMF), as it reads it (no task
                    switch per frame), until the caller's side stops or goes
    listener.run    woken when a batch of STT audio or a VAD window awaits: sends the
                    audio, runs Silero; the session pauses for barge-in and Finalizes
    _stt_loop       transcripts -> end of turn, barge-in confirm/resume
    playout.run     speech audio -> media paced against the playback clock
    _watchdog_loop  silence timeout, max duration, barge-in resolution deadline

Each agent utterance is a `Speech` produced by its own task (answer -> synthesis). Caller
speech while the agent is audible pauses it at once (a `clear`); the transcript then
decides: backchannel or noise resumes from the byte the caller last heard, anything else
cancels the producer and the assistant turn keeps exactly what was heard.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from pipeline.answer import AfterSpeech, Answer, system_prompt
from pipeline.contracts import (
    AgentConfig,
    MediaSink,
    MediaTransport,
    PipelineDeps,
    StreamStart,
    ToolOutcome,
)
from pipeline.listener import Listener
from pipeline.playout import LEAD_S, Playout, SendFailed, on_grid
from pipeline.providers import Message, SpeechStarted, STTError, STTStream, Transcript, UtteranceEnd
from pipeline.recorder import Recorder
from pipeline.speech import BargeIn, EarlyAnswer, Speech, TurnTiming
from pipeline.synthesis import Synthesis
from pipeline.text import is_backchannel, words_of
from pipeline.vad import VADEvent, VADPause, VADResume, VADSpeechEnd, VADSpeechStart, VADStream
from pipeline.voicemail import (
    FAX,
    HUMAN_RESULTS,
    MACHINE_RESULTS,
    VOICEMAIL,
    is_voicemail_greeting,
)

__all__ = ["LEAD_S", "CallManager", "CallSession"]  # LEAD_S: the bench reads it from here

log = logging.getLogger("ai_sdr.pipeline")

MAX_VAD_BACKLOG_S = 1.0
"""Audio the VAD may fall behind before it skips windows (counted as dropped frames)."""
BARGE_IN_RESOLVE_S = 1.5
"""After the caller's speech ends, how long to wait for a transcript before treating a
paused barge-in as noise and resuming."""
REPROMPT_LINE = "Are you still there?"
SILENCE_GOODBYE = "It seems we got disconnected. Feel free to call back anytime. Goodbye!"
MAX_DURATION_GOODBYE = "I'm sorry, we've reached the time limit for this call. Goodbye!"
STT_FAILED_LINE = "I'm sorry, I'm having trouble hearing you. Please call back later. Goodbye."
TRANSFER_FAILED_LINE = "I'm sorry, I couldn't connect you right now. Can I help with anything else?"
HANDSHAKE_TIMEOUT_S = 5.0
WATCHDOG_S = 0.1
"""Timers (silence, max duration, DTMF, stale barge-in) are checked on this grid of the
loop's clock, the same instants for every call: one wake-up of the loop serves all of
them, where free-running ticks would wake it once per call (each wake-up from idle costs
tens of microseconds of CPU on a virtual machine: BENCHMARKS.md, fourth round)."""


class _CallEnded(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the call ---------------------------------------------------------------------------


class CallSession:
    def __init__(
        self,
        config: AgentConfig,
        transport: MediaTransport,
        deps: PipelineDeps,
        *,
        stream_sid: str,
        call_sid: str,
    ) -> None:
        self.config = config
        self.transport = transport
        self.deps = deps
        self.clock = deps.clock
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.started_at = self.clock()
        self.ended_reason = "customer-ended-call"
        self.history: list[Message] = [{"role": "system", "content": system_prompt(config)}]
        self.after = AfterSpeech()
        self.recorder = Recorder(deps.store, config.call_id, self.call_time)
        vad = VADStream(
            deps.vad_batcher(),
            threshold=deps.vad_threshold,
            min_speech_ms=max(config.min_interrupt_speech_ms, 32),
            min_silence_ms=deps.end_of_speech_ms,
            pause_ms=deps.finalize_after_ms or None,
            max_backlog_s=MAX_VAD_BACKLOG_S,
            clock=self.clock,
        )
        self.listener = Listener(vad, clock=self.clock, metrics=deps.metrics, on_vad=self._on_vad)
        self.playout = Playout(transport, clock=self.clock, metrics=deps.metrics, spawn=self._spawn)
        self.synthesis = Synthesis(
            deps.tts,
            self.playout,
            voice=config.voice,
            fallback_line=config.fallback_line,
            clock=self.clock,
            metrics=deps.metrics,
            tag=config.call_id,
        )
        self.answer = Answer(
            config,
            call_sid=call_sid,
            history=self.history,
            after=self.after,
            llm=deps.llm,
            retriever=deps.retriever,
            tools=deps.tools,
            metrics=deps.metrics,
            clock=self.clock,
            event=self.recorder.event,
        )
        self._vad = vad
        self._stt: STTStream | None = None
        self._producer: asyncio.Task[None] | None = None
        self._speech_ids = 0
        # inbound utterance
        self._finals: list[str] = []
        self._interim = ""
        self._timing = TurnTiming()
        self._utt_onset: float | None = None
        self._utt_end: float | None = None
        self._vad_ended = False  # the VAD has heard this utterance's closing silence
        self._flushed_silence: float | None = None  # silence a VADPause already finalized
        self._finalizes_pending = 0  # Finalize sent, its from_finalize final not yet in
        self._barge_in: BargeIn | None = None
        self._early: EarlyAnswer | None = None
        self._dtmf: list[str] = []
        self._dtmf_at = 0.0
        # timers and lifecycle
        self._last_activity = self.started_at
        self._reprompted = False
        self._ending = False
        self._tg: asyncio.TaskGroup | None = None
        self._awaiting_human = config.wait_for_human  # outbound: no pitch to a machine
        self._to_machine = False  # leaving a voicemail: barge-in is off
        self._running = asyncio.Event()  # the loops are up
        self._done = asyncio.Event()  # `run()` has returned

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> str:
        """Run the call until hang-up; returns the ended reason."""
        metrics = self.deps.metrics
        metrics.calls_started.inc()
        metrics.calls_active.inc()
        self.recorder.start()
        self.recorder.stream_started(stream_sid=self.stream_sid, call_sid=self.call_sid)
        try:
            async with self.deps.stt.open(
                language=self.config.language, tag=self.config.call_id
            ) as stt:
                self._stt = stt
                self.listener.attach(stt)
                await self._run_loops()
        except* (_CallEnded, SendFailed) as ended:
            first = ended.exceptions[0]
            self.ended_reason = (
                first.reason if isinstance(first, _CallEnded) else self._hangup_reason()
            )
        except* STTError:
            log.warning("call %s: transcription failed for good", self.config.call_id)
            self.ended_reason = "error"
        except* Exception:
            log.exception("call %s: pipeline failure", self.config.call_id)
            self.ended_reason = "error"
        finally:
            self._record_unfinished_speech()
            await self.recorder.finish(self.ended_reason)
            metrics.calls_active.dec()
            metrics.calls_ended.labels(self.ended_reason).inc()
            self._done.set()
        return self.ended_reason

    async def _run_loops(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._receive_loop(), name="receive")
            tg.create_task(self.listener.run(), name="inbound")
            tg.create_task(self._stt_loop(), name="stt")
            tg.create_task(self.playout.run(), name="pacer")
            tg.create_task(self._watchdog_loop(), name="watchdog")
            self._running.set()
            if (
                self.config.first_message_mode == "assistant_speaks_first"
                and self.config.first_message
                and not self._awaiting_human
            ):
                self._start_speech("greeting", self.config.first_message)

    async def end(self, reason: str, goodbye: str | None = None) -> None:
        """End the call from outside (a shutdown, the API): say `goodbye` first unless the
        call is ending already, then hang up with `reason`. Returns once the call is over.
        Speech over the goodbye does not keep the call open."""
        await _either(self._running, self._done)
        if self._done.is_set():
            return
        if goodbye and not self._ending:
            try:
                speech = self._say_goodbye(goodbye, reason)
            except RuntimeError:  # the loops are stopping already
                await self._done.wait()
                return
            await _either(speech.played, self._done)  # heard (it then hangs up), or cut
            if not speech.cancelled:
                await self._done.wait()
                return
        hang_up = self._hang_up(reason)
        try:
            self._spawn(hang_up)
        except RuntimeError:  # the loops are stopping already
            hang_up.close()
        await self._done.wait()

    async def answered_by(self, result: str) -> None:
        """Twilio's answering-machine detection: a human gets the greeting now; a machine
        whose greeting ended gets the voicemail (or a hang-up); a fax, a hang-up."""
        await _either(self._running, self._done)
        if self._done.is_set() or self._ending:
            return
        self.recorder.event("answered_by", result=result)
        if result in HUMAN_RESULTS:
            if self._awaiting_human and self.playout.speech is None:
                self._human_confirmed()
            self._awaiting_human = False
        elif result in MACHINE_RESULTS:
            self._awaiting_human = False
            self._to_machine = True
            await self.end(VOICEMAIL, self._voicemail_message() or None)
        elif result == FAX:
            await self.end(FAX)

    def call_time(self) -> float:
        return round(self.clock() - self.started_at, 3)

    def _voicemail_message(self) -> str:
        if self.config.voicemail_action != "leave_message":
            return ""
        return self.config.voicemail_message

    def _human_confirmed(self) -> None:
        """A person is on the line: the pitch starts (the first message, if any)."""
        self._awaiting_human = False
        if self.config.first_message and self.config.first_message_mode == "assistant_speaks_first":
            self._start_speech("greeting", self.config.first_message)

    def _first_callee_turn(self, text: str) -> bool:
        """The first thing an outbound callee said, before a human was known: a
        voicemail greeting gets the message and a hang-up; a person gets the greeting.
        True when that took the turn (no answer to it)."""
        self._awaiting_human = False
        if is_voicemail_greeting(text):
            self.recorder.event("answered_by", result="machine_transcript")
            self._to_machine = True
            message = self._voicemail_message()
            if message:
                self._say_goodbye(message, VOICEMAIL)
            else:
                self._spawn(self._hang_up(VOICEMAIL))
            return True
        if self.config.first_message and self.config.first_message_mode == "assistant_speaks_first":
            self._start_speech("greeting", self.config.first_message)
            return True
        return False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        self._tg.create_task(coro)

    def _hangup_reason(self) -> str:
        return "customer-ended-call" if not self._ending else self.ended_reason

    # --- inbound ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        sink = MediaSink(
            on_audio=self.listener.on_audio, on_mark=self.playout.on_mark, on_dtmf=self._on_dtmf
        )
        await self.transport.run(sink)
        raise _CallEnded(self._hangup_reason())

    def _on_dtmf(self, digit: str) -> None:
        self._dtmf.append(digit)
        self._dtmf_at = self.clock()
        self._last_activity = self._dtmf_at
        self.recorder.event("dtmf", digit=digit)

    async def _on_vad(self, event: VADEvent) -> None:
        if isinstance(event, VADSpeechStart):
            self._on_speech_start(event)
        elif isinstance(event, VADPause):
            self._flushed_silence = event.silence_start
            self._timing.eos_at = self.listener.to_clock(event.silence_start)
            await self._finalize()
        elif isinstance(event, VADResume):
            self._timing.eos_at = None  # the pause was inside the utterance
            self._last_activity = self.clock()
            self._drop_early("resumed")
        else:
            await self._on_speech_end(event)

    def _on_speech_start(self, event: VADSpeechStart) -> None:
        self._last_activity = self.clock()
        self._vad_ended = False
        self._finalizes_pending = 0  # one lost to a reconnect must not hold up later turns
        # speech again: an earlier end of speech is no longer the end of this utterance
        self._timing.eos_at = None
        self._utt_end = None
        if self._utt_onset is None:
            self._utt_onset = event.onset
        if self._to_machine:
            return  # a machine does not listen: its beep or greeting interrupts nothing
        if self.playout.speech is not None and not self.playout.paused and self._barge_in is None:
            self._pause_for_barge_in(event)

    async def _on_speech_end(self, event: VADSpeechEnd) -> None:
        self._last_activity = self.clock()
        self._utt_end = event.end
        self._timing.eos_at = self.listener.to_clock(event.end)
        if self._barge_in is not None:
            self._barge_in.vad_ended_at = self.clock()
        self._vad_ended = True
        assert self._stt is not None
        self._stt.caller_speaking(False)
        if self._flushed_silence != event.end:
            await self._finalize()
        elif self._finalizes_pending == 0 and self._finals:
            # The pause already flushed the transcriber and its final is in: the turn ends
            # at the end of speech itself, not a transcription round trip later.
            self._end_of_turn(self.clock())

    async def _finalize(self) -> None:
        """Ask the transcriber for the final of everything heard so far."""
        assert self._stt is not None
        self._finalizes_pending += 1
        await self._stt.finalize()

    # --- transcripts and turns ----------------------------------------------------------

    async def _stt_loop(self) -> None:
        assert self._stt is not None
        try:
            async for event in self._stt.events():
                if isinstance(event, Transcript):
                    self._on_transcript(event)
                elif isinstance(event, UtteranceEnd) and self._finals:
                    self._end_of_turn(event.received_at or self.clock())
                elif isinstance(event, SpeechStarted):
                    self._last_activity = self.clock()
        except STTError:
            self.deps.metrics.provider_errors.labels("stt").inc()
            await self._finish_with(STT_FAILED_LINE, "error")

    def _on_transcript(self, event: Transcript) -> None:
        text = event.text.strip()
        if not event.is_final:
            self._interim = text
            self._check_barge_in(" ".join([*self._finals, text]))
            return
        if text:
            self._finals.append(text)
            self._interim = ""
            self._timing.final_at = event.received_at or self.clock()
            self._check_barge_in(" ".join(self._finals))
        if event.from_finalize:
            self._finalizes_pending = max(self._finalizes_pending - 1, 0)
        if not self._finals:
            return
        if event.from_finalize:
            # Our own flush: the turn ends once the VAD has also heard the whole silence
            # and no other flush is outstanding (a pause may have flushed mid-sentence).
            if self._vad_ended and self._finalizes_pending == 0:
                self._end_of_turn(event.received_at or self.clock())
            elif self._finalizes_pending == 0 and self._vad.is_pausing:
                self._start_early_answer(event.received_at or self.clock())
        elif event.speech_final:  # the transcriber's own endpointing
            self._end_of_turn(event.received_at or self.clock())

    def _interrupts(self, text: str) -> bool:
        words = words_of(text)
        if not words or is_backchannel(text, self.config.backchannel_phrases):
            return False
        return len(words) >= max(self.config.min_interrupt_words, 1)

    def _check_barge_in(self, text: str) -> None:
        """A paused barge-in whose words are real speech becomes an interruption."""
        if self._barge_in is not None and self._interrupts(text):
            self._confirm_barge_in()

    def _end_of_turn(self, final_at: float) -> None:
        text = " ".join(self._finals).strip()
        timing = self._timing
        # when the turn was certain: the last final, or the end of speech if that came later
        timing.final_at = max(timing.final_at or final_at, final_at)
        if timing.eos_at is None:
            timing.eos_at = timing.final_at
        onset, end = self._utt_onset, self._utt_end
        self._finals, self._interim, self._timing = [], "", TurnTiming()
        self._finalizes_pending = 0
        self._utt_onset = self._utt_end = None
        if self._to_machine:
            return  # a machine's greeting: the voicemail goes on regardless
        if self._barge_in is not None:
            if not self._interrupts(text):
                self._resume_after_barge_in("backchannel")
                return
            self._confirm_barge_in()
        elif self.playout.speech is not None:
            if not self._interrupts(text):
                self.recorder.event("backchannel", paused=False)
                return
            self._interrupt_current("caller-spoke")
        if self._ending:
            self._drop_early("ending")
            return
        self._user_turn(text, timing, onset, end)

    def _start_early_answer(self, final_at: float) -> None:
        """The pause's final is in while the caller may still go on: start answering it now,
        to be heard only if the turn ends with this transcript."""
        text = " ".join(self._finals).strip()
        idle = self.playout.speech is None and self._barge_in is None and not self._ending
        idle = idle and not self._awaiting_human  # the first turn may be a machine's
        if not (self.deps.early_answers and idle and text):
            return
        if self._early is not None:
            if self._early.text == text:
                return
            self._drop_early("changed")
        # Timed from the pause the VAD is in (its caller checked `is_pausing`), not from
        # `_timing`: that pause's VADPause may still be queued in the inbound loop.
        pause_start = self._vad.pause_start
        eos_at = self._timing.eos_at if pause_start is None else self.listener.to_clock(pause_start)
        timing = TurnTiming(eos_at=eos_at, final_at=final_at)
        history = [*self.history, {"role": "user", "content": text}]
        speech, task = self._new_producer(
            "answer", lambda speech: self.answer.stream(speech, text, timing, history)
        )
        self._early = EarlyAnswer(text=text, speech=speech, task=task, timing=timing)
        self.deps.metrics.early_answers.labels("started").inc()

    def _drop_early(self, why: str) -> None:
        early, self._early = self._early, None
        if early is None:
            return
        early.speech.cancelled = True
        early.task.cancel()
        self.deps.metrics.early_answers.labels(why).inc()
        log.debug("call %s: early answer discarded (%s)", self.config.call_id, why)

    def _user_turn(
        self, text: str, timing: TurnTiming, onset: float | None, end: float | None
    ) -> None:
        """The caller's turn is over: record it and answer, with the early answer if it
        answers this very text (released now; its timing is the answer's) or a fresh one
        (which discards any other early answer, e.g. for a keypad turn)."""
        early = self._early
        if early is not None and (early.text != text or early.task.done()):
            self._drop_early("changed")
            early = None
        self._early = None
        timing = early.timing if early is not None else timing
        self._reprompted = False
        self.recorder.turn(
            role="user",
            text=text,
            start_s=round(onset or 0.0, 3),
            end_s=round(end or self.call_time(), 3),
            stt_final_ms=timing.ms(timing.final_at),
        )
        self.history.append({"role": "user", "content": text})
        self.deps.metrics.observe_turn_ms("stt_final", timing.ms(timing.final_at))
        if self._awaiting_human and self._first_callee_turn(text):
            return
        if early is None:
            self._start_speech("answer", lambda speech: self.answer.stream(speech, text, timing))
            return
        self.deps.metrics.early_answers.labels("used").inc()
        self._producer = early.task
        self.playout.play(early.speech)
        early.speech.released.set()
        self.playout.wake()

    # --- barge-in -----------------------------------------------------------------------

    def _pause_for_barge_in(self, event: VADSpeechStart) -> None:
        speech = self.playout.speech
        assert speech is not None
        now = self.clock()
        played = self.playout.pause(now)
        onset_clock = self.listener.to_clock(event.onset) or now
        self._barge_in = BargeIn(speech=speech, heard=speech.heard_text(played))
        latency = max(now - onset_clock, 0.0)
        self.deps.metrics.barge_in_latency.observe(latency)
        self.recorder.event(
            "barge_in", onset_s=round(event.onset, 3), latency_ms=round(latency * 1000, 1)
        )

    def _confirm_barge_in(self) -> None:
        barge_in = self._barge_in
        assert barge_in is not None
        self._barge_in = None
        self.playout.paused = False
        self.deps.metrics.barge_ins.labels("interrupted").inc()
        if barge_in.speech is self.playout.speech:
            self._interrupt_current("barge-in", heard=barge_in.heard)

    def _resume_after_barge_in(self, why: str) -> None:
        barge_in = self._barge_in
        self._barge_in = None
        self.deps.metrics.barge_ins.labels("resumed").inc()
        if barge_in is not None:
            self.recorder.event("barge_in_resumed", reason=why)
        self.playout.resume(barge_in.speech if barge_in is not None else None)

    def _interrupt_current(self, why: str, heard: str | None = None) -> None:
        """Cancel the current answer; history keeps exactly what the caller heard."""
        speech = self.playout.speech
        if speech is None:
            return
        if heard is None:
            if self.playout.audible():
                self.playout.clear()
            heard = self.playout.heard(speech)
        speech.cancelled = True
        if self._producer is not None:
            self._producer.cancel()
        self._close_speech(speech, heard, interrupted=True)
        # what was synthesised but not heard, for the console's timeline (the turn keeps
        # only the heard part, as the conversation history does)
        full = speech.full_text()
        unheard = full[len(heard) :].strip() if full.startswith(heard) else full
        self.recorder.event("interrupted", reason=why, unheard=unheard[:2000])

    def _close_speech(self, speech: Speech, text: str, *, interrupted: bool) -> None:
        if self.playout.speech is not speech:
            return
        self.playout.stop(speech, interrupted=interrupted)
        assert speech.end_at is not None
        self._last_activity = speech.end_at
        if text:
            self.history.append({"role": "assistant", "content": text})
        if text or interrupted:
            self.recorder.turn(
                role="assistant",
                text=text,
                start_s=round((speech.first_media_at or speech.end_at) - self.started_at, 3),
                end_s=round(speech.end_at - self.started_at, 3),
                interrupted=interrupted,
                tool_calls=speech.tool_calls,
                **speech.latency,
            )

    def _record_unfinished_speech(self) -> None:
        speech = self.playout.speech
        if speech is not None:
            heard = self.playout.heard(speech)
            self._close_speech(speech, heard, interrupted=heard != speech.full_text())

    # --- speaking -----------------------------------------------------------------------

    def _start_speech(
        self, kind: str, texts: Callable[[Speech], AsyncIterator[str]] | str
    ) -> Speech:
        self._drop_early("superseded")
        speech, self._producer = self._new_producer(kind, texts)
        speech.released.set()
        self.playout.play(speech)
        return speech

    def _new_producer(
        self, kind: str, texts: Callable[[Speech], AsyncIterator[str]] | str
    ) -> tuple[Speech, asyncio.Task[None]]:
        self._speech_ids += 1
        speech = Speech(id=self._speech_ids, kind=kind)
        chunks = _say(texts) if isinstance(texts, str) else texts(speech)
        assert self._tg is not None
        return speech, self._tg.create_task(self._produce(speech, chunks), name=kind)

    async def _produce(self, speech: Speech, chunks: AsyncIterator[str]) -> None:
        """Synthesise `speech`, let it play, then act on what it said."""
        await self.synthesis.speak(speech, chunks)
        await speech.released.wait()
        await self.playout.wait_played(speech)
        if self.playout.speech is speech:
            self._close_speech(speech, speech.full_text(), interrupted=False)
        await self._after_speech()

    # --- call control -------------------------------------------------------------------

    async def _after_speech(self) -> None:
        """Once the caller heard the last words: act on end-call phrases and tool actions."""
        action = self.after.action
        if action is None and self._said_end_phrase():
            action = ToolOutcome(result=None, action="end_call")
        if action is None:
            return
        self.after.action = None
        if action.action == "transfer" and action.transfer_to:
            await self._transfer(action.transfer_to)
            return
        await self._hang_up(self.after.reason or "assistant-ended-call")

    async def _transfer(self, number: str) -> None:
        try:
            await self.deps.control.transfer(
                self.call_sid, number=number, caller_id=self.config.agent_number
            )
        except Exception as exc:
            log.warning("call %s: transfer failed (%s)", self.config.call_id, type(exc).__name__)
            self.recorder.event("transfer_failed", error=type(exc).__name__)
            self._start_speech("transfer-failed", TRANSFER_FAILED_LINE)
            return
        self.recorder.event("transfer")
        self.recorder.fields(transferred_to=number)
        self._ending = True
        raise _CallEnded("transferred")

    def _said_end_phrase(self) -> bool:
        last = next((m for m in reversed(self.history) if m["role"] == "assistant"), None)
        if not last or not self.config.end_call_phrases:
            return False
        spoken = " ".join(words_of(str(last.get("content", ""))))
        return any(" ".join(words_of(phrase)) in spoken for phrase in self.config.end_call_phrases)

    async def _hang_up(self, reason: str) -> None:
        self._ending = True
        self.ended_reason = reason
        with contextlib.suppress(Exception):
            await self.deps.control.hang_up(self.call_sid)
        with contextlib.suppress(Exception):
            await self.transport.close(1000)
        raise _CallEnded(reason)

    async def _finish_with(self, line: str, reason: str) -> None:
        """Say `line`, let it play, then hang up with `reason`."""
        if not self._ending:
            self._say_goodbye(line, reason)

    def _say_goodbye(self, line: str, reason: str) -> Speech:
        self._interrupt_current("ending")
        self.after.reason = reason
        self.after.action = ToolOutcome(result=None, action="end_call")
        speech = self._start_speech("goodbye", line)
        self._ending = True
        return speech

    # --- timers -------------------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(on_grid(WATCHDOG_S / 2, WATCHDOG_S))  # the next grid point
            now = self.clock()
            if not self._ending and now - self.started_at >= self.config.max_call_seconds:
                await self._finish_with(MAX_DURATION_GOODBYE, "max-duration")
            self._resolve_stale_barge_in(now)
            self._flush_dtmf(now)
            self._check_silence(now)

    def _resolve_stale_barge_in(self, now: float) -> None:
        barge_in = self._barge_in
        if barge_in is None or self._vad.is_speaking:
            return
        ended = barge_in.vad_ended_at
        stale = ended is not None and now - ended > BARGE_IN_RESOLVE_S
        if stale and not self._finals and not self._interim:
            self._resume_after_barge_in("no-transcript")
            self._timing, self._utt_onset, self._utt_end = TurnTiming(), None, None

    def _flush_dtmf(self, now: float) -> None:
        if not self._dtmf or (now - self._dtmf_at < 1.5 and self._dtmf[-1] != "#"):
            return
        digits = "".join(self._dtmf).rstrip("#")
        self._dtmf = []
        if self._producer is not None and not self._producer.done():
            self._interrupt_current("dtmf")
        text = f"(The caller pressed the keypad: {digits})"
        self._user_turn(text, TurnTiming(eos_at=now, final_at=now), self.call_time(), None)

    def _check_silence(self, now: float) -> None:
        busy = (
            self.playout.speech is not None
            or self._vad.is_speaking
            or self._finals
            or self._barge_in is not None
            or self._ending
        )
        if busy or now - self._last_activity < self.config.silence_timeout_s:
            return
        self._last_activity = now
        if not self._reprompted:
            self._reprompted = True
            self.recorder.event("silence_reprompt")
            self._start_speech("reprompt", REPROMPT_LINE)
            return
        self._spawn(self._finish_with(SILENCE_GOODBYE, "silence-timeout"))


async def _say(text: str) -> AsyncIterator[str]:
    yield text


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    """Until one of the two events is set."""
    waits = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


# --- the stream handler -----------------------------------------------------------------


class CallManager:
    """Accepts media streams: the transport's start, load the call, run its session."""

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps
        self.active: dict[str, CallSession] = {}
        """Live sessions by call id."""
        self._starting: set[str] = set()
        """Call ids whose stream is being admitted."""
        self._control_tasks: set[asyncio.Task[None]] = set()

    def control(
        self, call_id: str, action: Callable[[CallSession], Coroutine[Any, Any, None]]
    ) -> bool:
        """Run `action` on the live session of `call_id` in the background (it may last
        until the call ends); False when the call has no live session here."""
        session = self.active.get(call_id)
        if session is None:
            return False
        task = asyncio.get_running_loop().create_task(action(session), name="call-control")
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)
        return True

    async def handle(self, transport: MediaTransport) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                start = await transport.start()
        except TimeoutError:
            log.warning("media stream sent no start within %ss", HANDSHAKE_TIMEOUT_S)
            start = None
        if start is None:
            await transport.close(1008)
            return
        call_id = start.parameters.get("call_id", "")
        if call_id in self.active or call_id in self._starting:
            log.warning("second media stream for call %r refused", call_id[:40])
            await transport.close(1008)
            return
        self._starting.add(call_id)  # until it is active: a concurrent start is refused
        try:
            config = await self._admit(start, call_id)
        finally:
            self._starting.discard(call_id)
        if config is None:
            await transport.close(1008)
            return
        session = CallSession(
            config,
            transport,
            self.deps,
            stream_sid=start.stream_sid,
            call_sid=config.call_sid or start.call_sid,
        )
        self.active[call_id] = session
        try:
            await session.run()
        finally:
            self.active.pop(call_id, None)
            with contextlib.suppress(Exception):
                await transport.close(1000)

    async def _admit(self, start: StreamStart, call_id: str) -> AgentConfig | None:
        """The call's configuration, once the stream guard lets `start` through."""
        guard = self.deps.stream_guard
        if guard is not None and (why := await guard.refusal(start)) is not None:
            log.warning("media stream for call %r refused: %s", call_id[:40], why)
            return None
        config = await self.deps.store.load_config(call_id) if call_id else None
        if config is None:
            log.warning("media stream for unknown call %r refused", call_id[:40])
        return config
