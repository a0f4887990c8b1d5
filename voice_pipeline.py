"""Live calls: one `CallSession` per Twilio Media Stream.

Role: turn-taking, barge-in, streaming LLM -> TTS, outbound pacing with marks, timers and
provider faults for one call. It knows the provider protocols (`providers.py`), the VAD, and
the small protocols below; never FastAPI, SQLAlchemy or a concrete vendor.

Per call, one `asyncio.TaskGroup` runs the long-lived loops::

    _receive_loop   Twilio messages -> STT and VAD buffers (no task switch per frame),
                    marks, DTMF, stop; under `media_ws` the messages are pushed to the
                    call as they are read and this loop only waits for the end
    _inbound_loop   woken when a batch of STT audio or a VAD window awaits: sends the
                    audio, runs Silero, barge-in pause, Finalize on end of speech
    _stt_loop       transcripts -> end of turn, barge-in confirm/resume
    _pacer_loop     speech audio -> 20 ms media frames paced against the playback clock
    _watchdog_loop  silence timeout, max duration, barge-in resolution deadline

Each agent utterance is a `Speech` produced by its own task (LLM -> chunker -> TTS). Caller
speech while the agent is audible pauses it at once (Twilio `clear`); the transcript then
decides: backchannel or noise resumes from the byte the caller last heard, anything else
cancels the producer and the assistant turn keeps exactly what was heard.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import orjson

from pipeline.contracts import (
    AgentConfig,
    MediaTransport,
    PipelineDeps,
    ToolContext,
    ToolOutcome,
)
from pipeline.providers import (
    LLMError,
    Message,
    ProviderError,
    SpeechStarted,
    STTError,
    STTStream,
    ToolCall,
    Transcript,
    TTSError,
    UtteranceEnd,
)
from pipeline.speech import BargeIn, Chunk, EarlyAnswer, Speech, TurnTiming
from pipeline.text import SentenceChunker, is_backchannel, words_of
from pipeline.vad import (
    WINDOW_SAMPLES,
    VADPause,
    VADResume,
    VADSpeechEnd,
    VADSpeechStart,
    VADStream,
)
from utils import FRAME_BYTES, SAMPLE_RATE

log = logging.getLogger("ai_sdr.pipeline")

LEAD_S = 0.3
"""Outbound audio kept queued at Twilio ahead of the playback clock: enough to ride out
network jitter, little enough that a barge-in has little to clear."""
FRAME_S = FRAME_BYTES / SAMPLE_RATE
OUTBOUND_BYTES = 5 * FRAME_BYTES
"""Audio per outbound `media` message: 100 ms. Twilio buffers any length; each message costs
a JSON envelope, a WebSocket frame and a send syscall, so five frames per message cut the
busiest outbound path to a fifth. The lead (`LEAD_S`) is unchanged, and a `clear` empties
Twilio's buffer whatever the message size."""
LOW_WATER_S = 0.1
"""Below this much queued audio (the first message of a speech, or a slow TTS), whole frames
go out as soon as they exist instead of waiting for a full message."""
DEFAULT_PLAYOUT_LAG_S = 0.08
RESUME_BACKUP_S = 0.3
"""On resuming after a false barge-in, repeat this much: a little repetition after a pause
sounds natural; a skipped syllable does not."""
MAX_PLAYOUT_LAG_S = 1.0
MARK_GRACE_S = 1.0
"""How long after the end of the audio sent a speech counts as heard if its marks never
come back (Twilio returns each one as its audio plays; this only covers marks lost)."""
MAX_UNSENT_BYTES = 20 * SAMPLE_RATE
"""Synthesised audio waiting to be paced out; TTS waits beyond this (backpressure)."""
MAX_VAD_BACKLOG_S = 1.0
"""Audio the VAD may fall behind before it skips windows (counted as dropped frames)."""
MAX_MESSAGE_CHARS = 64 * 1024
BARGE_IN_RESOLVE_S = 1.5
"""After the caller's speech ends, how long to wait for a transcript before treating a
paused barge-in as noise and resuming."""
TOOL_FILLER_AFTER_S = 1.0
DEFAULT_FILLER = "One moment, please."
REPROMPT_LINE = "Are you still there?"
SILENCE_GOODBYE = "It seems we got disconnected. Feel free to call back anytime. Goodbye!"
MAX_DURATION_GOODBYE = "I'm sorry, we've reached the time limit for this call. Goodbye!"
STT_FAILED_LINE = "I'm sorry, I'm having trouble hearing you. Please call back later. Goodbye."
TRANSFER_FAILED_LINE = "I'm sorry, I couldn't connect you right now. Can I help with anything else?"
MAX_CONSECUTIVE_LLM_FAILURES = 3
HANDSHAKE_TIMEOUT_S = 10.0
WATCHDOG_S = 0.1
"""Timers (silence, max duration, DTMF, stale barge-in) are checked on this grid of the
loop's clock, the same instants for every call: one wake-up of the loop serves all of
them, where free-running ticks would wake it once per call (each wake-up from idle costs
tens of microseconds of CPU on a virtual machine: BENCHMARKS.md, fourth round)."""
PACER_GRID_S = 0.005
"""The pacer's waits end on this grid, for the same reason: the speaking calls' sends share
wake-ups. A send is at most 5 ms later than its lead allows, against a 300 ms lead."""


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
        self.history: list[Message] = [{"role": "system", "content": self._system_prompt()}]
        self._media_prefix = (
            f'{{"event":"media","streamSid":{json.dumps(stream_sid)},"media":{{"payload":"'
        )
        self._inbound_work = asyncio.Event()
        self._stt: STTStream | None = None
        self._vad = VADStream(
            deps.vad_batcher(),
            threshold=deps.vad_threshold,
            min_speech_ms=max(config.min_interrupt_speech_ms, 32),
            min_silence_ms=deps.end_of_speech_ms,
            pause_ms=deps.finalize_after_ms or None,
            max_backlog_s=MAX_VAD_BACKLOG_S,
            clock=self.clock,
        )
        self._audio_t0: float | None = None
        self._frames_in = 0
        # outbound
        self._speech: Speech | None = None
        self._producer: asyncio.Task[None] | None = None
        self._speech_ids = 0
        self._generation = 0
        self._play_end = 0.0
        self._playout_lag = DEFAULT_PLAYOUT_LAG_S
        self._paused = False
        self._wake_pacer = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._turn_seq = 0
        self._sent_more = asyncio.Event()
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
        # timers and bookkeeping
        self._last_activity = self.started_at
        self._reprompted = False
        self._llm_failures = 0
        self._pending_action: ToolOutcome | None = None
        self._final_reason: str | None = None
        self._ending = False
        self._tg: asyncio.TaskGroup | None = None
        self._writes: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        self.frames_dropped = 0
        self._pushed_end: asyncio.Future[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> str:
        """Run the call until hang-up; returns the ended reason."""
        metrics = self.deps.metrics
        metrics.calls_started.inc()
        metrics.calls_active.inc()
        writer = asyncio.create_task(self._writer_loop(), name=f"writes-{self.config.call_id}")
        self._write("stream_started", {"stream_sid": self.stream_sid, "call_sid": self.call_sid})
        try:
            async with self.deps.stt.open(
                language=self.config.language, tag=self.config.call_id
            ) as stt:
                self._stt = stt
                await self._run_loops()
        except* _CallEnded as ended:
            first = ended.exceptions[0]
            self.ended_reason = first.reason if isinstance(first, _CallEnded) else "error"
        except* STTError:
            log.warning("call %s: transcription failed for good", self.config.call_id)
            self.ended_reason = "error"
        except* Exception:
            log.exception("call %s: pipeline failure", self.config.call_id)
            self.ended_reason = "error"
        finally:
            self._record_unfinished_speech()
            self._write("finish", {"ended_reason": self.ended_reason})
            self._writes.put_nowait(None)
            await asyncio.shield(writer)
            metrics.calls_active.dec()
            metrics.calls_ended.labels(self.ended_reason).inc()
        return self.ended_reason

    async def _run_loops(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._receive_loop(), name="receive")
            tg.create_task(self._inbound_loop(), name="inbound")
            tg.create_task(self._stt_loop(), name="stt")
            tg.create_task(self._pacer_loop(), name="pacer")
            tg.create_task(self._watchdog_loop(), name="watchdog")
            if self.config.first_message_mode == "assistant_speaks_first" and (
                self.config.first_message
            ):
                self._start_speech("greeting", self.config.first_message)

    def call_time(self) -> float:
        return round(self.clock() - self.started_at, 3)

    def _system_prompt(self) -> str:
        prompt = self.config.system_prompt
        if self.config.caller_memory:
            prompt += "\n\nWhat you know from earlier calls with this caller:\n"
            prompt += self.config.caller_memory
        prompt += (
            "\n\nYou are speaking on a phone call: answer in short, natural spoken sentences, "
            "without lists, markdown or emoji."
        )
        return prompt

    # --- persistence (one writer task, in order, never on the audio path) ---------------

    def _write(self, kind: str, payload: Any) -> None:
        self._writes.put_nowait((kind, payload))

    async def _writer_loop(self) -> None:
        """Hand the store everything queued at once, in order, and wait for all of it: a
        burst (a turn and its events) then shares one group commit instead of one each."""
        ended = False
        while not ended:
            queued = [await self._writes.get()]
            while not self._writes.empty():
                queued.append(self._writes.get_nowait())
            ended = None in queued  # the last item: nothing is queued after it
            items = [item for item in queued if item is not None]
            # tasks start in creation order, and each queues its write in its first step
            results = await asyncio.gather(
                *(self._persist(*item) for item in items), return_exceptions=True
            )
            for (kind, _), result in zip(items, results, strict=True):
                if isinstance(result, BaseException):
                    log.error(
                        "call %s: could not persist %s",
                        self.config.call_id,
                        kind,
                        exc_info=result,
                    )

    async def _persist(self, kind: str, payload: Any) -> None:
        store, call_id = self.deps.store, self.config.call_id
        if kind == "turn":
            await store.add_turn(call_id, **payload)
        elif kind == "event":
            await store.add_event(call_id, payload[0], payload[1], payload[2])
        elif kind == "stream_started":
            await store.stream_started(call_id, **payload)
        elif kind == "fields":
            await store.set_fields(call_id, **payload)
        elif kind == "finish":
            await store.finish(call_id, **payload)

    def _next_seq(self) -> int:
        self._turn_seq += 1
        return self._turn_seq

    def _event(self, type_: str, **data: Any) -> None:
        self._write("event", (type_, data, self.call_time()))

    # --- inbound ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Read the stream until it ends. Where the transport can push text messages
        (`media_ws`), they arrive as calls to `_on_pushed` instead, and this loop only
        waits for the end: a `stop`, the socket's disconnect, or a failure in handling."""
        subscribe = getattr(self.transport, "subscribe", None)
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pushed_end = ended
        if subscribe is None or not subscribe(self._on_pushed):
            await self._read_messages()
            return
        reader = asyncio.create_task(self._read_until_end(ended), name="receive-rest")
        try:
            await ended
        finally:
            self._pushed_end = None
            reader.cancel()

    async def _read_messages(self) -> None:
        while True:
            text = await self.transport.receive_text()
            if text is None:
                raise _CallEnded(self._hangup_reason())
            self._on_text(text)

    async def _read_until_end(self, ended: asyncio.Future[None]) -> None:
        """With a pushing transport: what still comes through `receive_text()` (the
        disconnect, a binary message) ends `ended` the way the read loop would end."""
        try:
            await self._read_messages()
        except Exception as exc:
            if not ended.done():
                ended.set_exception(exc)

    def _on_pushed(self, text: str) -> None:
        ended = self._pushed_end
        if ended is None or ended.done():
            return  # the call is ending: later messages are not ours to handle
        try:
            self._on_text(text)
        except Exception as exc:  # a `stop`, or a failure: the receive loop raises it
            ended.set_exception(exc)

    def _on_text(self, text: str) -> None:
        message = self._parse(text)
        if message is None:
            return
        event = message.get("event")
        if event == "media":
            self._on_media(message)
        elif event == "mark":
            self._on_mark(message)
        elif event == "dtmf":
            self._on_dtmf(message)
        elif event == "stop":
            raise _CallEnded(self._hangup_reason())

    def _hangup_reason(self) -> str:
        return "customer-ended-call" if not self._ending else self.ended_reason

    def _parse(self, text: str) -> dict[str, Any] | None:
        if len(text) > MAX_MESSAGE_CHARS:
            self._malformed("oversize message")
            return None
        try:
            message = orjson.loads(text)  # 50 a second per call: a quarter of json's time
        except orjson.JSONDecodeError:
            self._malformed("invalid JSON")
            return None
        if not isinstance(message, dict):
            self._malformed("not a JSON object")
            return None
        return message

    def _malformed(self, why: str) -> None:
        self.deps.metrics.malformed_messages.inc()
        log.warning("call %s: ignored media stream message (%s)", self.config.call_id, why)

    def _on_media(self, message: dict[str, Any]) -> None:
        media = message.get("media")
        if not isinstance(media, dict) or media.get("track", "inbound") != "inbound":
            return
        try:
            frame = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            self._malformed("bad base64 payload")
            return
        if not frame:
            return
        # Frames are sent every 20 ms and never arrive early: the earliest arrival minus its
        # audio time maps the audio timeline onto the clock (robust to late reads).
        t0 = self.clock() - self._frames_in * FRAME_S
        self._frames_in += 1
        if self._audio_t0 is None or t0 < self._audio_t0:
            self._audio_t0 = t0
        assert self._stt is not None
        audio_waits = self._stt.push_audio(frame)
        if (self._vad.push(frame) or audio_waits) and not self._inbound_work.is_set():
            self._inbound_work.set()

    def _on_dtmf(self, message: dict[str, Any]) -> None:
        digit = str((message.get("dtmf") or {}).get("digit", ""))[:1]
        if not digit:
            return
        self._dtmf.append(digit)
        self._dtmf_at = self.clock()
        self._last_activity = self._dtmf_at
        self._event("dtmf", digit=digit)

    def _audio_to_clock(self, audio_time: float) -> float | None:
        return None if self._audio_t0 is None else self._audio_t0 + audio_time

    async def _inbound_loop(self) -> None:
        assert self._stt is not None
        while True:
            await self._inbound_work.wait()
            self._inbound_work.clear()
            await self._stt.send_pending()
            dropped_before = self._vad.dropped_windows
            events = await self._vad.flush()
            if skipped := self._vad.dropped_windows - dropped_before:
                frames = skipped * WINDOW_SAMPLES // FRAME_BYTES
                self.frames_dropped += frames
                self.deps.metrics.inbound_frames_dropped.inc(frames)
            for event in events:
                if isinstance(event, VADSpeechStart):
                    self._on_speech_start(event)
                    # the onset's audio goes to the transcriber now, not with a quiet batch
                    self._stt.caller_speaking(True)
                    await self._stt.send_pending()
                elif isinstance(event, VADPause):
                    self._flushed_silence = event.silence_start
                    self._timing.eos_at = self._audio_to_clock(event.silence_start)
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
        if self._speech is not None and not self._paused and self._barge_in is None:
            self._pause_for_barge_in(event)

    async def _on_speech_end(self, event: VADSpeechEnd) -> None:
        self._last_activity = self.clock()
        self._utt_end = event.end
        self._timing.eos_at = self._audio_to_clock(event.end)
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
        if self._barge_in is not None:
            if not self._interrupts(text):
                self._resume_after_barge_in("backchannel")
                return
            self._confirm_barge_in()
        elif self._speech is not None:
            if not self._interrupts(text):
                self._event("backchannel", paused=False)
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
        idle = self._speech is None and self._barge_in is None and not self._ending
        if not (self.deps.early_answers and idle and text):
            return
        if self._early is not None:
            if self._early.text == text:
                return
            self._drop_early("changed")
        # Timed from the pause the VAD is in (its caller checked `is_pausing`), not from
        # `_timing`: that pause's VADPause may still be queued in the inbound loop.
        pause_start = self._vad.pause_start
        eos_at = self._timing.eos_at if pause_start is None else self._audio_to_clock(pause_start)
        timing = TurnTiming(eos_at=eos_at, final_at=final_at)
        history = [*self.history, {"role": "user", "content": text}]
        speech, task = self._new_producer(
            "answer", lambda speech: self._answer(speech, text, timing, history)
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
        self._write(
            "turn",
            {
                "seq": self._next_seq(),
                "role": "user",
                "text": text,
                "start_s": round(onset or 0.0, 3),
                "end_s": round(end or self.call_time(), 3),
                "stt_final_ms": timing.ms(timing.final_at),
            },
        )
        self.history.append({"role": "user", "content": text})
        self._observe("stt_final", timing.ms(timing.final_at))
        if early is None:
            self._start_speech("answer", lambda speech: self._answer(speech, text, timing))
            return
        self.deps.metrics.early_answers.labels("used").inc()
        self._speech, self._producer, self._paused = early.speech, early.task, False
        early.speech.released.set()
        self._wake_pacer.set()

    # --- barge-in -----------------------------------------------------------------------

    def _agent_audible(self) -> bool:
        speech = self._speech
        if speech is None or self._paused:
            return False
        return self._play_end > self.clock() or speech.sent < len(speech.audio)

    def _played_bytes(self, speech: Speech) -> int:
        """What the caller has heard by now: the playback clock, shifted by the playout lag
        that returning marks reveal (network and the phone's jitter buffer)."""
        unplayed = max(0.0, self._play_end + self._playout_lag - self.clock()) * SAMPLE_RATE
        return max(int(speech.sent - unplayed), 0)

    def _pause_for_barge_in(self, event: VADSpeechStart) -> None:
        speech = self._speech
        assert speech is not None
        now = self.clock()
        played = self._played_bytes(speech)
        self._send_clear()
        self._rewind(speech, played)
        self._play_end = now
        self._paused = True
        onset_clock = self._audio_to_clock(event.onset) or now
        self._barge_in = BargeIn(speech=speech, heard=speech.heard_text(played))
        latency = max(now - onset_clock, 0.0)
        self.deps.metrics.barge_in_latency.observe(latency)
        self._event("barge_in", onset_s=round(event.onset, 3), latency_ms=round(latency * 1000, 1))

    def _rewind(self, speech: Speech, position: int) -> None:
        """Send again from `position`: Twilio dropped what was queued after it."""
        speech.sent = max(min(position, speech.sent), 0)
        for chunk in speech.chunks:
            if chunk.end is not None and chunk.end > speech.sent and not chunk.acked:
                chunk.mark_sent = False

    def _send_clear(self) -> None:
        self._generation += 1
        self._spawn(self._send(json.dumps({"event": "clear", "streamSid": self.stream_sid})))

    def _confirm_barge_in(self) -> None:
        barge_in = self._barge_in
        assert barge_in is not None
        self._barge_in = None
        self._paused = False
        self.deps.metrics.barge_ins.labels("interrupted").inc()
        if barge_in.speech is self._speech:
            self._interrupt_current("barge-in", heard=barge_in.heard)

    def _resume_after_barge_in(self, why: str) -> None:
        barge_in = self._barge_in
        self._barge_in = None
        self._paused = False
        self.deps.metrics.barge_ins.labels("resumed").inc()
        if barge_in is not None:
            self._event("barge_in_resumed", reason=why)
            speech = barge_in.speech
            self._rewind(speech, speech.sent - int(RESUME_BACKUP_S * SAMPLE_RATE))
        self._wake_pacer.set()

    def _interrupt_current(self, why: str, heard: str | None = None) -> None:
        """Cancel the current answer; history keeps exactly what the caller heard."""
        speech = self._speech
        if speech is None:
            return
        if heard is None:
            if self._agent_audible():
                self._send_clear()
            heard = speech.heard_text(self._played_bytes(speech))
        speech.cancelled = True
        if self._producer is not None:
            self._producer.cancel()
        self._close_speech(speech, heard, interrupted=True)
        self._event("interrupted", reason=why)

    def _close_speech(self, speech: Speech, text: str, *, interrupted: bool) -> None:
        if self._speech is not speech:
            return
        self._speech = None
        self._play_end = min(self._play_end, self.clock()) if interrupted else self._play_end
        speech.end_at = self.clock()
        speech.played.set()
        self._last_activity = self.clock()
        if text:
            self.history.append({"role": "assistant", "content": text})
        if text or interrupted:
            self._write(
                "turn",
                {
                    "seq": self._next_seq(),
                    "role": "assistant",
                    "text": text,
                    "start_s": round((speech.first_media_at or speech.end_at) - self.started_at, 3),
                    "end_s": round(speech.end_at - self.started_at, 3),
                    "interrupted": interrupted,
                    "tool_calls": speech.tool_calls,
                    **speech.latency,
                },
            )

    def _record_unfinished_speech(self) -> None:
        speech = self._speech
        if speech is not None:
            heard = speech.heard_text(self._played_bytes(speech))
            self._close_speech(speech, heard, interrupted=heard != speech.full_text())

    # --- speaking -----------------------------------------------------------------------

    def _start_speech(
        self, kind: str, texts: Callable[[Speech], AsyncIterator[str]] | str
    ) -> Speech:
        self._drop_early("superseded")
        speech, self._producer = self._new_producer(kind, texts)
        speech.released.set()
        self._speech = speech
        self._paused = False
        return speech

    def _new_producer(
        self, kind: str, texts: Callable[[Speech], AsyncIterator[str]] | str
    ) -> tuple[Speech, asyncio.Task[None]]:
        self._speech_ids += 1
        speech = Speech(id=self._speech_ids, kind=kind)
        chunks = self._say(texts) if isinstance(texts, str) else texts(speech)
        assert self._tg is not None
        return speech, self._tg.create_task(self._produce(speech, chunks), name=kind)

    async def _produce(self, speech: Speech, chunks: AsyncIterator[str]) -> None:
        """Synthesise each text chunk into `speech`; mark the end of each chunk."""
        try:
            async with aclosing(chunks) as texts:  # type: ignore[type-var]
                async for text in texts:
                    await self._synthesise(speech, text)
        finally:
            speech.producer_done = True
            self._wake_pacer.set()
        await speech.released.wait()
        await self._wait_played(speech)
        if self._speech is speech:
            self._close_speech(speech, speech.full_text(), interrupted=False)
        await self._after_speech()

    async def _synthesise(self, speech: Speech, text: str) -> None:
        chunk = Chunk(text=text, start=len(speech.audio))
        speech.chunks.append(chunk)
        if speech.tts_request_at is None:
            speech.tts_request_at = self.clock()
        try:
            async with aclosing(self.deps.tts.synthesize(text, voice=self.config.voice)) as audio:
                async for piece in audio:
                    await self._append_audio(speech, piece)
        except TTSError:
            self.deps.metrics.provider_errors.labels("tts").inc()
            log.warning("call %s: TTS failed, speaking the fallback", self.config.call_id)
            if not await self._append_fallback_audio(speech):
                chunk.text = ""
        chunk.end = len(speech.audio)
        chunk.mark = f"s{speech.id}c{len(speech.chunks)}"
        self._wake_pacer.set()

    async def _append_audio(self, speech: Speech, piece: bytes) -> None:
        if speech.first_audio_at is None:
            speech.first_audio_at = self.clock()
        while len(speech.audio) - speech.sent > MAX_UNSENT_BYTES:
            self._sent_more.clear()
            await self._sent_more.wait()
        speech.audio += piece
        self._wake_pacer.set()

    async def _append_fallback_audio(self, speech: Speech) -> bool:
        """TTS is failing: try once more with the short fallback line."""
        try:
            async with aclosing(
                self.deps.tts.synthesize(self.config.fallback_line, voice=self.config.voice)
            ) as audio:
                async for piece in audio:
                    await self._append_audio(speech, piece)
            speech.chunks[-1].text = self.config.fallback_line
            return True
        except TTSError:
            return False

    async def _wait_played(self, speech: Speech) -> None:
        """Until the caller has heard all of it (marks), with a clock-based safety net for
        marks that never come back: a second after the last audio sent should have played.
        The net is re-armed while audio is still unsent (the pacer sends only `LEAD_S`
        ahead), so it never fires before the end of what the caller has to hear."""
        while not speech.cancelled:
            if all(c.acked for c in speech.chunks) and speech.sent >= len(speech.audio):
                return
            deadline = max(self._play_end - self.clock(), 0) + MARK_GRACE_S
            waiter = asyncio.ensure_future(speech.played.wait())
            try:
                await asyncio.wait_for(waiter, timeout=deadline)
            except TimeoutError:
                all_sent = speech.sent >= len(speech.audio)
                if not self._paused and all_sent and self.clock() >= self._play_end:
                    return
            if speech.played.is_set():
                return

    async def _say(self, text: str) -> AsyncIterator[str]:
        yield text

    async def _pacer_loop(self) -> None:
        while True:
            await self._wake_pacer.wait()
            speech = self._speech
            if speech is None or self._paused or not self._has_sendable(speech):
                self._wake_pacer.clear()
                continue
            lead = self._play_end - self.clock()
            if lead > LEAD_S:
                await asyncio.sleep(_on_grid(lead - LEAD_S, PACER_GRID_S))
                continue
            await self._send_frame(speech)

    def _has_sendable(self, speech: Speech) -> bool:
        if speech.sent < len(speech.audio):
            return True
        return any(c.end is not None and not c.mark_sent for c in speech.chunks)

    async def _send_frame(self, speech: Speech) -> None:
        complete = speech.complete_bytes()
        available = len(speech.audio) - speech.sent
        size = min(OUTBOUND_BYTES, available)
        if 0 < size < OUTBOUND_BYTES and speech.sent + size > complete:
            # a short message only at the end of a chunk, or whole frames when the caller's
            # buffer runs low; otherwise wait for more audio
            lead = self._play_end - self.clock()
            if lead < LOW_WATER_S and size >= FRAME_BYTES:
                size -= size % FRAME_BYTES
            else:
                self._wake_pacer.clear()
                if size >= FRAME_BYTES:  # frames wait: send them by low water at the latest
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake_pacer.wait(), lead - LOW_WATER_S)
                    self._wake_pacer.set()
                return
        if size > 0:
            payload = speech.audio[speech.sent : speech.sent + size]
            speech.sent += size
            self._sent_more.set()
            now = self.clock()
            self._play_end = max(self._play_end, now) + size / SAMPLE_RATE
            if speech.first_media_at is None:
                speech.first_media_at = now
                self._first_media(speech)
            media = self._media_prefix + base64.b64encode(payload).decode() + '"}}'
            await self._send(media, generation=self._generation)
        for chunk in speech.chunks:
            if chunk.end is not None and not chunk.mark_sent and speech.sent >= chunk.end:
                chunk.mark_sent = True
                chunk.due = self._play_end
                await self._send(
                    json.dumps(
                        {
                            "event": "mark",
                            "streamSid": self.stream_sid,
                            "mark": {"name": f"{chunk.mark}.{self._generation}"},
                        }
                    )
                )

    def _on_mark(self, message: dict[str, Any]) -> None:
        name = str((message.get("mark") or {}).get("name", ""))
        mark, _, generation = name.rpartition(".")
        speech = self._speech
        if speech is None or generation != str(self._generation):
            return  # a mark returned by a clear: its audio was discarded, not heard
        for chunk in speech.chunks:
            if chunk.mark == mark and not chunk.acked:
                chunk.acked = True
                self._learn_lag(self.clock() - chunk.due)
        if speech.producer_done and all(c.acked for c in speech.chunks):
            speech.played.set()

    def _learn_lag(self, sample: float) -> None:
        # a returning mark overstates the lag by its trip back: resuming repeats a few
        # milliseconds rather than skipping any
        sample = min(max(sample, 0.0), MAX_PLAYOUT_LAG_S)
        self._playout_lag = 0.7 * self._playout_lag + 0.3 * sample

    async def _send(self, text: str, generation: int | None = None) -> None:
        """Writes in order, one at a time. Audio built before a `clear` (an older
        `generation`) is dropped rather than sent after it: the rewind resends it."""
        async with self._send_lock:
            if generation is not None and generation != self._generation:
                return
            try:
                await self.transport.send_text(text)
            except Exception:
                raise _CallEnded(self._hangup_reason()) from None

    def _spawn(self, coro: Any) -> None:
        assert self._tg is not None
        self._tg.create_task(coro)

    def _first_media(self, speech: Speech) -> None:
        timing = speech.timing
        if timing is None:
            return
        speech.latency["first_media_ms"] = timing.ms(speech.first_media_at)
        speech.latency["tts_first_audio_ms"] = timing.ms(speech.first_audio_at)
        if speech.llm_request_at is not None:  # an answer (a fixed line has no LLM request)
            speech.latency["llm_request_ms"] = timing.ms(speech.llm_request_at)
            if timing.llm_first_token_at is not None:
                waited = timing.llm_first_token_at - speech.llm_request_at
                self.deps.metrics.provider_latency.labels("llm").observe(waited)
        speech.latency["tts_request_ms"] = timing.ms(speech.tts_request_at)
        if speech.tts_request_at is not None and speech.first_audio_at is not None:
            waited = speech.first_audio_at - speech.tts_request_at
            self.deps.metrics.provider_latency.labels("tts").observe(waited)
        self._observe("first_media", speech.latency["first_media_ms"])
        self._observe("tts_first_audio", speech.latency["tts_first_audio_ms"])

    def _observe(self, stage: str, ms: float | None) -> None:
        self.deps.metrics.observe_turn(stage, None if ms is None else ms / 1000)

    # --- answering ----------------------------------------------------------------------

    async def _answer(
        self,
        speech: Speech,
        text: str,
        timing: TurnTiming,
        history: list[Message] | None = None,
    ) -> AsyncIterator[str]:
        """`history` ends with the caller's turn (default: the call's history, which has it
        already; an early answer passes a copy with the turn the call has yet to take)."""
        speech.timing = timing
        speech.latency["stt_final_ms"] = timing.ms(timing.final_at)
        messages = await self._messages_for(text, timing, history)
        speech.latency["retrieval_ms"] = timing.retrieval_ms
        tools = self.deps.tools.schemas(self.config) if self.deps.tools else []
        speech.llm_request_at = self.clock()  # the first round's request goes out now
        for _round in range(4):  # tool rounds
            calls: list[ToolCall] = []
            chunker = SentenceChunker()
            try:
                async with aclosing(
                    self.deps.llm.stream_chat(
                        messages,
                        model=self.config.llm_model,
                        temperature=self.config.temperature,
                        tools=tools or None,
                    )
                ) as deltas:
                    async for delta in deltas:
                        if timing.llm_first_token_at is None:
                            timing.llm_first_token_at = self.clock()
                            first_token_ms = timing.ms(timing.llm_first_token_at)
                            speech.latency["llm_first_token_ms"] = first_token_ms
                            self._observe("llm_first_token", first_token_ms)
                        calls.extend(delta.tool_calls)
                        for chunk in chunker.push(delta.text):
                            yield chunk
                self._llm_failures = 0
            except LLMError as exc:
                await speech.released.wait()  # an early answer's failure counts once used
                async for line in self._llm_failed(exc):
                    yield line
                return
            if rest := chunker.flush():
                yield rest
            if not calls:
                return
            await speech.released.wait()  # tools act: never for a turn that may not be over
            outcome_lines = await self._run_tools(speech, calls, messages)
            for line in outcome_lines:
                yield line
            if self._pending_action is not None:
                return

    async def _llm_failed(self, exc: ProviderError) -> AsyncIterator[str]:
        self._llm_failures += 1
        self.deps.metrics.provider_errors.labels("llm").inc()
        log.warning("call %s: LLM failed (%s)", self.config.call_id, type(exc).__name__)
        self._event("provider_error", provider="llm", error=type(exc).__name__)
        if self._llm_failures >= MAX_CONSECUTIVE_LLM_FAILURES:
            self._pending_action = ToolOutcome(result=None, action="end_call")
            self._final_reason = "error"
            yield "I'm sorry, I'm having technical trouble. Please call back later. Goodbye."
            return
        yield self.config.fallback_line

    async def _messages_for(
        self, text: str, timing: TurnTiming, history: list[Message] | None = None
    ) -> list[Message]:
        messages = list(self.history if history is None else history)
        retriever = self.deps.retriever
        if retriever is None:
            return messages
        started = self.clock()
        try:
            context = await retriever.context_for(self.config.agent_id, text)
        except Exception:
            log.exception("call %s: knowledge retrieval failed", self.config.call_id)
            context = ""
        timing.retrieval_ms = round((self.clock() - started) * 1000, 2)
        self.deps.metrics.observe_turn("retrieval", timing.retrieval_ms / 1000)
        if context:
            messages.insert(len(messages) - 1, {"role": "system", "content": context})
        return messages

    async def _run_tools(
        self, speech: Speech, calls: list[ToolCall], messages: list[Message]
    ) -> list[str]:
        """Run tool calls to completion even if the answer is interrupted: a started side
        effect is never abandoned, and the call and its result enter history at once (the
        result fills in when the tool finishes, whatever happened to this answer)."""
        runner = self.deps.tools
        request = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        speech.tool_calls.extend(request)
        if runner is None:
            return []
        assistant: Message = {"role": "assistant", "content": "", "tool_calls": request}
        pending = [
            {"role": "tool", "tool_name": c.name, "content": '{"status": "running"}'} for c in calls
        ]
        messages.extend([assistant, *pending])
        self.history.extend([assistant, *pending])
        lines: list[str] = []
        for call, result_message in zip(calls, pending, strict=True):
            ctx = ToolContext(self.config, self.call_sid, _idempotency_key(self.config, call))
            task = asyncio.ensure_future(runner.run(call, ctx))
            task.add_done_callback(functools.partial(self._tool_finished, message=result_message))
            done, _ = await asyncio.wait({task}, timeout=TOOL_FILLER_AFTER_S)
            if not done:
                filler = runner.filler_for(self.config, call.name) or DEFAULT_FILLER
                await self._synthesise(speech, filler)
            outcome = await asyncio.shield(task)
            if outcome.action is not None:
                self._pending_action = outcome
                said_goodbye = outcome.action == "end_call" and speech.full_text()
                if outcome.say and not said_goodbye:
                    lines.append(outcome.say)
        return lines

    def _tool_finished(self, task: asyncio.Future[ToolOutcome], *, message: Message) -> None:
        if task.cancelled():
            message["content"] = json.dumps({"error": "cancelled"})
            return
        error = task.exception()
        if error is not None:
            message["content"] = json.dumps({"error": type(error).__name__})
            return
        outcome = task.result()
        result = outcome.result
        message["content"] = result if isinstance(result, str) else json.dumps(result, default=str)
        self._event("tool_called", name=message["tool_name"], action=outcome.action)

    async def _after_speech(self) -> None:
        """Once the caller heard the last words: act on end-call phrases and tool actions."""
        action = self._pending_action
        if action is None and self._said_end_phrase():
            action = ToolOutcome(result=None, action="end_call")
        if action is None:
            return
        self._pending_action = None
        if action.action == "transfer" and action.transfer_to:
            await self._transfer(action.transfer_to)
            return
        await self._hang_up(self._final_reason or "assistant-ended-call")

    async def _transfer(self, number: str) -> None:
        try:
            await self.deps.control.transfer(
                self.call_sid, number=number, caller_id=self.config.agent_number
            )
        except Exception as exc:
            log.warning("call %s: transfer failed (%s)", self.config.call_id, type(exc).__name__)
            self._event("transfer_failed", error=type(exc).__name__)
            self._start_speech("transfer-failed", TRANSFER_FAILED_LINE)
            return
        self._event("transfer")
        self._write("fields", {"transferred_to": number})
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
        if self._ending:
            return
        self._interrupt_current("ending")
        self._final_reason = reason
        self._pending_action = ToolOutcome(result=None, action="end_call")
        self._start_speech("goodbye", line)
        self._ending = True

    # --- timers -------------------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(_on_grid(WATCHDOG_S / 2, WATCHDOG_S))  # the next grid point
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
            self._speech is not None
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
            self._event("silence_reprompt")
            self._start_speech("reprompt", REPROMPT_LINE)
            return
        self._spawn(self._finish_with(SILENCE_GOODBYE, "silence-timeout"))


def _on_grid(delay: float, grid: float, now: float | None = None) -> float:
    """`delay`, lengthened to end on the next multiple of `grid` of the loop's clock (`now`:
    its reading, by default read here)."""
    if now is None:
        now = asyncio.get_running_loop().time()
    return delay + (-(now + delay)) % grid


def _idempotency_key(config: AgentConfig, call: ToolCall) -> str:
    arguments = json.dumps(call.arguments, sort_keys=True, default=str)
    return f"{config.call_id}:{call.name}:{arguments}"


# --- the stream handler -----------------------------------------------------------------


class CallManager:
    """Accepts Media Streams: handshake, load the call, run its session."""

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps
        self.active: dict[str, CallSession] = {}

    async def handle(self, transport: MediaTransport) -> None:
        start = await self._handshake(transport)
        if start is None:
            await transport.close(1008)
            return
        params = start.get("customParameters") or {}
        call_id = str(params.get("call_id", "")) if isinstance(params, dict) else ""
        config = await self.deps.store.load_config(call_id) if call_id else None
        if config is None:
            log.warning("media stream for unknown call %r refused", call_id[:40])
            await transport.close(1008)
            return
        session = CallSession(
            config,
            transport,
            self.deps,
            stream_sid=str(start.get("streamSid", "")),
            call_sid=str(start.get("callSid", "")),
        )
        self.active[call_id] = session
        try:
            await session.run()
        finally:
            self.active.pop(call_id, None)
            with contextlib.suppress(Exception):
                await transport.close(1000)

    async def _handshake(self, transport: MediaTransport) -> dict[str, Any] | None:
        """Read until `start`; `connected` and early frames are skipped."""
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                while (text := await transport.receive_text()) is not None:
                    try:
                        message = json.loads(text) if len(text) <= MAX_MESSAGE_CHARS else None
                    except ValueError:
                        message = None
                    if isinstance(message, dict) and message.get("event") == "start":
                        start = message.get("start")
                        return start if isinstance(start, dict) else None
                    if isinstance(message, dict) and message.get("event") == "stop":
                        return None
        except TimeoutError:
            log.warning("media stream sent no start within %ss", HANDSHAKE_TIMEOUT_S)
        return None
