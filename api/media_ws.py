"""uvicorn's `websockets-sansio` WebSocket protocol, with text messages handed to the app
as plain calls.

A Twilio media stream is 50 small text messages a second per call. Through ASGI each one
costs a queue put, pausing and resuming the socket's reads, a task wake-up and the
`receive()` coroutines of uvicorn, Starlette and the transport: more than the frame parsing
itself (`python -m bench.floor`, BENCHMARKS.md). With this protocol an app may *subscribe*
a connection: from then on each text message is passed to its sink inside the read
callback that parsed it. Everything else (disconnects, binary messages, the handshake,
sending, pings, closing) stays uvicorn's, so `receive()` still returns the disconnect.

    uvicorn main:create_app --factory --ws api.media_ws:MediaStreamProtocol

An app finds the subscription in its scope (`scope["extensions"][TEXT_SINK]`, a callable
taking the sink) and must work without it, under another protocol or a test client.

Once subscribed, and once websockets' parser stands between two frames, the protocol also
splits the stream into frames itself. The common frame, a whole masked text message with no
extension bits, is unmasked (websockets' C `apply_mask`) and handed to the sink; any other
frame (control frames, fragments, binary, compressed, oversize, unmasked) is fed whole to
websockets' parser, which handles it as before and so always sees whole frames.

Private internals, checked against uvicorn 0.54.0 and websockets 17.4: uvicorn's protocol
state (`queue`, `frames`, `curr_msg_data_type`, `read_paused`, `handle_parser_exception`) and
websockets' parser (`conn.parser` waiting in `StreamReader.at_eof`, `reader.buffer`,
`current_size`). Fallback: `--ws websockets-sansio`; the app then reads every message
through ASGI `receive()`, with the same behaviour at about 15 us more CPU per message.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import OPEN
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the wheel ships the C extension
    from websockets.utils import apply_mask

log = logging.getLogger("ai_sdr.media_ws")

TEXT_SINK = "aisdr.text_sink"

TextSink = Callable[[str], None]

_AT_EOF = StreamReader.at_eof.__code__
_FIN_TEXT = 0x81  # FIN, no RSV bits, opcode 1


class MediaStreamProtocol(WebSocketsSansIOProtocol):
    """A subscribed connection's text messages go to its sink, in order, synchronously.

    A sink must not block and must not raise: one that raises is unsubscribed, logged, and
    the connection is failed with 1011 (the app's `receive()` then sees the disconnect).
    While the sink runs, the socket is not read, which is the back-pressure.
    """

    _sink: TextSink | None = None
    _framing = False  # splitting frames here (subscribed, and websockets was between frames)
    _partial = b""  # the start of a frame not yet whole

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink = None  # the sink's call holds the app's side: no cycle left to collect
        self._partial = b""
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._framing:
            super().data_received(data)
            if self._sink is not None and self._between_frames():
                self._framing = True
            return
        buf = self._partial + data if self._partial else data
        self._partial = b""
        pos, end = 0, len(buf)
        while pos < end:
            size, header = _frame_size(buf, pos)
            if size == 0 or pos + size > end:
                if size > self._max_frame_size():
                    self._framing = False  # websockets rejects it as it reads the header
                    super().data_received(buf[pos:])
                    return
                self._partial = buf[pos:]
                return
            if (
                buf[pos] == _FIN_TEXT
                and header
                and self._sink is not None
                and not self.close_sent
                and self.conn.state is OPEN
                and self.conn.current_size is None
                and size - header <= self._max_frame_size()
            ):
                self._text_frame(buf, pos, header, size)
            else:
                super().data_received(buf[pos : pos + size])
            pos += size
            if self._sink is None or self.transport.is_closing():
                self._framing = False
                if pos < end:
                    super().data_received(buf[pos:])
                return

    def _text_frame(self, buf: bytes, pos: int, header: int, size: int) -> None:
        mask = buf[pos + header - 4 : pos + header]
        self._deliver_bytes(apply_mask(buf[pos + header : pos + size], mask))

    def _deliver_bytes(self, data: bytes) -> None:
        """A whole text message's payload to the sink; not UTF-8 closes with 1007."""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            log.warning("media stream: invalid UTF-8 in a text message; closing (1007)")
            self.conn.fail(1007, "invalid UTF-8")
            self.handle_parser_exception()
            return
        self._deliver(text)

    def _between_frames(self) -> bool:
        """websockets' parser waits for a frame's first byte with nothing buffered."""
        if self.conn.state is not OPEN or self.conn.reader.buffer:
            return False
        inner: Any = self.conn.parser
        while getattr(inner, "gi_yieldfrom", None) is not None:
            inner = inner.gi_yieldfrom
        return getattr(inner, "gi_code", None) is _AT_EOF

    def _max_frame_size(self) -> int:
        limit = self.conn.max_message_size
        return limit if limit is not None else 1 << 62

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and self.response.status_code == 101:
            # The app's task is created but has not run: it sees the extension.
            scope["extensions"][TEXT_SINK] = self._subscribe

    def _subscribe(self, sink: TextSink) -> None:
        """Messages queued before this call reach the sink first, so order is kept."""
        if self._sink is not None:
            raise RuntimeError("this connection already has a text sink")
        pending = []
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        self._sink = sink
        for message in pending:
            text = message.get("text") if message["type"] == "websocket.receive" else None
            if not isinstance(text, str):
                self.queue.put_nowait(message)
            elif self._sink is not None:  # None once a message before it made the sink raise
                self._deliver(text)
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def send_receive_event_to_app(self) -> None:
        sink = self._sink
        if sink is None or self.curr_msg_data_type != "text" or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        self._deliver_bytes(data)

    def _deliver(self, text: str) -> None:
        assert self._sink is not None
        try:
            self._sink(text)
        except Exception:
            log.exception("media stream: the text sink raised; failing the connection")
            self._sink = None
            self.conn.fail(1011, "internal error")
            self.handle_parser_exception()


def _frame_size(buf: bytes, pos: int) -> tuple[int, int]:
    """(whole frame's length, header's length if masked else 0) of the frame at `pos`, or
    (0, 0) while its header is incomplete. RFC 6455 section 5.2."""
    avail = len(buf) - pos
    if avail < 2:
        return 0, 0
    second = buf[pos + 1]
    length, header = second & 0x7F, 2
    if length == 126:
        if avail < 4:
            return 0, 0
        length, header = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
    elif length == 127:
        if avail < 10:
            return 0, 0
        length, header = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
    if second & 0x80:
        header += 4
        return header + length, header
    return header + length, 0
