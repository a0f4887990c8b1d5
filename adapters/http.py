"""The HTTP plumbing under the provider SDKs (Ollama, Deepgram speak): their httpx clients
run on aiohttp's transport with a large keep-alive pool, and closed responses are freed at
once instead of waiting for a garbage collection.

Checked against httpx 0.28.1 and httpx-aiohttp 0.1.12 (see `_ProviderTransport`); with
another version the plain `httpx.AsyncHTTPTransport` is the fallback that behaves the same,
at about three times the CPU per streamed request.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
Of ours, imports only: nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

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
