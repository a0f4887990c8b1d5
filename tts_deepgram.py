"""Deepgram text-to-speech: `providers.TTSProvider` on deepgram-sdk 7.x REST streaming.

Role: `DeepgramTTS.synthesize()` streams raw mu-law 8 kHz chunks (`container=none`, so no WAV
header reaches Twilio) as they arrive. One retry when a request fails before any audio was
yielded; failures after audio started, or a second failure, raise `TTSError`. Closing the
generator (barge-in) closes the HTTP response.

Must not import FastAPI, SQLAlchemy or voice_pipeline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import cast

import httpx
from deepgram.core.api_error import ApiError
from deepgram.core.parse_error import ParsingError

from config import Settings
from providers import TTSError, provider_http_options
from stt_deepgram import SAMPLE_RATE, build_deepgram_client

log = logging.getLogger("ai_sdr." + __name__)

_RETRIABLE_STATUS = {408, 429}
"""Besides 5xx: statuses where the same request can succeed a moment later."""


class DeepgramTTS:
    """`TTSProvider` over `POST /v1/speak`. Owns its httpx client: call `aclose()` at exit."""

    def __init__(self, settings: Settings, *, timeout_s: float = 10.0, retries: int = 1) -> None:
        # Read timeout bounds time to first byte and gaps between chunks.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=3.0), **provider_http_options()
        )
        self._client = build_deepgram_client(settings, httpx_client=self._http)
        self._retries = retries

    async def aclose(self) -> None:
        await self._http.aclose()

    async def synthesize(self, text: str, *, voice: str) -> AsyncGenerator[bytes, None]:
        if not text.strip():
            return
        for attempt in range(self._retries + 1):
            started = False
            try:
                async with contextlib.aclosing(self._request(text, voice)) as chunks:
                    async for chunk in chunks:
                        started = True
                        yield chunk
                return
            except (ApiError, ParsingError, httpx.HTTPError) as exc:
                reason = _describe(exc)
                if started or attempt == self._retries or not _retriable(exc):
                    raise TTSError(f"deepgram speak failed: {reason}", provider="deepgram") from exc
                log.warning("deepgram speak failed (%s); retrying", reason)

    def _request(self, text: str, voice: str) -> AsyncGenerator[bytes, None]:
        # An async generator: iterate it, never await it (PROTOCOLS B6).
        chunks = self._client.speak.v1.audio.generate(
            text=text,
            model=voice,
            encoding="mulaw",
            sample_rate=SAMPLE_RATE,
            container="none",
        )
        return cast(AsyncGenerator[bytes, None], chunks)


def _retriable(exc: Exception) -> bool:
    if isinstance(exc, ApiError):
        status = exc.status_code or 0
        return status >= 500 or status in _RETRIABLE_STATUS
    return True  # transport errors and timeouts


def _describe(exc: Exception) -> str:
    """Status or error class only: ApiError's str() carries headers and the body."""
    if isinstance(exc, ApiError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__
