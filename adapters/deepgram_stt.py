"""Deepgram live speech-to-text: `providers.STTProvider` on deepgram-sdk 7.x.

Role: `DeepgramSTT` holds one SDK client per process; `open()` yields one `DeepgramStream`
per call. A stream outlives socket drops: it reconnects with exponential backoff, replays the
audio it could not send, and keeps `Transcript.start`/`end` on the call's audio timeline
(Deepgram restarts its timestamps at 0 on every connection). It raises `STTError` from
`events()` only once it has given up.

Event policy: empty *interim* Results are dropped (they carry nothing); every *final* Result
is delivered, empty or not, because `speech_final` / `from_finalize` on an empty final still
ends a turn.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from websockets.exceptions import WebSocketException

from adapters.deepgram import SAMPLE_RATE, build_deepgram_client, listen_messages
from config import Settings
from pipeline.providers import Clock, SpeechStarted, STTError, STTEvent, Transcript, UtteranceEnd

log = logging.getLogger("ai_sdr." + __name__)

_SEND_ERRORS = (WebSocketException, OSError)
_CONNECT_ERRORS = (ApiError, WebSocketException, OSError, TimeoutError)
_REJECTED = {401, 402, 403}
"""Upgrade statuses that no retry will fix (bad key, no credit, forbidden)."""


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """Tunables of one live stream. Defaults suit Twilio's 20 ms frames."""

    batch_ms: int = 40
    """Audio per WebSocket send. Twilio frames arrive every 20 ms, so 40 ms holds at most one
    frame back (<= 20 ms added latency) and halves the sends."""
    quiet_batch_ms: int = 0
    """Audio per send while the caller is quiet (`caller_speaking(False)`, e.g. while the
    agent talks): nothing there is waiting to be transcribed, so fewer, larger sends. The
    caller starting to speak sends what is buffered at once. 0: always `batch_ms`."""
    keepalive_s: float = 4.0
    """KeepAlive after this long without audio: Deepgram closes sockets idle for 10 s."""
    buffer_s: float = 5.0
    """Unsent audio kept for replay after a drop; older audio is dropped and counted."""
    first_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    give_up_after_s: float = 30.0
    """Total outage after which `events()` raises STTError."""
    stable_after_s: float = 10.0
    """A connection that lived this long resets the backoff to `first_backoff_s`."""
    connect_timeout_s: float = 5.0
    close_timeout_s: float = 2.0

    @property
    def batch_bytes(self) -> int:
        return self.batch_ms * SAMPLE_RATE // 1000

    @property
    def quiet_batch_bytes(self) -> int:
        return max(self.quiet_batch_ms, self.batch_ms) * SAMPLE_RATE // 1000

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer_s * SAMPLE_RATE)


