"""Shared machinery for the wire-level emulators: a real uvicorn server on 127.0.0.1 in a
daemon thread with its own event loop, a streaming response that notices client
disconnects, and small helpers for config dataclasses and waiting on recorded state.

Each emulator runs on its own loop so that it keeps real-time behaviour whatever the
caller's loop is doing (a test blocked in a synchronous SDK call, a benchmark loop busy
with 200 callers). Recorded state is written on the server thread under `self.lock` and
read by other threads through copying properties.

`GET /emulator/timings` (`timings_route`) serves, to another process, when each request
was received and when its first output went out, against the delay configured for it: the
emulator's own lateness (the benchmark reads it after a run).

Must not import: twilio, deepgram, ollama.
Of ours, imports only: nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol, Self, TypeVar

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

T = TypeVar("T")

_SCOPE_SERVER = "emulator.server"
_SCOPE_RAW_RECEIVE = "emulator.raw_receive"

RECORDS_KEPT = 100_000
"""Request records an emulator keeps (the most recent), so a long-running one stays bounded."""
TIMINGS_PATH = "/emulator/timings"


class AbortConnection(Exception):
    """Raised by a response body iterator to drop the TCP connection mid-response, the way
    a network failure or a crashed upstream looks to the client."""


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned in requirements.txt
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ThreadedServer:
    """Runs `build_app()` under uvicorn on 127.0.0.1 in a daemon thread.

    `port=0` picks a free port: the socket is bound here, before the thread starts, so
    `.port` is known as soon as `start()` returns.
    """

    name = "emulator"
    ws_protocol = "websockets-sansio"
    """uvicorn's `ws` setting: a protocol name, or "module:Class"."""
    http_protocol = "httptools"
    """uvicorn's `http` setting, the same way."""
    ws_max_size = 16 * 1024 * 1024  # uvicorn's default

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.lock = threading.RLock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Event | None = None
        self._error: BaseException | None = None

    # --- to implement -------------------------------------------------------------------

    def build_app(self) -> ASGIApp:
        raise NotImplementedError

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> Self:
        if self.running:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._outer_app(self.build_app()),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=self.http_protocol,
            ws=self.ws_protocol,
            ws_max_size=self.ws_max_size,
            # audio does not compress: negotiating permessage-deflate only burns CPU
            ws_per_message_deflate=False,
            timeout_graceful_shutdown=3,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"{self.name}:{self.port}", daemon=True
        )
        self._thread.start()
        self._wait_started(timeout)
        return self

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self._server and self._server.started):
            if self._error is not None or not self._thread or not self._thread.is_alive():
                raise RuntimeError(f"{self.name} failed to start") from self._error
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start within {timeout} s")
            time.sleep(0.005)

    def _run(self, sock: socket.socket) -> None:
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self._closing = asyncio.Event()
        try:
            assert self._server is not None
            loop.run_until_complete(self._server.serve(sockets=[sock]))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Close open connections (WebSockets get close code 1012, streaming HTTP responses
        are dropped), stop the server and join its thread."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def request_stop(self) -> None:
        """Begin stopping without waiting (see `stop_all`)."""
        if not self.running or self._server is None:
            return
        if self.loop is not None and self._closing is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._closing.set)
        self._server.should_exit = True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- cross-thread helpers -----------------------------------------------------------

    def run_in_loop(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the server's loop from another thread and return its result."""
        if self.loop is None or not self.running:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _outer_app(self, app: ASGIApp) -> ASGIApp:
        async def outer(scope: Scope, receive: Receive, send: Send) -> None:
            scope[_SCOPE_SERVER] = self
            scope[_SCOPE_RAW_RECEIVE] = receive
            await app(scope, receive, send)

        return outer

    @property
    def closing(self) -> asyncio.Event:
        """Set (on the server loop) when stop() begins."""
        assert self._closing is not None
        return self._closing


def stop_all(servers: list[ThreadedServer], timeout: float = 10.0) -> None:
    """Stop several servers in parallel."""
    for server in servers:
        server.request_stop()
    for server in servers:
        server.stop(timeout)


# --- connection-level helpers ---------------------------------------------------------------


def abort_connection(scope: Scope) -> bool:
    """Drop the TCP connection behind `scope` without a close handshake (no WebSocket close
    frame, no final HTTP chunk). Returns False when the transport cannot be reached.

    uvicorn hands each connection a `receive` bound to an object that owns the transport;
    this is the only way to reach it through ASGI.
    """
    receive = scope.get(_SCOPE_RAW_RECEIVE)
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or transport.is_closing():
        return False
    transport.abort()
    return True


def server_of(scope: Scope) -> ThreadedServer:
    server: ThreadedServer = scope[_SCOPE_SERVER]
    return server


async def wait_for_http_disconnect(receive: Receive) -> None:
    """Return once the HTTP client has gone away (the request body must be consumed)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_of(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class PacedResponse:
    """An ASGI streaming response whose body comes from an async iterator that sleeps to
    pace itself. Headers are sent with the first chunk, so a body that never yields looks
    like a stalled server. A client disconnect (or server stop) cancels the iterator and
    calls `on_cancel`; an iterator raising AbortConnection drops the TCP connection."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        status: int = 200,
        media_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers = [(b"content-type", media_type.encode())]
        self.headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.on_cancel = on_cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(
            _first_of(wait_for_http_disconnect(receive), server_of(scope).closing.wait())
        )
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producer, watcher):
                task.cancel()  # no-op for the one that finished
            await asyncio.gather(producer, watcher, return_exceptions=True)
        if not producer.cancelled():
            await self._after_body(scope, receive, producer)
            return
        if self.on_cancel:
            self.on_cancel()
        if abort_connection(scope):
            await wait_for_http_disconnect(receive)

    async def _after_body(
        self, scope: Scope, receive: Receive, producer: asyncio.Future[None]
    ) -> None:
        exc = producer.exception()
        if exc is None:
            return
        if not isinstance(exc, AbortConnection):
            raise exc
        if abort_connection(scope):
            await wait_for_http_disconnect(receive)

    async def _produce(self, send: Send) -> None:
        started = False
        async for chunk in self.body:
            if not started:
                await send(
                    {"type": "http.response.start", "status": self.status, "headers": self.headers}
                )
                started = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if not started:
            await send(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- timings ---------------------------------------------------------------------------------


class Timed(Protocol):
    """A request record with its timing: `time.monotonic()` when the request was received
    (its body read) and when its first output (token line, audio byte) was handed to the
    transport, and the delay configured before that first output. None when not recorded
    (the request failed, was cancelled first, or its kind is not timed)."""

    @property
    def received(self) -> float | None: ...

    @property
    def first(self) -> float | None: ...

    @property
    def configured_ms(self) -> float | None: ...


def _time_param(request: Request, name: str) -> float | None:
    value = request.query_params.get(name)
    return None if value is None else float(value)


def timings_route(
    server: ThreadedServer, key: str, records: Callable[[], Iterable[Timed]]
) -> Route:
    """`GET /emulator/timings[?since=t][&until=t]` -> `{key: [{"received", "first",
    "configured_ms"}, ...]}`, in the order received, for the requests whose first output
    went out; `since` (exclusive) and `until` (inclusive) bound `received`. Times are
    `time.monotonic()` (CLOCK_MONOTONIC, the same in every process of the machine).
    `records()` is read on the server thread, under `server.lock`."""

    async def endpoint(request: Request) -> Response:
        try:
            since, until = _time_param(request, "since"), _time_param(request, "until")
        except ValueError:
            return JSONResponse({"error": "since and until must be numbers"}, 400)
        with server.lock:
            rows = [
                {"received": r.received, "first": r.first, "configured_ms": r.configured_ms}
                for r in records()
                if r.received is not None
                and r.first is not None
                and r.configured_ms is not None
                and (since is None or r.received > since)
                and (until is None or r.received <= until)
            ]
        return JSONResponse({key: rows})

    return Route(TIMINGS_PATH, endpoint, methods=["GET"])


# --- config and waiting helpers -------------------------------------------------------------

C = TypeVar("C")


def config_from(cls: type[C], config: C | dict[str, Any] | None, overrides: dict[str, Any]) -> C:
    """Build a config dataclass from an instance, a dict (e.g. parsed JSON) and keyword
    overrides; unknown keys are an error rather than silently ignored."""
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, dict):
        base = dict(config)
    else:
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    base.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(base) - names
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**base)


async def async_wait_until(predicate: Callable[[], bool], interval: float = 0.01) -> None:
    """Wait until `predicate()` is true, polling without blocking the caller's loop. Bound
    it with `asyncio.timeout()`."""
    # ASYNC110 ignored: the state is written on an emulator thread, so there is no Event
    # on the caller's loop to await
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(interval)
