"""Provider contracts: the small protocols the voice pipeline talks to, their event types,
and the error tree. Vendor adapters (`stt_deepgram`, `tts_deepgram`, `llm_ollama`) implement
them; `voice_pipeline` depends only on this module.

Must not import FastAPI, SQLAlchemy or any vendor SDK.

Exception tree::

    ProviderError                 a vendor failed; `.provider` names it
    ├── STTError                  live transcription could not be (re)established
    ├── TTSError                  synthesis failed (after the adapter's own retry)
    └── LLMError
        ├── LLMUnavailable        connection refused / reset, 5xx
        ├── LLMTimeout            no connection or no first token in time
        └── LLMModelNotFound      the configured model is not on the server (404)

Audio everywhere is G.711 mu-law, 8 kHz, mono, as Twilio sends it: no resampling.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

PROVIDER_HTTP_LIMITS = httpx.Limits(
    max_connections=1024, max_keepalive_connections=512, keepalive_expiry=30.0
)
"""Connection pool of the provider HTTP clients (Ollama, Deepgram speak), given to their
transport (`provider_http_transport`; aiohttp keeps up to `max_connections` open, idle ones
for `keepalive_expiry`). Every live call may hold a streaming request to each at once; a
pool of 20 idle connections (httpx's default) would open a new TCP (and, in production,
TLS) connection for most requests past 20 concurrent answers."""


def provider_http_options() -> dict[str, Any]:
    """What the provider SDKs' httpx clients are built with: `provider_http_transport()` and
    the response hook that lets a closed response be freed at once (`release_streams`)."""
    return {
        "transport": provider_http_transport(),
        "event_hooks": {"response": [release_streams]},
    }


async def release_streams(response: httpx.Response) -> None:
    """httpx binds a response's stream back to the response (`BoundAsyncStream` keeps it to
    set `elapsed` on close), so every provider response, with its request, headers and
    aiohttp response, is a reference cycle that only a garbage collection frees. Streams
    last seconds and survive into the oldest generation: at 100 calls they were most of
    what each full collection (27-49 ms, every 20-30 s) had to free. Wrapped here, the
    bound stream is dropped once closed, and the response goes as soon as its last user
    lets it go."""
    response.stream = _ReleasingStream(response.stream)


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, bound: httpx.AsyncByteStream | httpx.SyncByteStream) -> None:
        self._bound: Any = bound

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._bound is None:
            raise httpx.StreamClosed()
        return cast(AsyncIterator[bytes], self._bound.__aiter__())

    async def aclose(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None:
            await bound.aclose()


def provider_http_transport() -> httpx.AsyncBaseTransport:
    """The transport under the provider SDKs' httpx clients: aiohttp's (C parser, plain
    asyncio streams) instead of httpcore on anyio. The SDKs and httpx's API stay as they
    are; a streamed request costs about a third of the CPU (BENCHMARKS.md, fourth round),
    and the two SDKs stream every answer token and every TTS chunk of a live call.
    Timeouts map onto aiohttp's (connect, read, pool), and aiohttp's errors onto httpx's."""
    return _ProviderTransport(limits=PROVIDER_HTTP_LIMITS)


class _ProviderTransport(AiohttpTransport):
    """httpx-aiohttp 0.1.12 maps every aiohttp connection error, a refused connection or a
    reset mid-body included, to `httpx.ConnectTimeout`. Only aiohttp's timeouts are
    timeouts here: a refused connection is `ConnectError`, a broken one `ReadError`, as
    with httpx's own transport (the adapters tell "down" from "slow" by these)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            raise _untimed(exc, request) from exc.__cause__
        response.stream = _ProviderStream(response.stream, request)  # type: ignore[arg-type]
        return response


class _ProviderStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner, self._request = inner, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.ConnectTimeout as exc:
            raise _untimed(exc, self._request) from exc.__cause__

    async def aclose(self) -> None:
        await self._inner.aclose()


def _untimed(exc: httpx.ConnectTimeout, request: httpx.Request) -> httpx.TransportError:
    cause = exc.__cause__
    if cause is None or isinstance(cause, TimeoutError):  # aiohttp's timeouts subclass it
        return exc
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc), request=request)
    return httpx.ReadError(str(exc), request=request)


Clock = Callable[[], float]
"""Monotonic seconds. Injected so that latency is measured where it happens."""

default_clock: Clock = time.monotonic

Message = dict[str, Any]
"""A chat message in Ollama's shape: role, content, optional tool_calls / tool_name."""


class ProviderError(Exception):
    provider = "provider"

    def __init__(self, message: str, *, provider: str | None = None) -> None:
        super().__init__(message)
        if provider:
            self.provider = provider


class STTError(ProviderError):
    provider = "stt"


class TTSError(ProviderError):
    provider = "tts"


class LLMError(ProviderError):
    provider = "llm"


class LLMUnavailable(LLMError):
    pass


class LLMTimeout(LLMError):
    pass


class LLMModelNotFound(LLMError):
    pass


# --- speech to text ---------------------------------------------------------------------


@dataclass(slots=True)
class Transcript:
    """A Deepgram `Results` message. `start`/`end` are seconds of the audio stream."""

    text: str
    is_final: bool
    speech_final: bool
    start: float = 0.0
    end: float = 0.0
    from_finalize: bool = False
    received_at: float = 0.0


@dataclass(slots=True)
class SpeechStarted:
    timestamp: float
    received_at: float = 0.0


@dataclass(slots=True)
class UtteranceEnd:
    last_word_end: float
    received_at: float = 0.0


STTEvent = Transcript | SpeechStarted | UtteranceEnd


class STTStream(Protocol):
    """One live transcription stream for one call. Survives socket drops (the adapter
    reconnects and replays buffered audio); raises STTError from `events()` only when it
    has given up."""

    reconnects: int

    async def send_audio(self, mulaw: bytes) -> None: ...

    def push_audio(self, mulaw: bytes) -> bool:
        """Queue audio without waiting; True when `send_pending()` has a batch to send."""
        ...

    async def send_pending(self) -> None: ...

    def caller_speaking(self, speaking: bool) -> None:
        """A hint from the pipeline's VAD: the caller started or stopped speaking."""
        ...

    async def finalize(self) -> None: ...

    def events(self) -> AsyncIterator[STTEvent]: ...


class STTProvider(Protocol):
    def open(self, *, language: str, tag: str = "") -> AbstractAsyncContextManager[STTStream]: ...


# --- language model ---------------------------------------------------------------------


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(slots=True)
class LLMDelta:
    """One streamed piece of an answer: text, and/or complete tool calls."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    done: bool = False


class LLMProvider(Protocol):
    def stream_chat(
        self,
        messages: list[Message],
        *,
        model: str,
        temperature: float,
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[LLMDelta, None]:
        """An async generator of deltas. Use it inside `contextlib.aclosing` so that
        cancellation closes the HTTP stream and the server stops generating."""
        ...

    async def complete_json(
        self, messages: list[Message], *, model: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """Schema-constrained, non-streaming completion parsed as JSON (may still be invalid
        against the schema: the caller validates)."""
        ...


# --- text to speech ---------------------------------------------------------------------


class TTSProvider(Protocol):
    def synthesize(self, text: str, *, voice: str) -> AsyncGenerator[bytes, None]:
        """An async generator of raw mu-law 8 kHz audio chunks for `text`."""
        ...
