"""uvicorn's `websockets-sansio` WebSocket protocol, with text messages handed to the app
as plain calls.

A Twilio media stream is 50 small text messages a second per call. Through ASGI each one
costs a queue put, pausing and resuming the socket's reads, a task wake-up and the
`receive()` coroutines of uvicorn, Starlette and the transport: more than the frame parsing
itself (`python -m bench.floor`, BENCHMARKS.md). With this protocol an app may *subscribe*
a connection: from then on each text message is passed to its sink inside the read
callback that parsed it. Everything else (disconnects, binary messages, the handshake,
sending, pings, closing) stays uvicorn's, so `receive()` still returns the disconnect.

    uvicorn main:create_app --factory --ws media_ws:MediaStreamProtocol

An app finds the subscription in its scope (`scope["extensions"][TEXT_SINK]`, a callable
taking the sink) and must work without it, under another protocol or a test client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("aisdr.media_ws")

TEXT_SINK = "aisdr.text_sink"

TextSink = Callable[[str], None]


class MediaStreamProtocol(WebSocketsSansIOProtocol):
    """A subscribed connection's text messages go to its sink, in order, synchronously.

    A sink must not block and must not raise: one that raises is unsubscribed, logged, and
    the connection is failed with 1011 (the app's `receive()` then sees the disconnect).
    While the sink runs, the socket is not read, which is the back-pressure.
    """

    _sink: TextSink | None = None

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
            if isinstance(text, str):
                self._deliver(text)
            else:
                self.queue.put_nowait(message)
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
        try:
            text = data.decode()
        except UnicodeDecodeError:
            log.warning("media stream: invalid UTF-8 in a text message; closing (1007)")
            self.conn.send_close(1007)
            self.handle_parser_exception()
            return
        self._deliver(text)

    def _deliver(self, text: str) -> None:
        assert self._sink is not None
        try:
            self._sink(text)
        except Exception:
            log.exception("media stream: the text sink raised; failing the connection")
            self._sink = None
            self.conn.fail(1011, "internal error")
            self.handle_parser_exception()
