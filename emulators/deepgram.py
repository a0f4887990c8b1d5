"""Deepgram emulator: live STT on the `/v1/listen` WebSocket and TTS on `/v1/speak` (REST
POST and WebSocket), speaking the wire protocol of PROTOCOLS B1-B5 so the real
`deepgram-sdk` 7.x client can be pointed at it through `DeepgramClientEnvironment`.

Listen does not recognise words. It segments the received audio by energy and gives each
detected utterance the next line of a script. All timestamps in messages are audio time
(bytes received / byte rate); each message is then held back by a configured wall-clock
latency, in order, as a real service would.

Speak returns a clearly non-silent tone of `tts_ms_per_char` per character of text. Each
REST speak request's timing (received, first audio byte written, configured
`tts_first_byte_ms`; a WebSocket flush is timed from its Flush) is served at
`GET /emulator/timings` as `{"tts": [...]}` (see
`emulators.base.timings_route`).

Of ours, imports only: emulators, utils.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Scope
from starlette.websockets import WebSocket, WebSocketDisconnect

from emulators.base import (
    RECORDS_KEPT,
    AbortConnection,
    PacedResponse,
    ThreadedServer,
    abort_connection,
    config_from,
    timings_route,
)
from utils import mulaw_decode, mulaw_encode

DEFAULT_LISTEN_SCRIPT = [
    "Hi, yes, this is Sam speaking.",
    "Sure, I have a couple of minutes.",
    "We are a team of about twenty people.",
    "Tuesday afternoon works for me.",
    "Great, thanks. Bye.",
]
IDLE_CLOSE_REASON = (
    "Deepgram did not receive audio data or a text message within the timeout window. "
    "See https://dpgr.am/net0001"
)
FRAME_S = 0.02
"""Listen segments audio in 20 ms frames, the size Twilio sends."""


@dataclass
class DeepgramConfig:
    api_key: str | None = None
    """When set, requests must carry `Authorization: Token <api_key>` (else 401)."""
    listen_script: list[str] | dict[str, list[str]] = field(
        default_factory=lambda: list(DEFAULT_LISTEN_SCRIPT)
    )
    """Transcript per detected utterance, in order; or a dict keyed by the `tag` query
    parameter ("*" = fallback). Each connection consumes its own copy."""

    # segmentation, in audio time
    speech_rms_threshold: float = 400.0
    """RMS of int16 samples per 20 ms frame above which the frame is speech."""
    min_speech_ms: int = 80
    """Voiced audio needed before an onset counts as an utterance (and SpeechStarted)."""
    word_gap_ms: int = 120
    """Silences shorter than this never end an utterance, whatever `endpointing` says."""
    interim_interval_ms: int = 250
    words_per_second: float = 3.0
    """Growth rate of the interim transcript prefix."""
    default_endpointing_ms: int = 10
    """Deepgram's default when the client sends no `endpointing`."""

    # wall-clock latency of the messages listen sends
    speech_started_delay_ms: int = 20
    interim_delay_ms: int = 80
    stt_final_delay_ms: int = 150
    finalize_delay_ms: int = 20
    finalize_continuation_ms: int = 600
    """After a Finalize cut an utterance (at a pause, or while voice went on), voice resuming
    this soon (audio time) continues the same script line: the line's words all went out in
    the finalized segment, so the continuation's segment is empty instead of taking the
    next line."""
    idle_timeout_s: float = 10.0

    # speak
    speak_socket_limit: int | None = None
    """Open speak WebSockets allowed at once (a project's concurrency limit); an upgrade past
    it is refused with 429. None: no limit."""
    tts_first_byte_ms: int = 150
    tts_ms_per_char: float = 65.0
    tts_chunk_bytes: int = 1600
    tts_speed: float = 4.0
    """Audio is streamed this many times faster than real time."""
    tts_level: float = 0.25
    """Peak level of the synthetic voice, as a fraction of full scale."""

    model_name: str = "general-nova-3"
    model_arch: str = "nova-3"
    model_version: str = "2025-01-01.0"


# --- records ---------------------------------------------------------------------------------