class DeepgramSTT:
    """`STTProvider`: live transcription of Twilio mu-law audio."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.monotonic,
        policy: StreamPolicy | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._policy = policy or StreamPolicy()
        self._client = build_deepgram_client(settings)

    @contextlib.asynccontextmanager
    async def open(self, *, language: str, tag: str = "") -> AsyncIterator[DeepgramStream]:
        """Start a stream without waiting for the socket: audio sent before it connects is
        buffered and replayed. Exiting sends CloseStream and stops every task."""
        stream = DeepgramStream(
            self._client, self._listen_params(language, tag), self._clock, self._policy
        )
        stream.start()
        try:
            yield stream
        finally:
            await stream.aclose()

    def _listen_params(self, language: str, tag: str) -> dict[str, Any]:
        s = self._settings
        params: dict[str, Any] = {
            "model": s.DEEPGRAM_STT_MODEL,
            "encoding": "mulaw",
            "sample_rate": SAMPLE_RATE,
            "channels": 1,
            "language": language,
            "interim_results": True,
            "endpointing": s.DEEPGRAM_ENDPOINTING_MS,
            "utterance_end_ms": s.DEEPGRAM_UTTERANCE_END_MS,
            "vad_events": True,
            "smart_format": True,
            "punctuate": True,
        }
        if tag:
            params["tag"] = tag
        return params


class _End:
    """Queue marker: the stream was closed."""


class DeepgramStream:
    """`STTStream` over successive Deepgram sockets. One consumer of `events()`.

    Audio path: `send_audio` appends to `_unsent`; whenever a socket is attached and a batch
    waits (`batch_ms`, or `quiet_batch_ms` while the caller is quiet), it is sent. While no
    socket is attached `_unsent` grows (bounded to `buffer_s`) and is replayed first on the
    next socket. All sends hold `_send_lock`; `send_audio` never waits for it, so the caller's
    inbound loop never blocks on the network.
    A partial batch goes out with the next frame, `finalize()`, a KeepAlive tick or close.
    Audio already written to a socket that then dies is lost (Deepgram has no resume).
    """

    def __init__(
        self,
        client: AsyncDeepgramClient,
        params: dict[str, Any],
        clock: Clock,
        policy: StreamPolicy,
    ) -> None:
        self.reconnects = 0
        self.dropped_audio_bytes = 0
        self._client = client
        self._params = params
        self._clock = clock
        self._policy = policy
        # Unbounded on purpose: Deepgram sends a few messages a second and the pipeline drains
        # them continuously; a bound would only stall the socket reader.
        self._events: asyncio.Queue[STTEvent | STTError | _End] = asyncio.Queue()
        self._unsent = bytearray()
        self._received_bytes = 0
        self._conn: Any = None
        self._send_lock = asyncio.Lock()
        self._last_sent_at = 0.0
        self._finalize_due = False
        self._batch_bytes = policy.quiet_batch_bytes  # calls open with the caller listening
        self._send_now = False
        self._closing = False
        self._failed = False
        self._connected = asyncio.Event()
        self._connections = 0
        self._supervisor: asyncio.Task[None] | None = None

    # --- STTStream ----------------------------------------------------------------------

    async def send_audio(self, mulaw: bytes) -> None:
        if self.push_audio(mulaw):
            await self.send_pending()

    def push_audio(self, mulaw: bytes) -> bool:
        """Queue audio without waiting; True when a whole batch waits for `send_pending()`
        on a live socket (while disconnected it waits for the replay)."""
        self._received_bytes += len(mulaw)
        self._unsent += mulaw
        self._trim_unsent()
        return self._conn is not None and self._batch_waits()

    def caller_speaking(self, speaking: bool) -> None:
        """The pipeline's VAD heard the caller start (True) or finish (False) speaking. While
        speaking, batches are `batch_ms`, and what is buffered goes with the next
        `send_pending()`; while quiet, `quiet_batch_ms`."""
        policy = self._policy
        self._batch_bytes = policy.batch_bytes if speaking else policy.quiet_batch_bytes
        self._send_now = speaking and bool(self._unsent)

    def _batch_waits(self) -> bool:
        return self._send_now or len(self._unsent) >= self._batch_bytes

    async def send_pending(self) -> None:
        """Send what `push_audio()` queued once a whole batch waits, unless a send is
        already under way (it takes everything queued). A partial batch waits for more
        frames, `finalize()`, a KeepAlive tick or close: the pipeline calls this whenever
        its VAD has windows to score, every 32 ms while the caller speaks, and sending on
        each of those calls would cut every batch short."""
        if self._batch_waits():
            await self._flush(wait=False)

    async def finalize(self) -> None:
        """Send buffered audio, then Finalize; while disconnected, after the replay."""
        self._finalize_due = True
        await self._flush(wait=True)

    async def events(self) -> AsyncGenerator[STTEvent, None]:
        while True:
            item = await self._events.get()
            if isinstance(item, _End | STTError):
                self._events.put_nowait(item)  # later readers end the same way
                if isinstance(item, STTError):
                    raise item
                return
            yield item

    # --- extras ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="deepgram-listen")

    async def aclose(self) -> None:
        """CloseStream (after the unsent tail), let the server close, then stop all tasks."""
        self._closing = True
        supervisor = self._supervisor
        try:
            if supervisor is not None and self._conn is not None:
                async with asyncio.timeout(self._policy.close_timeout_s):
                    await self._send_close_stream()
                    await asyncio.wait({supervisor})
        except TimeoutError:
            log.debug("deepgram listen did not close in time; cancelling")
        finally:
            if supervisor is not None:
                await _cancel_and_wait(supervisor)
            self._events.put_nowait(_End())

    # --- sending --------------------------------------------------------------------------

    def _trim_unsent(self) -> None:
        excess = len(self._unsent) - self._policy.buffer_bytes
        if excess > 0:
            del self._unsent[:excess]
            self.dropped_audio_bytes += excess

    async def _flush(self, *, wait: bool) -> None:
        if self._conn is None or (self._send_lock.locked() and not wait):
            return
        async with self._send_lock:
            conn = self._conn
            if conn is None:
                return
            try:
                await self._drain(conn)
            except _SEND_ERRORS:
                # The reader sees the same dead socket and reconnects.
                self._conn = None

    async def _drain(self, conn: Any) -> None:
        """Send all unsent audio, then a due Finalize. The caller holds `_send_lock`."""
        while self._unsent:
            # Normally one batch; after a reconnect the whole replay buffer (<= buffer_s,
            # far below the 1 MiB frame limit), which Deepgram takes faster than real time.
            chunk = bytes(self._unsent[: self._policy.buffer_bytes])
            del self._unsent[: len(chunk)]
            dropped_before = self.dropped_audio_bytes
            try:
                await conn.send_media(chunk)
            except BaseException:
                self._restore(chunk, contiguous=self.dropped_audio_bytes == dropped_before)
                raise
            self._last_sent_at = asyncio.get_running_loop().time()
        self._send_now = False
        if self._finalize_due:
            await conn.send_finalize()
            self._finalize_due = False

    def _restore(self, chunk: bytes, *, contiguous: bool) -> None:
        """Put back a chunk whose send failed, unless trimming already cut the timeline."""
        if contiguous:
            self._unsent[:0] = chunk
            self._trim_unsent()
        else:
            self.dropped_audio_bytes += len(chunk)

    async def _send_close_stream(self) -> None:
        async with self._send_lock:
            conn = self._conn
            if conn is None:
                return
            with contextlib.suppress(*_SEND_ERRORS):
                await self._drain(conn)
                await conn.send_close_stream()

    async def _keepalive(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_sent_at
            if idle < self._policy.keepalive_s:
                await asyncio.sleep(self._policy.keepalive_s - idle)
                continue
            async with self._send_lock:
                if self._conn is not conn:
                    return
                try:
                    await self._drain(conn)  # a partial batch left when audio stopped
                    await conn.send_keep_alive()
                except _SEND_ERRORS:
                    return
                self._last_sent_at = loop.time()

    # --- connection lifecycle ---------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._reconnect_loop()
        except Exception as exc:  # a bug here must end events(), not hang them
            log.exception("deepgram listen supervisor crashed")
            self._fail(f"deepgram listen failed: {type(exc).__name__}")

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._policy.first_backoff_s
        outage_since: float | None = None
        while True:
            attached_at = await self._connect_and_serve()
            if self._closing or self._failed:
                return
            now = loop.time()
            if attached_at is not None:
                outage_since = now
                if now - attached_at >= self._policy.stable_after_s:
                    backoff = self._policy.first_backoff_s
            outage_since = now if outage_since is None else outage_since
            if now - outage_since >= self._policy.give_up_after_s:
                self._fail(f"deepgram listen unreachable for {now - outage_since:.1f} s")
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._policy.max_backoff_s)

    async def _connect_and_serve(self) -> float | None:
        """One socket's life. Returns when it attached (loop time), or None if it never did."""
        attached_at: float | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(self._policy.connect_timeout_s):
                    conn = await stack.enter_async_context(
                        self._client.listen.v1.connect(**self._params)
                    )
                offset_s = await self._attach(conn)
                attached_at = asyncio.get_running_loop().time()
                await self._serve(conn, offset_s)
        except ApiError as exc:
            if exc.status_code in _REJECTED:
                self._fail(f"deepgram listen rejected the connection (HTTP {exc.status_code})")
            else:
                log.warning("deepgram listen upgrade failed: HTTP %s", exc.status_code)
        except _CONNECT_ERRORS as exc:
            log.warning("deepgram listen socket lost: %s", type(exc).__name__)
        finally:
            self._detach()
        return attached_at

    async def _attach(self, conn: Any) -> float:
        """Replay unsent audio, then make `conn` the live socket. Returns the timeline offset
        of its first byte: Deepgram's timestamps on this socket start at 0 there."""
        async with self._send_lock:
            offset_s = (self._received_bytes - len(self._unsent)) / SAMPLE_RATE
            self._last_sent_at = asyncio.get_running_loop().time()
            await self._drain(conn)
            self._conn = conn
        self._connections += 1
        if self._connections > 1:
            self.reconnects += 1
            log.info("deepgram listen reconnected (reconnects=%d)", self.reconnects)
        self._connected.set()
        return offset_s

    def _detach(self) -> None:
        self._conn = None
        self._connected.clear()

    async def _serve(self, conn: Any, offset_s: float) -> None:
        keepalive = asyncio.create_task(self._keepalive(conn), name="deepgram-keepalive")
        try:
            async for message in listen_messages(conn):
                event = self._to_event(message, offset_s)
                if event is not None:
                    self._events.put_nowait(event)
        finally:
            self._detach()
            await _cancel_and_wait(keepalive)
        if not self._closing:
            log.warning("deepgram listen socket closed by the server")

    def _fail(self, reason: str) -> None:
        self._failed = True
        log.error("%s; giving up", reason)
        self._events.put_nowait(STTError(reason, provider="deepgram"))

    # --- messages -------------------------------------------------------------------------

    def _to_event(self, message: dict[str, Any], offset_s: float) -> STTEvent | None:
        kind = message.get("type")
        try:
            if kind == "Results":
                return self._transcript(message, offset_s)
            if kind == "SpeechStarted":
                return SpeechStarted(offset_s + message["timestamp"], received_at=self._clock())
            if kind == "UtteranceEnd":
                return UtteranceEnd(offset_s + message["last_word_end"], received_at=self._clock())
        except (KeyError, IndexError, TypeError, AttributeError):
            log.warning("deepgram listen: malformed %s message skipped", kind)
            return None
        if kind == "Error":
            log.warning("deepgram listen error: %s", message.get("variant", "?"))
        return None

    def _transcript(self, message: dict[str, Any], offset_s: float) -> Transcript | None:
        alternatives = message["channel"]["alternatives"]
        text = str(alternatives[0].get("transcript") or "") if alternatives else ""
        is_final = bool(message.get("is_final"))
        if not text and not is_final:
            return None
        start = offset_s + float(message.get("start") or 0.0)
        return Transcript(
            text=text,
            is_final=is_final,
            speech_final=bool(message.get("speech_final")),
            start=start,
            end=start + float(message.get("duration") or 0.0),
            from_finalize=bool(message.get("from_finalize")),
            received_at=self._clock(),
        )


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has finished, even if we are cancelled meanwhile
    (then re-raise), so that no task outlives its owner."""
    task.cancel()
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())
    if interrupted:
        raise asyncio.CancelledError
