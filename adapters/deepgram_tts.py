"""Deepgram text-to-speech: `providers.TTSProvider` on deepgram-sdk 7.x, over the speak
WebSocket (`DeepgramStreamingTTS`, the default) or REST streaming (`DeepgramTTS`), chosen by
DEEPGRAM_TTS_TRANSPORT (`build_tts`).

REST: `DeepgramTTS.synthesize()` streams raw mu-law 8 kHz chunks (`container=none`, so no WAV
header reaches Twilio) as they arrive. One retry when a request fails before any audio was
yielded; failures after audio started, or a second failure, raise `TTSError`. Closing the
generator (barge-in) closes the HTTP response.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from deepgram.core.api_error import ApiError
from deepgram.core.parse_error import ParsingError
from deepgram.speak.v1.types import SpeakV1Text
from websockets.exceptions import ConnectionClosed, WebSocketException

from adapters.deepgram import SAMPLE_RATE, build_deepgram_client, raw_socket
from adapters.http import provider_http_options
from config import Settings
from pipeline.providers import TTSError

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


def build_tts(settings: Settings) -> DeepgramTTS | DeepgramStreamingTTS:
    if settings.DEEPGRAM_TTS_TRANSPORT == "rest":
        return DeepgramTTS(settings)
    return DeepgramStreamingTTS(settings)


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


# --- the speak WebSocket ---------------------------------------------------------------------

_WS_ERRORS = (WebSocketException, OSError, TimeoutError)
LIMITED_S = 60.0
"""After Deepgram refuses a socket with 429, the pool keeps to the sockets it has this long."""
SPARE_BACKOFF_S = 5.0
"""After a spare socket could not be opened, no other is tried this long (the requests that
need sockets still open their own, with their retry)."""
_RETRIABLE_CLOSE = {1001, 1006, 1011, 1012, 1013, 1014}
"""Close codes after which the same text may be spoken on another socket."""


@dataclass(eq=False)
class _SpeakSocket:
    """One open speak WebSocket: the SDK's socket client and the stack that closes it."""

    voice: str
    conn: Any
    stack: contextlib.AsyncExitStack
    flushes: deque[float] = field(default_factory=deque)
    idle_since: float = 0.0

    @property
    def closed(self) -> bool:
        raw = raw_socket(self.conn)
        return raw is not None and getattr(raw, "close_code", None) is not None

    def has_flush_room(self, now: float, limit: int, window_s: float) -> bool:
        while self.flushes and now - self.flushes[0] >= window_s:
            self.flushes.popleft()
        return len(self.flushes) < limit