@dataclass
class ListenRecord:
    """What one listen connection received and sent. Times are `time.monotonic()`; audio
    times are seconds of audio received when the event happened."""

    id: int
    query: dict[str, str]
    tags: list[str]
    opened_at: float
    closed_at: float | None = None
    close_reason: str | None = None
    """"client", "close_stream", "idle_timeout", "dropped" or "server_stop"."""
    audio_bytes: int = 0
    audio_messages: int = 0
    """Binary (audio) messages received."""
    controls: list[dict[str, Any]] = field(default_factory=list)
    """Control messages received: {"type", "time", "audio_time", "message"}."""
    sent: list[dict[str, Any]] = field(default_factory=list)
    """Messages sent: {"time", "message"}."""
    utterances: list[str] = field(default_factory=list)
    """Script lines given to detected utterances, in order."""

    def messages(self, type_: str | None = None) -> list[dict[str, Any]]:
        return [s["message"] for s in self.sent if type_ is None or s["message"]["type"] == type_]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages("Results") if m["is_final"]]

    def snapshot(self) -> ListenRecord:
        return replace(
            self,
            query=dict(self.query),
            tags=list(self.tags),
            controls=list(self.controls),
            sent=list(self.sent),
            utterances=list(self.utterances),
        )


@dataclass
class SpeakRecord:
    text: str
    transport: str
    """"rest" or "ws"."""
    query: dict[str, str]
    time: float
    status: int = 200
    audio_bytes: int = 0
    cancelled: bool = False
    # timing (None for a request that sent no audio)
    received: float | None = None
    """`time.monotonic()` once the request body was read (REST) or its Flush arrived (ws)."""
    first: float | None = None
    """`time.monotonic()` once the first audio chunk was handed to the transport."""
    configured_ms: float | None = None
    """The `tts_first_byte_ms` this request was given."""
    socket: int | None = None
    """Over ws: which speak WebSocket carried it, numbered from 1 in accept order."""


# --- audio -----------------------------------------------------------------------------------


@cache
def _voice_pcm(sample_rate: int, level: float) -> np.ndarray:
    """One second of a 300/500/700 Hz mix with a 4 Hz syllable-like swell (never below 60%
    of peak). Every component has a whole number of periods per second, so the buffer
    can be repeated without clicks."""
    t = np.arange(sample_rate) / sample_rate
    mix = sum(np.sin(2 * np.pi * f * t) for f in (300.0, 500.0, 700.0)) / 3.0
    envelope = 0.8 + 0.2 * np.sin(2 * np.pi * 4.0 * t)
    pcm: np.ndarray = np.round(mix * envelope * level * 32767 / np.max(np.abs(mix)))
    return pcm.astype(np.int16)


@cache
def _voice_bytes(encoding: str, sample_rate: int, level: float) -> bytes:
    pcm = _voice_pcm(sample_rate, level)
    return mulaw_encode(pcm) if encoding == "mulaw" else pcm.astype("<i2").tobytes()


def _cyclic(buffer: bytes, offset: int, size: int) -> bytes:
    out = bytearray()
    while size > 0:
        start = offset % len(buffer)
        piece = buffer[start : start + size]
        out += piece
        offset += len(piece)
        size -= len(piece)
    return bytes(out)


def _wav_header(encoding: str, sample_rate: int, data_bytes: int) -> bytes:
    fmt_code, width = (7, 1) if encoding == "mulaw" else (1, 2)
    fmt = struct.pack("<HHIIHH", fmt_code, 1, sample_rate, sample_rate * width, width, width * 8)
    riff_size = 4 + (8 + len(fmt)) + (8 + data_bytes)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


@dataclass(frozen=True)
class AudioFormat:
    encoding: str
    sample_rate: int

    @property
    def width(self) -> int:
        return 1 if self.encoding == "mulaw" else 2

    @property
    def bytes_per_s(self) -> int:
        return self.sample_rate * self.width

    def decode(self, data: bytes) -> np.ndarray:
        if self.encoding == "mulaw":
            return mulaw_decode(data)
        return np.frombuffer(data, dtype="<i2")


SUPPORTED_ENCODINGS = ("mulaw", "linear16")
_DEFAULT_RATE = {"mulaw": 8000, "linear16": 24000}


def _tts_bytes(text: str, fmt: AudioFormat, ms_per_char: float) -> int:
    return round(len(text) * ms_per_char * fmt.sample_rate / 1000) * fmt.width


def _error_body(code: str, message: str) -> dict[str, str]:
    return {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}


def _flag(value: str | None, default: bool = False) -> bool:
    return default if value is None else value.lower() == "true"


# --- listen session --------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenOptions:
    """The listen query parameters the emulator acts on."""

    fmt: AudioFormat
    endpointing: bool
    endpointing_ms: int
    utterance_end_s: float | None
    interim_results: bool
    vad_events: bool
    channels: int

    @classmethod
    def parse(cls, query: dict[str, str], default_endpointing_ms: int) -> ListenOptions:
        """Raises ValueError for values Deepgram would reject."""
        encoding = query.get("encoding", "mulaw")
        if encoding not in SUPPORTED_ENCODINGS:
            raise ValueError(f"Bad encoding: {encoding}")
        rate = int(query.get("sample_rate") or (8000 if encoding == "mulaw" else 16000))
        endpointing = query.get("endpointing")
        ms = default_endpointing_ms
        if endpointing not in (None, "false", "true"):
            ms = int(endpointing)
        utterance_end = query.get("utterance_end_ms")
        return cls(
            fmt=AudioFormat(encoding, rate),
            endpointing=endpointing != "false",
            endpointing_ms=ms,
            utterance_end_s=int(utterance_end) / 1000 if utterance_end else None,
            interim_results=_flag(query.get("interim_results")),
            vad_events=_flag(query.get("vad_events")),
            channels=int(query.get("channels") or 1),
        )


