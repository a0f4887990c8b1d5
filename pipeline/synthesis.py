"""An utterance's text chunks into audio: TTS into the `Speech`, chunk by chunk, with the
fallback line when synthesis fails (never dead air while the line can still be spoken).

Must not import FastAPI, SQLAlchemy, a vendor SDK, `api/`, `store/` or `voice_pipeline`.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from pipeline.metrics import PipelineMetrics
from pipeline.playout import Playout
from pipeline.providers import Clock, TTSError, TTSProvider
from pipeline.speech import Chunk, Speech

log = logging.getLogger("ai_sdr.pipeline")


class Synthesis:
    """Synthesises one call's utterances with its voice into the playout."""

    def __init__(
        self,
        tts: TTSProvider,
        playout: Playout,
        *,
        voice: str,
        fallback_line: str,
        clock: Clock,
        metrics: PipelineMetrics,
        tag: str,
    ) -> None:
        self._tts = tts
        self._playout = playout
        self._voice = voice
        self._fallback_line = fallback_line
        self._clock = clock
        self._metrics = metrics
        self._tag = tag  # the call id, for logs

    async def speak(self, speech: Speech, texts: AsyncIterator[str]) -> None:
        """Every chunk of `texts` into `speech`, in order; the speech is complete after."""
        try:
            async with aclosing(texts) as chunks:  # type: ignore[type-var]
                async for text in chunks:
                    await self._synthesise(speech, text)
        finally:
            speech.producer_done = True
            self._playout.wake()

    async def _synthesise(self, speech: Speech, text: str) -> None:
        """One chunk; its mark is set once its audio is complete."""
        chunk = Chunk(text=text, start=len(speech.audio))
        speech.chunks.append(chunk)
        if speech.tts_request_at is None:
            speech.tts_request_at = self._clock()
        try:
            async with aclosing(self._tts.synthesize(text, voice=self._voice)) as audio:
                async for piece in audio:
                    await self._playout.append(speech, piece)
        except TTSError:
            self._metrics.provider_errors.labels("tts").inc()
            log.warning("call %s: TTS failed, speaking the fallback", self._tag)
            if not await self._fallback(speech):
                chunk.text = ""
        chunk.end = len(speech.audio)
        chunk.mark = f"s{speech.id}c{len(speech.chunks)}"
        self._playout.wake()

    async def _fallback(self, speech: Speech) -> bool:
        """TTS is failing: try once more with the short fallback line."""
        try:
            async with aclosing(
                self._tts.synthesize(self._fallback_line, voice=self._voice)
            ) as audio:
                async for piece in audio:
                    await self._playout.append(speech, piece)
            speech.chunks[-1].text = self._fallback_line
            return True
        except TTSError:
            return False