class DeepgramStreamingTTS:
    """`TTSProvider` over the speak WebSocket (PROTOCOLS B5): each chunk of an answer is one
    `Speak` + `Flush` on an open socket, its audio read until the matching `Flushed`.

    Against REST this saves the HTTP request per chunk (the SDK, httpx and aiohttp): about
    1.6 ms to the first audio byte at idle here, which is most of the TTS share of the
    pipeline overhead (BENCHMARKS.md, tenth round).

    Sockets are pooled per voice and serve one request at a time, the most recently used
    first; one left unused for `idle_close_s` is closed (see the spares below), so the pool
    shrinks to what the traffic uses. Deepgram allows `flush_limit` flushes per
    `flush_window_s` on a socket, so a socket that has used them rests and another one
    serves. At most `max_sockets` are open, fewer for `LIMITED_S` after Deepgram refused one
    with 429 (its concurrency limit counts them); a request that finds no socket free goes
    over REST (`DeepgramTTS`).

    Opening a socket is a TCP, TLS and upgrade handshake, several round trips to Deepgram,
    so no request should wait for one: `spare_sockets` more ready sockets (idle, with flushes
    left) per voice in use are opened in the background whenever a request leaves fewer.
    While a voice is in use, the idle close keeps one socket and its spares; once it has
    served no request for `idle_close_s`, a timer closes all of its sockets.

    A request whose generator is closed before its `Flushed` (a barge-in) leaves the socket
    with a `Clear` sent in the background; the socket rejoins the pool after its `Cleared`,
    or is closed. Failures before any audio: a pooled socket found closed is replaced, and
    one that dies at its request without an error close (the server may close idle sockets)
    is replaced once for free; then one retry on a new socket for upgrade failures of
    5xx/429, retriable close codes and timeouts; failures after audio started, or a second
    one, raise `TTSError`. Call `aclose()` at exit.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 3.0,
        retries: int = 1,
        max_sockets: int | None = None,
        flush_limit: int = 20,
        flush_window_s: float = 60.0,
        idle_close_s: float = 30.0,
        spare_sockets: int | None = None,
    ) -> None:
        self._client = build_deepgram_client(settings)
        self._rest = DeepgramTTS(settings, timeout_s=timeout_s, retries=retries)
        self._timeout_s, self._connect_timeout_s = timeout_s, connect_timeout_s
        self._retries = retries
        self._max_sockets = settings.DEEPGRAM_TTS_SOCKETS if max_sockets is None else max_sockets
        self._flush_limit, self._flush_window_s = flush_limit, flush_window_s
        self._idle_close_s = idle_close_s
        spare = settings.DEEPGRAM_TTS_SPARE_SOCKETS if spare_sockets is None else spare_sockets
        self._spare = spare
        self._warming: dict[str, int] = {}
        self._last_request: dict[str, float] = {}
        self._spares_after = 0.0
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._idle: dict[str, list[_SpeakSocket]] = {}
        self._open = 0
        self._limited_to, self._limited_until = 0, 0.0
        self._background: set[asyncio.Task[None]] = set()
        self.rest_fallbacks = 0
        """Requests sent over REST because every socket was busy or out of flushes."""
        self.inline_connects = 0
        """Requests that found no ready socket and waited for a new one's handshake (the
        spares are there to keep this near zero)."""

    @property
    def open_sockets(self) -> int:
        return self._open

    @property
    def idle_sockets(self) -> int:
        return sum(len(socks) for socks in self._idle.values())

    async def aclose(self) -> None:
        # Let sockets being cleared or closed finish (each is bounded by connect_timeout_s):
        # a task cancelled before it ran would leave its socket open.
        self._closing = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        if self._background:
            await asyncio.wait(set(self._background), timeout=self._connect_timeout_s + 1)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        idle = [sock for socks in self._idle.values() for sock in socks]
        self._idle.clear()
        await asyncio.gather(*(self._close(sock) for sock in idle), return_exceptions=True)
        await self._rest.aclose()

    async def synthesize(self, text: str, *, voice: str) -> AsyncGenerator[bytes, None]:
        if not text.strip():
            return
        attempt, free_replacement = 0, True
        while True:
            sock = self._take_idle(voice)
            reused = sock is not None
            self._last_request[voice] = asyncio.get_running_loop().time()
            self._keep_spares(voice)
            if sock is None:
                try:
                    sock = await self._new_socket(voice)
                except (ApiError, *_WS_ERRORS) as exc:
                    attempt = self._retry_or_raise(exc, attempt)
                    continue
                if sock is None:  # no socket to be had: this chunk goes over REST
                    self.rest_fallbacks += 1
                    async with contextlib.aclosing(self._rest.synthesize(text, voice=voice)) as c:
                        async for chunk in c:
                            yield chunk
                    return
                self.inline_connects += 1
            started, held = False, True
            try:
                async with contextlib.aclosing(self._speak_on(sock, text)) as chunks:
                    async for chunk in chunks:
                        started = True
                        yield chunk
                held = False
                self._put_idle(sock)
                return
            except _WS_ERRORS as exc:
                held = False
                self._spawn(self._close(sock))
                if started:
                    raise TTSError(f"deepgram speak failed: {_describe_ws(exc)}") from exc
                if reused and free_replacement and _went_away(exc):
                    free_replacement = False  # it died idle, not of this request
                    continue
                attempt = self._retry_or_raise(exc, attempt)
            finally:
                if held:  # closed or cancelled mid-request: clear the socket, then reuse it
                    self._spawn(self._clear_and_return(sock))

    def _retry_or_raise(self, exc: Exception, attempt: int) -> int:
        """The next attempt's number after a failure before any audio, or `TTSError`."""
        reason = _describe_ws(exc)
        if attempt >= self._retries or not _retriable_ws(exc):
            raise TTSError(f"deepgram speak failed: {reason}") from exc
        log.warning("deepgram speak socket failed (%s); retrying", reason)
        return attempt + 1

    # --- pool -----------------------------------------------------------------------------

    def _take_idle(self, voice: str) -> _SpeakSocket | None:
        idle = self._idle.get(voice)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        for i in range(len(idle) - 1, -1, -1):
            sock = idle[i]
            if sock.closed:
                del idle[i]
                self._spawn(self._close(sock))
            elif sock.has_flush_room(now, self._flush_limit, self._flush_window_s):
                del idle[i]
                return sock
        return None

    def _put_idle(self, sock: _SpeakSocket) -> None:
        if sock.closed or self._closing:
            self._spawn(self._close(sock))
            return
        sock.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(sock.voice, []).append(sock)
        self._close_unused()

    def _close_unused(self) -> None:
        """Reuse is most-recent first, so the oldest idle sockets are the ones a smaller pool
        would do without: close those unused for `idle_close_s`. A voice still in use keeps
        the socket its next request takes and the spares (closing them would only reopen
        them); one that has served nobody for that long keeps none. Re-armed on a timer
        while any socket is idle, so the pool also empties when the traffic stops."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for voice, idle in self._idle.items():
            in_use = now - self._last_request.get(voice, 0.0) <= self._idle_close_s
            keep = 1 + self._spare if in_use else 0
            while len(idle) > keep and now - idle[0].idle_since > self._idle_close_s:
                self._spawn(self._close(idle.pop(0)))
        if self._sweep_timer is None and not self._closing and any(self._idle.values()):
            self._sweep_timer = loop.call_later(self._idle_close_s, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        self._close_unused()

    def _ready(self, voice: str, enough: int) -> int:
        """Idle sockets of `voice` that could serve a request now, counted up to `enough`
        (the most recent first, as they are taken)."""
        now = asyncio.get_running_loop().time()
        limit, window = self._flush_limit, self._flush_window_s
        ready = 0
        for sock in reversed(self._idle.get(voice, ())):
            if ready >= enough:
                break
            ready += not sock.closed and sock.has_flush_room(now, limit, window)
        return ready

    def _keep_spares(self, voice: str) -> None:
        """Open sockets in the background until `spare_sockets` are ready for `voice`."""
        if self._closing or asyncio.get_running_loop().time() < self._spares_after:
            return
        wanted = self._spare - self._warming.get(voice, 0)
        for _ in range(wanted - self._ready(voice, wanted)):
            if self._open >= self._socket_limit():
                return
            self._warming[voice] = self._warming.get(voice, 0) + 1
            self._spawn(self._open_spare(voice))

    async def _open_spare(self, voice: str) -> None:
        try:
            sock = await self._new_socket(voice)
        except (ApiError, *_WS_ERRORS) as exc:
            # requests that need a socket open their own meanwhile, with their retry
            self._spares_after = asyncio.get_running_loop().time() + SPARE_BACKOFF_S
            log.warning("deepgram speak socket not opened ahead: %s", _describe_ws(exc))
            return
        finally:
            self._warming[voice] -= 1
        if sock is not None:
            self._put_idle(sock)

    def _socket_limit(self) -> int:
        if asyncio.get_running_loop().time() < self._limited_until:
            return min(self._limited_to, self._max_sockets)
        return self._max_sockets

    async def _new_socket(self, voice: str) -> _SpeakSocket | None:
        """A newly opened socket; None when the pool is at `max_sockets`, or Deepgram refuses
        another one (429, its concurrency limit: then the pool stops growing for
        `LIMITED_S`)."""
        if self._open >= self._socket_limit():
            return None
        try:
            return await self._connect(voice)
        except ApiError as exc:
            if exc.status_code != 429:
                raise
            self._limited_to = self._open
            self._limited_until = asyncio.get_running_loop().time() + LIMITED_S
            log.warning("deepgram refused another speak socket (429) with %d open", self._open)
            return None

    async def _connect(self, voice: str) -> _SpeakSocket:
        stack = contextlib.AsyncExitStack()
        self._open += 1
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                conn = await stack.enter_async_context(
                    self._client.speak.v1.connect(
                        model=voice, encoding="mulaw", sample_rate=SAMPLE_RATE
                    )
                )
        except BaseException:
            self._open -= 1
            await stack.aclose()
            raise
        return _SpeakSocket(voice=voice, conn=conn, stack=stack)

    async def _close(self, sock: _SpeakSocket) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):
            await sock.stack.aclose()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _clear_and_return(self, sock: _SpeakSocket) -> None:
        """Drop what the socket still has to say (`Clear`), read up to its `Cleared`, and
        put it back in the pool; close it if that fails or takes too long."""
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await sock.conn.send_clear()
                while _kind(await sock.conn.recv()) != "Cleared":
                    pass
        except (asyncio.CancelledError, Exception):
            await self._close(sock)
            return
        self._put_idle(sock)

    # --- one request ----------------------------------------------------------------------

    async def _speak_on(self, sock: _SpeakSocket, text: str) -> AsyncGenerator[bytes, None]:
        conn = sock.conn
        await conn.send_text(SpeakV1Text(text=text))
        await conn.send_flush()
        sock.flushes.append(asyncio.get_running_loop().time())
        while True:
            async with asyncio.timeout(self._timeout_s):
                message = await conn.recv()
            if isinstance(message, bytes | bytearray):
                yield bytes(message)
                continue
            kind = _kind(message)
            if kind == "Flushed":
                return
            if kind == "Warning":
                log.warning("deepgram speak warning: %s", _field(message, "code") or "?")


def _kind(message: Any) -> str | None:
    """A speak message's type. `Cleared` parses into the SDK's Flushed model (PROTOCOLS
    B6), so only the `type` field tells them apart."""
    if isinstance(message, bytes | bytearray):
        return None
    return cast(str | None, _field(message, "type"))


def _field(message: Any, name: str) -> Any:
    if isinstance(message, dict):
        return message.get(name)
    return getattr(message, name, None)


def _close_code(exc: BaseException) -> int | None:
    received = getattr(exc, "rcvd", None)
    return getattr(received, "code", None) if received is not None else None


def _went_away(exc: BaseException) -> bool:
    """The socket ended without blaming the request: no close frame, or a normal or
    going-away close."""
    return isinstance(exc, ConnectionClosed) and _close_code(exc) in (None, 1000, 1001)


def _retriable_ws(exc: Exception) -> bool:
    """As `_retriable` (an upgrade's status, transport errors), plus the close codes."""
    if isinstance(exc, ConnectionClosed):
        code = _close_code(exc)
        return code is None or code in _RETRIABLE_CLOSE
    return _retriable(exc)


def _describe_ws(exc: Exception) -> str:
    if isinstance(exc, ConnectionClosed):
        return f"socket closed ({_close_code(exc) or 'no close frame'})"
    return _describe(exc)