@dataclass
class _Utterance:
    start: float
    end: float
    text: str
    next_interim: float

    @property
    def words(self) -> list[str]:
        return self.text.split()


class _ListenSession:
    """One `/v1/listen` connection: energy segmentation on the audio timeline, messages
    released in order by a sender task after their wall-clock latency."""

    def __init__(
        self, emu: DeepgramEmulator, ws: WebSocket, record: ListenRecord, options: ListenOptions
    ) -> None:
        self.emu, self.ws, self.record = emu, ws, record
        self.cfg, self.options = emu.config, options
        self.fmt = options.fmt
        self.frame_bytes = int(self.fmt.sample_rate * FRAME_S) * self.fmt.width
        self.endpointing = options.endpointing
        self.endpoint_s = max(options.endpointing_ms, self.cfg.word_gap_ms) / 1000
        self.utterance_end_s = options.utterance_end_s
        self.interim_results = options.interim_results
        self.vad_events = options.vad_events
        self.script = deque(emu.script_for(record.tags))
        self.request_id = str(uuid.uuid4())
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        self.last_due = 0.0
        self.last_activity = self.loop.time()
        self.sha = hashlib.sha256()
        self.pending = b""
        self.audio_time = 0.0
        self.last_voice_end = -1.0
        self.candidate_start: float | None = None
        self.candidate_voiced = 0.0
        self.utt: _Utterance | None = None
        self.mute_until_silence = False
        self.utterance_end_from: float | None = None
        self.closing = False
        self.continues_until = -1.0  # audio time until which new voice continues a line

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> str:
        sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._idle_watchdog())
        try:
            return await self._receive_loop(sender)
        finally:
            for task in (sender, watchdog):
                task.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)

    async def _receive_loop(self, sender: asyncio.Task[str | None]) -> str:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            self.last_activity = self.loop.time()
            if message.get("bytes") is not None:
                self._on_audio(message["bytes"])
            elif message.get("text") is not None:
                self._on_control(message["text"])
        if self.closing and not sender.done():
            # The client may hang up the moment it reads Metadata, while the sender is still
            # closing the socket; wait for it so the record says why the stream ended.
            await asyncio.wait({sender}, timeout=self.cfg.finalize_delay_ms / 1000 + 1.0)
        if sender.done() and not sender.cancelled() and sender.exception() is None:
            return sender.result() or "client"
        return "client"

    async def _send_loop(self) -> str | None:
        while True:
            due, item = await self.outbox.get()
            delay = due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if isinstance(item, tuple):
                code, reason, why = item
                with contextlib.suppress(Exception):
                    await self.ws.close(code, reason)
                return str(why)
            try:
                await self.ws.send_text(json.dumps(item))
            except (WebSocketDisconnect, OSError, RuntimeError):
                return None
            with self.emu.lock:
                self.record.sent.append({"time": time.monotonic(), "message": item})

    async def _idle_watchdog(self) -> None:
        timeout = self.cfg.idle_timeout_s
        while True:
            remaining = self.last_activity + timeout - self.loop.time()
            if remaining <= 0:
                self.closing = True
                self._close(1011, IDLE_CLOSE_REASON, "idle_timeout", delay=0.0)
                return
            await asyncio.sleep(remaining)

    def _emit(self, message: dict[str, Any], delay_ms: float) -> None:
        due = max(self.loop.time() + delay_ms / 1000, self.last_due)
        self.last_due = due
        self.outbox.put_nowait((due, message))

    def _close(self, code: int, reason: str, why: str, delay: float) -> None:
        due = max(self.loop.time() + delay, self.last_due)
        self.last_due = due
        self.outbox.put_nowait((due, (code, reason, why)))

    # --- input --------------------------------------------------------------------------

    def _on_control(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message.get("type")
        except (ValueError, AttributeError):
            message, kind = text, None
        with self.emu.lock:
            self.record.controls.append(
                {
                    "type": kind,
                    "time": time.monotonic(),
                    "audio_time": round(self.audio_time, 3),
                    "message": message,
                }
            )
        if self.closing:
            return
        if kind == "Finalize":
            self._finalize()
        elif kind == "CloseStream":
            self._close_stream()

    def _on_audio(self, data: bytes) -> None:
        with self.emu.lock:
            self.record.audio_bytes += len(data)
            self.record.audio_messages += 1
        self.sha.update(data)
        if self.closing:
            return
        buffer = self.pending + data
        frames = len(buffer) // self.frame_bytes
        usable = frames * self.frame_bytes
        self.pending = buffer[usable:]
        if not frames:
            return
        pcm = self.fmt.decode(buffer[:usable]).astype(np.float32).reshape(frames, -1)
        rms = np.sqrt(np.mean(pcm * pcm, axis=1))
        for voiced in (rms >= self.cfg.speech_rms_threshold).tolist():
            self._step(voiced)

    def _step(self, voiced: bool) -> None:
        t0 = self.audio_time
        t1 = self.audio_time = t0 + FRAME_S
        if voiced:
            self._on_voiced(t0, t1)
        else:
            self._on_unvoiced(t1)

    def _on_voiced(self, t0: float, t1: float) -> None:
        self.last_voice_end = t1
        if self.utt is not None:
            self.utt.end = t1
            self._maybe_interim(t1)
            return
        if self.mute_until_silence:
            # the cut utterance's voice goes on (its words went out with the Finalize): its
            # words end later, so no UtteranceEnd while it lasts
            if self.utterance_end_from is not None:
                self.utterance_end_from = round(t1, 3)
            return
        if self.candidate_start is None:
            self.candidate_start, self.candidate_voiced = t0, 0.0
        self.candidate_voiced += FRAME_S
        if self.candidate_voiced >= self.cfg.min_speech_ms / 1000 - 1e-9:
            self._begin_utterance(t1)

    def _on_unvoiced(self, t1: float) -> None:
        silence = t1 - self.last_voice_end
        gap = self.cfg.word_gap_ms / 1000
        if self.utt is not None and silence >= self.endpoint_s - 1e-9:
            self._finish(speech_final=self.endpointing, delay_ms=self.cfg.stt_final_delay_ms)
        if self.utt is None and silence > gap:
            if self.mute_until_silence:  # the cut utterance's voice just ended
                continuation = self.cfg.finalize_continuation_ms / 1000
                self.continues_until = max(self.continues_until, t1 + continuation)
            self.candidate_start = None
            self.mute_until_silence = False
        ue_from = self.utterance_end_from
        if self.utt is None and ue_from is not None and self.utterance_end_s is not None:
            self._maybe_utterance_end(t1, ue_from, self.utterance_end_s)

    def _maybe_utterance_end(self, t1: float, last_word_end: float, wait_s: float) -> None:
        if t1 - last_word_end < wait_s - 1e-9:
            return
        self.utterance_end_from = None
        message = {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_word_end}
        self._emit(message, self.cfg.interim_delay_ms)

    # --- utterances ---------------------------------------------------------------------

    def _begin_utterance(self, t1: float) -> None:
        start = self.candidate_start if self.candidate_start is not None else t1
        continuation = start <= self.continues_until
        text = "" if continuation or not self.script else self.script.popleft()
        self.continues_until = -1.0
        interval = self.cfg.interim_interval_ms / 1000
        self.utt = _Utterance(start=start, end=t1, text=text, next_interim=start + interval)
        self.candidate_start = None
        self.utterance_end_from = None
        with self.emu.lock:
            self.record.utterances.append(text)
        if self.vad_events:
            message = {"type": "SpeechStarted", "channel": [0], "timestamp": round(start, 3)}
            self._emit(message, self.cfg.speech_started_delay_ms)

    def _maybe_interim(self, t1: float) -> None:
        utt = self.utt
        if not self.interim_results or utt is None or t1 < utt.next_interim:
            return
        utt.next_interim += self.cfg.interim_interval_ms / 1000
        words = utt.words
        count = min(len(words), max(1, int((t1 - utt.start) * self.cfg.words_per_second)))
        message = self._results(utt, words[:count], t1, is_final=False, speech_final=False)
        self._emit(message, self.cfg.interim_delay_ms)

    def _finish(self, *, speech_final: bool, delay_ms: float, from_finalize: bool = False) -> None:
        utt, self.utt = self.utt, None
        assert utt is not None
        message = self._results(utt, utt.words, utt.end, is_final=True, speech_final=speech_final)
        message["from_finalize"] = from_finalize
        self._emit(message, delay_ms)
        if utt.words:
            self.utterance_end_from = round(utt.end, 3)

    def _finalize(self) -> None:
        silent = self.audio_time > self.last_voice_end
        self.candidate_start = None
        if self.utt is None:
            empty = _Utterance(self.audio_time, self.audio_time, "", self.audio_time)
            message = self._results(empty, [], self.audio_time, is_final=True, speech_final=False)
            message["from_finalize"] = True
            self._emit(message, self.cfg.finalize_delay_ms)
            return
        self._finish(speech_final=silent, delay_ms=self.cfg.finalize_delay_ms, from_finalize=True)
        self.mute_until_silence = not silent
        self.continues_until = self.audio_time + self.cfg.finalize_continuation_ms / 1000

    def _close_stream(self) -> None:
        if self.utt is not None:
            silent = self.audio_time > self.last_voice_end
            self._finish(speech_final=silent, delay_ms=self.cfg.finalize_delay_ms)
        self.closing = True
        self._emit(self._metadata(), self.cfg.finalize_delay_ms)
        self._close(1000, "", "close_stream", delay=0.0)

    # --- messages -----------------------------------------------------------------------

    def _results(
        self, utt: _Utterance, words: list[str], end: float, *, is_final: bool, speech_final: bool
    ) -> dict[str, Any]:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(end - utt.start, 3),
            "start": round(utt.start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": False,
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(words),
                        "confidence": 0.98 if words else 0.0,
                        "words": _timed_words(words, utt.start, max(end, utt.start)),
                    }
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": {
                    "name": self.cfg.model_name,
                    "version": self.cfg.model_version,
                    "arch": self.cfg.model_arch,
                },
                "model_uuid": self.emu.model_uuid,
            },
        }

    def _metadata(self) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self.sha.hexdigest(),
            "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "duration": round(self.record.audio_bytes / self.fmt.bytes_per_s, 3),
            "channels": self.options.channels,
        }


