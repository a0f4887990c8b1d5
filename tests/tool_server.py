"""A customer's tool endpoint for tests: a real HTTP server on 127.0.0.1 that records each
request and answers after a configurable delay."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from emulators.base import ThreadedServer


class ToolServer(ThreadedServer):
    """Answers any path with `reply` (JSON when a dict or list, else text) and `status`,
    `delay_s` seconds after the request arrived. `requests` holds what was received."""

    name = "tool-server"

    def __init__(self, *, reply: Any = None, status: int = 200, delay_s: float = 0.0) -> None:
        super().__init__()
        self.reply = {"ok": True} if reply is None else reply
        self.status = status
        self.delay_s = delay_s
        self._requests: list[dict[str, Any]] = []

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self._requests]

    def build_app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=methods)])

    async def _handle(self, request: Request) -> Response:
        record = {
            "time": time.time(),
            "method": request.method,
            "path": request.url.path,
            "query": request.scope.get("query_string", b""),
            "headers": dict(request.headers),
            "body": await request.body(),
        }
        with self.lock:
            self._requests.append(record)
        await asyncio.sleep(self.delay_s)
        if isinstance(self.reply, dict | list):
            return JSONResponse(self.reply, status_code=self.status)
        return PlainTextResponse(str(self.reply), status_code=self.status)
