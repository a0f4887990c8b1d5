"""The caller's audio into the transcriber and the VAD.

Role: each inbound frame, as the transport decodes it, goes into the STT stream's and the
VAD's buffers without a task switch (`on_audio`, 50 a second per call); one loop, woken
when a batch for the transcriber or a VAD window awaits, sends the audio, runs Silero and
hands the VAD's events to the call. It also maps the audio timeline onto the clock. What
the caller's speech means for the turn is the call's decision (`CallSession`).

Must not import FastAPI, SQLAlchemy, a vendor SDK, `api/`, `store/` or `voice_pipeline`.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pipeline.metrics import PipelineMetrics
from pipeline.providers import Clock, STTStream
from pipeline.vad import WINDOW_SAMPLES, VADEvent, VADSpeechStart, VADStream
from utils import FRAME_BYTES, SAMPLE_RATE

FRAME_S = FRAME_BYTES / SAMPLE_RATE


class Listener:
    """Feeds one call's STT stream (given by `attach()` before audio flows) and its VAD;
    `run()` is the inbound loop, calling `on_vad` for each VAD event in order."""

    def __init__(
        self,
        vad: VADStream,
        *,
        clock: Clock,
        metrics: PipelineMetrics,
        on_vad: Callable[[VADEvent], Awaitable[None]],
    ) -> None:
        self.vad = vad
        self.frames_dropped = 0
        """Inbound frames the VAD skipped after falling too far behind."""
        self._clock = clock
        self._metrics = metrics
        self._on_vad = on_vad
        self._stt: STTStream | None = None
        self._work = asyncio.Event()
        self._audio_t0: float | None = None
        self._frames_in = 0

    def attach(self, stt: STTStream) -> None:
        self._stt = stt

    def on_audio(self, frame: bytes) -> None:
        """One inbound frame (the transport's sink): buffered, and the loop woken if a
        batch is due."""
        # Frames are sent every 20 ms and never arrive early: the earliest arrival minus its
        # audio time maps the audio timeline onto the clock (robust to late reads).
        t0 = self._clock() - self._frames_in * FRAME_S
        self._frames_in += 1
        if self._audio_t0 is None or t0 < self._audio_t0:
            self._audio_t0 = t0
        assert self._stt is not None
        audio_waits = self._stt.push_audio(frame)
        if (self.vad.push(frame) or audio_waits) and not self._work.is_set():
            self._work.set()

    def to_clock(self, audio_time: float) -> float | None:
        """The clock reading at which the caller's audio reached `audio_time`."""
        return None if self._audio_t0 is None else self._audio_t0 + audio_time

    async def run(self) -> None:
        stt = self._stt
        assert stt is not None
        while True:
            await self._work.wait()
            self._work.clear()
            await stt.send_pending()
            dropped_before = self.vad.dropped_windows
            events = await self.vad.flush()
            if skipped := self.vad.dropped_windows - dropped_before:
                frames = skipped * WINDOW_SAMPLES // FRAME_BYTES
                self.frames_dropped += frames
                self._metrics.inbound_frames_dropped.inc(frames)
            for event in events:
                await self._on_vad(event)
                if isinstance(event, VADSpeechStart):
                    # the onset's audio goes to the transcriber now, not with a quiet batch
                    stt.caller_speaking(True)
                    await stt.send_pending()