def _timed_words(words: list[str], start: float, end: float) -> list[dict[str, Any]]:
    """Spread `words` evenly over [start, end]."""
    if not words:
        return []
    step = (end - start) / len(words)
    timed = []
    for i, token in enumerate(words):
        bare = "".join(ch for ch in token.lower() if ch.isalnum() or ch in "'-") or token.lower()
        timed.append(
            {
                "word": bare,
                "start": round(start + i * step, 3),
                "end": round(start + (i + 1) * step, 3),
                "confidence": 0.98,
                "punctuated_word": token,
            }
        )
    return timed


# --- speak websocket -------------------------------------------------------------------------


class _SessionOver(Exception):
    """A speak fault ended the socket."""


class _SpeakSession:
    """One `/v1/speak` WebSocket: text is buffered until Flush; each flush is synthesised in
    order by a worker task; Clear drops buffered text and any audio not yet sent."""

    def __init__(
        self,
        emu: DeepgramEmulator,
        ws: WebSocket,
        fmt: AudioFormat,
        query: dict[str, Any],
        number: int,
    ):
        self.emu, self.ws, self.fmt, self.query, self.number = emu, ws, fmt, query, number
        self.buffer: list[str] = []
        self.jobs: asyncio.Queue[tuple[int, str, float]] = asyncio.Queue()
        self.sequence = 0
        self.worker: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.ws.send_json(self.emu.speak_metadata(self.query.get("model")))
        self.worker = asyncio.create_task(self._work())
        try:
            await self._receive_loop()
        finally:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                continue
            with contextlib.suppress(ValueError, AttributeError):
                data = json.loads(message["text"])
                if await self._on_message(data.get("type"), data):
                    return

    async def _on_message(self, kind: str | None, data: dict[str, Any]) -> bool:
        """Handle one client message; True when the session should end."""
        if kind == "Speak":
            self.buffer.append(str(data.get("text", "")))
        elif kind == "Flush":
            self.jobs.put_nowait((self.sequence, "".join(self.buffer), time.monotonic()))
            self.sequence += 1
            self.buffer.clear()
        elif kind == "Clear":
            await self._clear()
        elif kind == "Close":
            await self.jobs.join()
            await self.ws.close(1000)
            return True
        return False

    async def _clear(self) -> None:
        self.buffer.clear()
        while not self.jobs.empty():
            self.jobs.get_nowait()
            self.jobs.task_done()
        assert self.worker is not None
        self.worker.cancel()
        await asyncio.gather(self.worker, return_exceptions=True)
        self.worker = asyncio.create_task(self._work())
        await self.ws.send_json({"type": "Cleared", "sequence_id": self.sequence})
        self.sequence += 1

    async def _work(self) -> None:
        while True:
            sequence, text, received = await self.jobs.get()
            try:
                await self._speak(sequence, text, received)
            except _SessionOver:
                return  # the socket is closed or dropped: the receive loop sees it end
            finally:
                self.jobs.task_done()

    async def _speak(self, sequence: int, text: str, received: float) -> None:
        record = SpeakRecord(
            text=text,
            transport="ws",
            query=self.query,
            time=time.time(),
            received=received,
            socket=self.number,
        )
        self.emu.record_speak(record)
        failure, drop_after = self.emu.next_speak_fault()
        if failure is not None:
            # A server error ends the socket (1011, retry may help); a rejected request
            # (4xx) closes it as a policy violation (1008).
            record.status = failure[0]
            code = 1011 if failure[0] >= 500 else 1008
            await self.ws.close(code, f"{failure[0]}: {failure[1]}"[:120])
            raise _SessionOver
        record.configured_ms = self.emu.config.tts_first_byte_ms
        try:
            async for chunk in self.emu.speak_audio(text, self.fmt, drop_after=drop_after):
                await self.ws.send_bytes(chunk)
                if record.first is None:
                    record.first = time.monotonic()
                record.audio_bytes += len(chunk)
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        except AbortConnection:
            abort_connection(self.ws.scope)
            raise _SessionOver from None
        await self.ws.send_json({"type": "Flushed", "sequence_id": sequence})


