"""Ollama language model: `providers.LLMProvider` on the `ollama` 0.6.x AsyncClient.

Role: streaming chat for live turns (text and whole tool calls), schema-constrained JSON for
post-call analysis, and a health probe. Maps every client, HTTP and timeout failure onto the
`providers.LLMError` tree:

    404                                   -> LLMModelNotFound
    connection refused / reset, 5xx, 429  -> LLMUnavailable
    connect timeout, no first chunk in time, stalled stream -> LLMTimeout
    mid-stream error line, other 4xx, invalid JSON from complete_json -> LLMError

The streaming generator always closes its HTTP response on exit, so a barge-in stops
generation on the server (a bare `break` would leave it running: PROTOCOLS C6).

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import httpx
import ollama

from adapters.http import provider_http_options
from config import Settings
from pipeline.providers import (
    LLMDelta,
    LLMError,
    LLMModelNotFound,
    LLMTimeout,
    LLMUnavailable,
    Message,
    ToolCall,
)

log = logging.getLogger("ai_sdr." + __name__)

KEEP_ALIVE = "10m"
"""Keep the model loaded between turns: a cold load takes seconds."""


class OllamaLLM:
    """`LLMProvider` for one Ollama server. Owns an httpx pool: call `aclose()` at exit."""

    def __init__(
        self,
        settings: Settings,
        *,
        chunk_timeout_s: float = 15.0,
        read_timeout_s: float = 120.0,
        health_timeout_s: float = 2.0,
    ) -> None:
        # httpx's read timeout must outlast a whole non-streamed completion (complete_json);
        # streaming uses the tighter first-token and between-chunk timeouts below.
        timeout = httpx.Timeout(read_timeout_s, connect=settings.OLLAMA_CONNECT_TIMEOUT_S)
        self._client = ollama.AsyncClient(
            host=settings.OLLAMA_HOST, timeout=timeout, **provider_http_options()
        )
        self._first_token_timeout_s = settings.OLLAMA_FIRST_TOKEN_TIMEOUT_S
        self._chunk_timeout_s = chunk_timeout_s
        self._health_timeout_s = health_timeout_s

    async def aclose(self) -> None:
        # ollama 0.6.3 leaves AsyncClient.close() unannotated
        await self._client.close()  # type: ignore[no-untyped-call]

    async def stream_chat(
        self,
        messages: list[Message],
        *,
        model: str,
        temperature: float,
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[LLMDelta, None]:
        """Deltas with text and/or whole tool calls; the last one has `done=True`."""
        # With stream=True the await only builds the generator; the request starts at the
        # first iteration, so errors surface from `_next` below.
        try:
            parts = await self._client.chat(
                model=model,
                messages=messages,
                tools=tools,
                stream=True,
                options={"temperature": temperature},
                keep_alive=KEEP_ALIVE,
                think=False,
            )
        except Exception as exc:  # request validation only: nothing is sent yet
            raise _map_error(exc) from exc
        async with contextlib.aclosing(cast(AsyncGenerator[Any, None], parts)):
            timeout_s = self._first_token_timeout_s
            while (part := await _next(parts, timeout_s)) is not None:
                timeout_s = self._chunk_timeout_s
                delta = _to_delta(part)
                if delta.text or delta.tool_calls or delta.done:
                    yield delta

    async def complete_json(
        self, messages: list[Message], *, model: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """One schema-constrained answer at temperature 0, parsed. Output that is not a JSON
        object raises `LLMError` (schema validation is the caller's job)."""
        try:
            response = await self._client.chat(
                model=model,
                messages=messages,
                stream=False,
                format=schema,
                options={"temperature": 0},
                keep_alive=KEEP_ALIVE,
                think=False,
            )
        except Exception as exc:
            raise _map_error(exc) from exc
        return _parse_object(response.message.content or "")

    async def healthy(self) -> bool:
        """Whether the server lists its models (`GET /api/tags`) within `health_timeout_s`."""
        try:
            async with asyncio.timeout(self._health_timeout_s):
                await self._client.list()
        except Exception as exc:  # a probe answers yes or no; the reason is for debugging
            log.debug("ollama health probe failed: %s", type(exc).__name__)
            return False
        return True


async def _next(parts: AsyncIterator[Any], timeout_s: float) -> Any:
    """The next streamed part within `timeout_s`, None at the end, or a mapped LLMError."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(parts, None)
    except TimeoutError as exc:
        raise LLMTimeout(f"ollama sent nothing for {timeout_s:g} s", provider="ollama") from exc
    except Exception as exc:
        raise _map_error(exc) from exc


def _to_delta(part: Any) -> LLMDelta:
    message = part.message
    calls = [
        ToolCall(name=call.function.name, arguments=dict(call.function.arguments or {}))
        for call in message.tool_calls or []
    ]
    return LLMDelta(text=message.content or "", tool_calls=calls, done=bool(part.done))


def _parse_object(content: str) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        raise LLMError("ollama returned invalid JSON", provider="ollama") from exc
    if not isinstance(value, dict):
        raise LLMError("ollama returned JSON that is not an object", provider="ollama")
    return value


def _map_error(exc: BaseException) -> LLMError:
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, ollama.ResponseError):
        return _map_status(exc.status_code, exc.error)
    if isinstance(exc, httpx.TimeoutException):
        return LLMTimeout(f"ollama timed out ({type(exc).__name__})", provider="ollama")
    # httpx.ConnectError when streaming; the builtin ConnectionError when not.
    if isinstance(exc, httpx.TransportError | ConnectionError | OSError):
        return LLMUnavailable(f"ollama unreachable ({type(exc).__name__})", provider="ollama")
    return LLMError(f"ollama failed ({type(exc).__name__})", provider="ollama")


def _map_status(status: int, error: str) -> LLMError:
    if status == 404:
        return LLMModelNotFound(f"ollama: {error}", provider="ollama")
    if status >= 500 or status == 429:
        return LLMUnavailable(f"ollama HTTP {status}: {error}", provider="ollama")
    if status == -1:
        return LLMError(f"ollama stream error: {error}", provider="ollama")
    return LLMError(f"ollama HTTP {status}: {error}", provider="ollama")
