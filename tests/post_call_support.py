"""Test support for webhooks, analysis and exports: a real local webhook receiver, signature
verification written independently of `adapters.signing` (stdlib hmac only), a running app on a
given settings object, and calls driven through the inbound webhook and `SqlCallStore`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from emulators.base import ThreadedServer
from models import Call
from store.calls import SqlCallStore
from tests.conftest import post_signed

SECRET = "whsec-test-0123456789"
AGENT_NUMBER = "+14155550100"
CALLER_NUMBER = "+14155550199"
HANG = 0
"""A scripted receiver status meaning: never answer (until the receiver stops)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WebhookReceiver(ThreadedServer):
    """A CRM's webhook endpoint at `/hook`: records every request; answers with the
    scripted `statuses` in turn, then `default_status`."""

    name = "webhook-receiver"

    def __init__(self, port: int = 0, statuses: list[int] | None = None) -> None:
        super().__init__(port=port)
        self.default_status = 200
        self._statuses: deque[int] = deque(statuses or [])
        self._received: list[dict[str, Any]] = []

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hook"

    def build_app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self._received.append({"headers": dict(request.headers), "body": body})
            status = self._statuses.popleft() if self._statuses else self.default_status
        if status == HANG:
            await self.closing.wait()
            status = 503
        return Response(status_code=status)

    @property
    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self._received)

    def events(self) -> list[dict[str, Any]]:
        """Payloads in arrival order, each once (deduplicated by X-Webhook-Id, as a
        receiver aiming at exactly-once does)."""
        seen: set[str] = set()
        events = []
        for request in self.received:
            event_id = request["headers"]["x-webhook-id"]
            if event_id not in seen:
                seen.add(event_id)
                events.append(json.loads(request["body"]))
        return events

    def types(self) -> list[str]:
        return [e["type"] for e in self.events()]


def verify_signature(secret: str, header: str, body: bytes, *, tolerance_s: float = 300) -> bool:
    """The receiver's check, per the README: HMAC-SHA256 of "<t>.<body>", fresh `t`."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = int(parts["t"])
    expected = hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    fresh = abs(time.time() - timestamp) <= tolerance_s
    return fresh and hmac.compare_digest(expected, parts["v1"])


async def eventually(predicate: Callable[[], Any], within_s: float = 15.0) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.02)


class CallDriver:
    """Drives one inbound call the way Twilio and the live pipeline do: the signed voice
    webhook creates it, then the app's `SqlCallStore` (its hook and live-event filter)
    loads the call's configuration and records the stream start, turns, tool events and
    the end."""

    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app, self.client = app, client
        self.store: SqlCallStore = app.state.call_store
        self.call_sid = "CA" + hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:32]
        self.call_id = ""

    async def ring(self, to: str = AGENT_NUMBER) -> str:
        params = {"CallSid": self.call_sid, "From": CALLER_NUMBER, "To": to}
        response = await post_signed(self.client, "/twilio/voice", params)
        assert response.status_code == 200, response.text
        async with self.app.state.db.sessionmaker() as session:
            call = await session.scalar(select(Call).where(Call.twilio_call_sid == self.call_sid))
        assert call is not None
        self.call_id = call.id
        return call.id

    async def answer(self) -> None:
        assert await self.store.load_config(self.call_id) is not None
        await self.store.stream_started(
            self.call_id, stream_sid="MZ" + self.call_sid[2:], call_sid=self.call_sid
        )

    async def turn(self, role: str, text: str, start_s: float, **fields: Any) -> None:
        fields.setdefault("end_s", start_s + 1.0)
        await self.store.add_turn(self.call_id, role=role, text=text, start_s=start_s, **fields)

    async def tool(self, name: str, action: str | None = None, at_s: float = 0.0) -> None:
        await self.store.add_event(
            self.call_id, "tool_called", {"name": name, "action": action}, at_s
        )

    async def hang_up(self, reason: str = "customer-ended-call") -> None:
        await self.store.finish(self.call_id, ended_reason=reason)

    async def status(self, status: str, **extra: str) -> None:
        params = {"CallSid": self.call_sid, "CallStatus": status, **extra}
        response = await post_signed(self.client, "/twilio/status", params)
        assert response.status_code == 204, response.text


async def sales_conversation(call: CallDriver) -> None:
    """A short call with a barge-in, a tool call and latency figures."""
    await call.answer()
    await call.turn("assistant", "Hi, this is Acme. Do you have a minute?", 0.2, first_media_ms=310)
    await call.turn("user", "Sure, we are looking at dialers for ten reps.", 2.0, stt_final_ms=180)
    await call.turn(
        "assistant",
        "Great, our plan for ten",
        4.0,
        interrupted=True,
        stt_final_ms=200,
        llm_first_token_ms=420,
        tts_first_audio_ms=150,
        first_media_ms=640,
        retrieval_ms=35,
    )
    await call.turn("user", "Can we meet Tuesday at ten?", 5.5, stt_final_ms=220)
    await call.tool("book_meeting", action=None, at_s=6.8)
    await call.turn(
        "assistant",
        "Booked: Tuesday at ten.",
        7.0,
        tool_calls=[{"function": {"name": "book_meeting", "arguments": {"day": "Tuesday"}}}],
        stt_final_ms=240,
        llm_first_token_ms=500,
        tts_first_audio_ms=170,
        first_media_ms=720,
        retrieval_ms=41,
    )
    await call.hang_up()


FAST = {
    "WEBHOOK_SIGNING_SECRET": SECRET,
    "WEBHOOK_BACKOFF_BASE_S": 0.05,
    "WEBHOOK_RETRY_PERIOD_S": 120.0,
    "ANALYSIS_WAIT_S": 10.0,
    "ANALYSIS_RETRY_BASE_S": 0.1,
    "ANALYSIS_MAX_ATTEMPTS": 5,
}
"""Short retry/backoff settings for tests."""