# --- the emulator ----------------------------------------------------------------------------


class DeepgramEmulator(ThreadedServer):
    """`/v1/listen` (WebSocket) and `/v1/speak` (REST and WebSocket) on one server.

    Recorded (copies): `listen_connections` (ListenRecord per connection, in order),
    `speak_requests` (SpeakRecord, the last RECORDS_KEPT), counters `listen_connects`,
    `listen_refused`, `speak_connects` (speak WebSockets accepted); over HTTP,
    `GET /emulator/timings` (speak requests and flushes).
    Faults: `drop_listen_connections()`, `refuse_listen()`, `fail_next_speak()`,
    `drop_next_speak()`, `drop_speak_connections()`.
    """

    name = "deepgram"

    def __init__(
        self,
        config: DeepgramConfig | dict[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(host=host, port=port)
        self.config = config_from(DeepgramConfig, config, overrides)
        self.model_uuid = str(uuid.uuid4())
        self._listen: list[ListenRecord] = []
        self._live: dict[int, tuple[Scope, ListenRecord]] = {}
        self._speak: deque[SpeakRecord] = deque(maxlen=RECORDS_KEPT)
        self._speak_failures: deque[tuple[int, str]] = deque()
        self._speak_drops: deque[int] = deque()
        self._refuse_until = 0.0
        self._refuse_status = 503
        self.listen_connects = 0
        self.listen_refused = 0
        self.speak_connects = 0
        self._speak_live: dict[int, Scope] = {}

    # --- recorded state -----------------------------------------------------------------

    @property
    def listen_connections(self) -> list[ListenRecord]:
        with self.lock:
            return [r.snapshot() for r in self._listen]

    @property
    def live_listen_count(self) -> int:
        with self.lock:
            return len(self._live)

    @property
    def speak_requests(self) -> list[SpeakRecord]:
        with self.lock:
            return [replace(r) for r in self._speak]

    @property
    def speak_texts(self) -> list[str]:
        with self.lock:
            return [r.text for r in self._speak]

    def record_speak(self, record: SpeakRecord) -> None:
        with self.lock:
            self._speak.append(record)

    def next_speak_fault(self) -> tuple[tuple[int, str] | None, int | None]:
        """The fault armed for the next speak request, REST or WebSocket: a failure
        (status, message) and/or a drop after that many audio bytes."""
        with self.lock:
            failure = self._speak_failures.popleft() if self._speak_failures else None
            drop_after = self._speak_drops.popleft() if self._speak_drops else None
        return failure, drop_after

    def set_listen_script(self, lines: list[str], tag: str | None = None) -> None:
        """Script for connections opened from now on (all, or those tagged `tag`)."""
        with self.lock:
            if tag is None:
                self.config.listen_script = list(lines)
                return
            script = self.config.listen_script
            if not isinstance(script, dict):
                script = {"*": list(script)}
            script[tag] = list(lines)
            self.config.listen_script = script

    def script_for(self, tags: list[str]) -> list[str]:
        with self.lock:
            script = self.config.listen_script
            if not isinstance(script, dict):
                return list(script)
            for tag in tags:
                if tag in script:
                    return list(script[tag])
            return list(script.get("*", []))

    # --- faults -------------------------------------------------------------------------

    def drop_listen_connections(self, refuse_for_s: float = 0.0) -> int:
        """Abort every live listen socket at the TCP level (no close frame), like a network
        drop; optionally refuse new listen connections for `refuse_for_s` seconds.
        Returns the number of sockets dropped."""
        if refuse_for_s:
            self.refuse_listen(refuse_for_s)

        async def drop() -> int:
            with self.lock:
                live = list(self._live.values())
                for _, record in live:
                    record.close_reason = "dropped"
            return sum(abort_connection(scope) for scope, _ in live)

        return self.run_in_loop(drop())

    def drop_speak_connections(self) -> int:
        """Abort every open speak WebSocket at the TCP level, the way a server that closes
        idle sockets or a network drop looks to the client. Returns the number dropped."""

        async def drop() -> int:
            with self.lock:
                live = list(self._speak_live.values())
            return sum(abort_connection(scope) for scope in live)

        return self.run_in_loop(drop())

    def refuse_listen(self, seconds: float, status: int = 503) -> None:
        """Reject listen upgrades with HTTP `status` for the next `seconds`."""
        with self.lock:
            self._refuse_until = time.monotonic() + seconds
            self._refuse_status = status

    def fail_next_speak(self, count: int = 1, status: int = 500, message: str = "") -> None:
        """The next `count` speak requests fail with `status`: a REST response with that
        status, or (WebSocket) the socket closed at the flush, 1011 for 5xx else 1008."""
        with self.lock:
            for _ in range(count):
                self._speak_failures.append((status, message or "Internal server error"))

    def drop_next_speak(self, count: int = 1, after_bytes: int = 3200) -> None:
        """The next `count` speak requests (REST responses, or WebSocket flushes) send
        `after_bytes` of audio, then the TCP connection is dropped."""
        with self.lock:
            self._speak_drops.extend([after_bytes] * count)

    # --- app ----------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        routes = [
            WebSocketRoute("/v1/listen", self._listen_endpoint),
            WebSocketRoute("/v1/speak", self._speak_ws_endpoint),
            Route("/v1/speak", self._speak_rest_endpoint, methods=["POST"]),
            timings_route(self, "tts", lambda: self._speak),
        ]
        return Starlette(routes=routes)

    def _authorized(self, headers: Any) -> bool:
        key = self.config.api_key
        if not key:
            return True
        value = headers.get("authorization", "")
        return value in (f"Token {key}", f"token {key}", f"Bearer {key}")

    async def _deny(self, ws: WebSocket, status: int, code: str, message: str) -> None:
        await ws.send_denial_response(JSONResponse(_error_body(code, message), status))

    async def _listen_endpoint(self, ws: WebSocket) -> None:
        if not self._authorized(ws.headers):
            await self._deny(ws, 401, "INVALID_AUTH", "Invalid credentials.")
            return
        with self.lock:
            refusing = time.monotonic() < self._refuse_until
            if refusing:
                self.listen_refused += 1
        if refusing:
            await self._deny(ws, self._refuse_status, "SERVICE_UNAVAILABLE", "Try again later.")
            return
        try:
            options = ListenOptions.parse(dict(ws.query_params), self.config.default_endpointing_ms)
        except ValueError as exc:
            await self._deny(ws, 400, "INVALID_QUERY_PARAMETER", str(exc))
            return
        await ws.accept()
        await self._run_listen(ws, options)

    async def _run_listen(self, ws: WebSocket, options: ListenOptions) -> None:
        record = ListenRecord(
            id=0,
            query=dict(ws.query_params),
            tags=ws.query_params.getlist("tag"),
            opened_at=time.monotonic(),
        )
        with self.lock:
            self.listen_connects += 1
            record.id = self.listen_connects
            self._listen.append(record)
            self._live[record.id] = (ws.scope, record)
        reason = "server_stop"
        try:
            reason = await _ListenSession(self, ws, record, options).run()
        finally:
            if self.closing.is_set():
                reason = "server_stop"
            with self.lock:
                self._live.pop(record.id, None)
                record.closed_at = time.monotonic()
                record.close_reason = record.close_reason or reason

    async def _speak_ws_endpoint(self, ws: WebSocket) -> None:
        if not self._authorized(ws.headers):
            await self._deny(ws, 401, "INVALID_AUTH", "Invalid credentials.")
            return
        query = dict(ws.query_params)
        encoding = query.get("encoding", "linear16")
        if encoding not in SUPPORTED_ENCODINGS:
            await self._deny(ws, 400, "UNSUPPORTED_AUDIO_FORMAT", f"Bad encoding: {encoding}")
            return
        fmt = AudioFormat(encoding, int(query.get("sample_rate") or _DEFAULT_RATE[encoding]))
        limit = self.config.speak_socket_limit
        with self.lock:
            over = limit is not None and len(self._speak_live) >= limit
        if over:
            await self._deny(ws, 429, "TOO_MANY_REQUESTS", "Too many concurrent requests.")
            return
        await ws.accept()
        with self.lock:
            self.speak_connects += 1
            key = self.speak_connects
            self._speak_live[key] = ws.scope
        try:
            await _SpeakSession(self, ws, fmt, query, key).run()
        finally:
            with self.lock:
                self._speak_live.pop(key, None)

    async def _speak_rest_endpoint(self, request: Request) -> Response | PacedResponse:
        if not self._authorized(request.headers):
            return JSONResponse(_error_body("INVALID_AUTH", "Invalid credentials."), 401)
        query = dict(request.query_params)
        encoding = query.get("encoding", "linear16")
        if encoding not in SUPPORTED_ENCODINGS:
            message = f"Unsupported encoding: {encoding}"
            return JSONResponse(_error_body("UNSUPPORTED_AUDIO_FORMAT", message), 400)
        fmt = AudioFormat(encoding, int(query.get("sample_rate") or _DEFAULT_RATE[encoding]))
        try:
            text = str((await request.json()).get("text") or "")
        except (ValueError, AttributeError):
            text = ""
        record = SpeakRecord(
            text=text, transport="rest", query=query, time=time.time(), received=time.monotonic()
        )
        self.record_speak(record)
        if not text.strip():
            record.status = 400
            return JSONResponse(_error_body("INVALID_TEXT", "Text must not be empty."), 400)
        failure, drop_after = self.next_speak_fault()
        if failure is not None:
            record.status = failure[0]
            return JSONResponse(_error_body("INTERNAL_SERVER_ERROR", failure[1]), failure[0])
        return self._speak_response(text, fmt, query, record, drop_after)

    def _speak_response(
        self,
        text: str,
        fmt: AudioFormat,
        query: dict[str, Any],
        record: SpeakRecord,
        drop_after: int | None,
    ) -> PacedResponse:
        container = query.get("container", "wav")
        header = b""
        if container == "wav":
            data_bytes = _tts_bytes(text, fmt, self.config.tts_ms_per_char)
            header = _wav_header(fmt.encoding, fmt.sample_rate, data_bytes)
        record.configured_ms = self.config.tts_first_byte_ms

        async def body() -> AsyncIterator[bytes]:
            first = True
            async for chunk in self.speak_audio(text, fmt, drop_after=drop_after):
                if first and header:
                    chunk = header + chunk
                record.audio_bytes += len(chunk)
                yield chunk
                # resumed once the chunk was sent: PacedResponse asks for the next one
                if first:
                    record.first, first = time.monotonic(), False

        def cancelled() -> None:
            record.cancelled = True

        media = "audio/wav" if container == "wav" else f"audio/{fmt.encoding}"
        headers = {
            "dg-request-id": str(uuid.uuid4()),
            "dg-model-name": query.get("model", "aura-asteria-en"),
            "dg-char-count": str(len(text)),
        }
        return PacedResponse(body(), media_type=media, headers=headers, on_cancel=cancelled)

    async def speak_audio(
        self, text: str, fmt: AudioFormat, drop_after: int | None = None
    ) -> AsyncIterator[bytes]:
        """The synthetic voice for `text`: first chunk after `tts_first_byte_ms`, then paced
        at `tts_speed` times real time. Raises AbortConnection after `drop_after` bytes."""
        cfg = self.config
        total = _tts_bytes(text, fmt, cfg.tts_ms_per_char)
        voice = _voice_bytes(fmt.encoding, fmt.sample_rate, cfg.tts_level)
        chunk_size = max(fmt.width, cfg.tts_chunk_bytes - cfg.tts_chunk_bytes % fmt.width)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(cfg.tts_first_byte_ms / 1000)
        start, sent = loop.time(), 0
        while sent < total:
            if drop_after is not None and sent >= drop_after:
                raise AbortConnection
            size = min(chunk_size, total - sent)
            yield _cyclic(voice, sent, size)
            sent += size
            due = start + sent / fmt.bytes_per_s / max(cfg.tts_speed, 1e-3)
            if sent < total and due > loop.time():
                await asyncio.sleep(due - loop.time())

    def speak_metadata(self, model: str | None) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "request_id": str(uuid.uuid4()),
            "model_name": model or "aura-asteria-en",
            "model_version": "2025-01-01.0",
            "model_uuid": self.model_uuid,
        }


def expected_tts_bytes(text: str, ms_per_char: float = 65.0, sample_rate: int = 8000) -> int:
    """mu-law bytes the speak endpoint returns for `text` (container=none)."""
    return _tts_bytes(text, AudioFormat("mulaw", sample_rate), ms_per_char)


__all__ = [
    "DEFAULT_LISTEN_SCRIPT",
    "AudioFormat",
    "DeepgramConfig",
    "DeepgramEmulator",
    "ListenRecord",
    "SpeakRecord",
    "expected_tts_bytes",
]
