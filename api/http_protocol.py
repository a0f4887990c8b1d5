"""uvicorn's httptools HTTP protocol with a deadline on the request head: a connection that
has not sent a complete request line and headers within `HEAD_TIMEOUT_S` of connecting (or
of its previous response) is closed. uvicorn has no header timeout of its own, so without
this a slowloris client that trickles header bytes holds a file descriptor for ever, and a
thousand of them starve `/health` and the Twilio webhooks.

    uvicorn main:create_app --factory --http api.http_protocol:HeadTimeoutProtocol

The one place that leans on uvicorn's internals: checked against uvicorn 0.54.0 (the
`connection_made`, `on_headers_complete`, `on_response_complete` and `connection_lost`
hooks of `HttpToolsProtocol`). Fallback: `--http httptools` runs unchanged without the
deadline; production runs behind a reverse proxy with header timeouts either way
(docker-compose.yml's nginx). After the upgrade, a Media Stream that sends no `start` is
closed by `voice_pipeline.CallManager` (HANDSHAKE_TIMEOUT_S).

Must not import the app, the pipeline or FastAPI.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_TIMEOUT_S = 5.0
"""A real client sends its request head in one packet; five seconds covers a slow phone
network many times over."""


class HeadTimeoutProtocol(HttpToolsProtocol):
    head_timeout_s = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_overdue)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
