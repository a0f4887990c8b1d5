"""Webhooks: the transactional outbox, request signing and the background dispatcher.

Outbox. `Outbox.on_call_event` is part of the `CallHook`: it runs inside the transaction
that changes a call and adds a `WebhookEvent` row there, so an event exists if and only if
the change it reports committed. The row holds the exact payload; the database is the only
state, so pending deliveries survive a restart.

Dispatcher. One background task per app claims due rows (`pending` -> `delivering`), POSTs
them with httpx and records every attempt (`WebhookAttempt`). Rules:

- 2xx delivered; 4xx other than 408/429, or a receiver on a refused address: failed at once;
  anything else (5xx, 408, 429, timeouts, connection errors) retried with exponential
  backoff and jitter until `WEBHOOK_RETRY_PERIOD_S` after the event was created.
- Events of one call go out in creation order: a row waits while an earlier row of its call
  is pending or delivering (delivered and failed rows no longer block).
- Delivery is at least once. Each event keeps its id (`X-Webhook-Id`) across retries and
  redeliveries, so a receiver that records ids gets exactly once.
- One dispatcher per database: at start, rows left `delivering` by a crash are retried.

Signature: `X-Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`
over the exact body bytes, re-signed (fresh `t`) on each attempt.

Must not import FastAPI, routes, analysis or voice_pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from adapters.netguard import PublicOnlyTransport, UnsafeURLError
from config import Settings
from models import Agent, Call, CallEvent, TranscriptTurn, WebhookAttempt, WebhookEvent
from postcall.hooks import TaskSet, after_commit
from postcall.report import (
    analysis_fields,
    build_report,
    call_record,
    iso,
    load_agent,
    turn_record,
)
from utils import new_id, utcnow

log = logging.getLogger("ai_sdr.webhooks")

ALWAYS_SENT = frozenset({"call.started", "call.ended", "call.analyzed"})
OPT_IN = frozenset({"call.transcript", "tool.called"})
"""Sent only when listed in the agent's `webhook_events`."""

SIGNATURE_HEADER = "X-Webhook-Signature"
ID_HEADER = "X-Webhook-Id"
EVENT_HEADER = "X-Webhook-Event"
ATTEMPT_HEADER = "X-Webhook-Attempt"
USER_AGENT = "ai-sdr-webhooks/0.1"

MAX_BACKOFF_S = 3600.0
DeliveryStatus = Literal["pending", "delivering", "delivered", "failed"]


# --- signing --------------------------------------------------------------------------------


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Webhook-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# --- outbox ---------------------------------------------------------------------------------


class _MonotonicClock:
    """UTC now, strictly increasing within the process: rows of one call sort by creation
    even when two are written within the same microsecond."""

    def __init__(self) -> None:
        self._last: datetime | None = None

    def __call__(self) -> datetime:
        now = utcnow()
        if self._last is not None and now <= self._last:
            now = self._last + timedelta(microseconds=1)
        self._last = now
        return now


class Outbox:
    """Writes `WebhookEvent` rows inside the caller's transaction; `wake` (the dispatcher's)
    runs after that transaction commits."""

    def __init__(self, settings: Settings, wake: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.wake = wake
        self._now = _MonotonicClock()

    def url_for(self, agent: Agent | None) -> str | None:
        return (agent.webhook_url if agent else None) or self.settings.DEFAULT_WEBHOOK_URL or None

    def wants(self, agent: Agent | None, event_type: str) -> bool:
        if event_type in ALWAYS_SENT:
            return True
        return agent is not None and event_type in (agent.webhook_events or [])

    async def on_call_event(self, session: AsyncSession, call: Call, event_name: str) -> None:
        """The outbox's part of the CallHook."""
        agent = await load_agent(session, call)
        if not self.url_for(agent) or not self.wants(agent, event_name):
            return
        data = await self._data_for(session, call, agent, event_name)
        delay_s = 0.0
        if event_name == "call.ended" and call.analysis_status == "pending":
            # Held back so the analysis can join the report; the analyser releases it early.
            delay_s = self.settings.ANALYSIS_WAIT_S
        self.enqueue(session, call, agent, event_name, data, delay_s=delay_s)

    def enqueue(
        self,
        session: AsyncSession,
        call: Call | None,
        agent: Agent | None,
        event_type: str,
        data: dict[str, Any],
        *,
        delay_s: float = 0.0,
    ) -> WebhookEvent | None:
        """`call` None: an event of no one call (a campaign's), sent to `agent`'s URL."""
        url = self.url_for(agent)
        if not url:
            return None
        created = self._now()
        event_id = new_id("evt")
        payload = {"id": event_id, "type": event_type, "created_at": iso(created), "data": data}
        row = WebhookEvent(
            id=event_id,
            call_id=call.id if call is not None else None,
            agent_id=call.agent_id if call is not None else (agent.id if agent else None),
            event_type=event_type,
            url=url,
            payload=payload,
            status="pending",
            created_at=created,
            next_attempt_at=created + timedelta(seconds=delay_s),
        )
        session.add(row)
        after_commit(session, self.wake)
        return row

    async def _data_for(
        self, session: AsyncSession, call: Call, agent: Agent | None, event_name: str
    ) -> dict[str, Any]:
        if event_name == "call.ended":
            return await build_report(session, call)
        if event_name == "call.transcript":
            return {"call_id": call.id, "turn": await _latest_turn(session, call.id)}
        if event_name == "tool.called":
            return {"call_id": call.id, "tool": await _latest_tool_event(session, call.id)}
        return {"call": call_record(call, agent)}

    async def release_report(
        self, session: AsyncSession, call: Call, *, reason: str | None = None
    ) -> bool:
        """Refresh a held `call.ended` (nothing sent yet) with the current analysis and make
        it due now. False when there is none to release: it went out, or there is no URL."""
        held = await session.scalar(
            select(WebhookEvent).where(
                WebhookEvent.call_id == call.id,
                WebhookEvent.event_type == "call.ended",
                WebhookEvent.status == "pending",
                WebhookEvent.attempts == 0,
            )
        )
        if held is None:
            return False
        payload = {**held.payload, "data": await build_report(session, call, reason=reason)}
        # Conditional: the dispatcher may claim the row between the read and this write.
        released = await session.execute(
            update(WebhookEvent)
            .where(
                WebhookEvent.id == held.id,
                WebhookEvent.status == "pending",
                WebhookEvent.attempts == 0,
            )
            .values(payload=payload, next_attempt_at=utcnow())
            .returning(WebhookEvent.id)
            .execution_options(synchronize_session=False)
        )
        if released.first() is None:
            return False
        after_commit(session, self.wake)
        return True

    async def analyzed(self, session: AsyncSession, call: Call) -> None:
        """Enqueue `call.analyzed` (the analysis finished after `call.ended` went out)."""
        agent = await load_agent(session, call)
        data = {"call": call_record(call, agent), **analysis_fields(call)}
        self.enqueue(session, call, agent, "call.analyzed", data)


async def _latest_turn(session: AsyncSession, call_id: str) -> dict[str, Any] | None:
    turn = await session.scalar(
        select(TranscriptTurn)
        .where(TranscriptTurn.call_id == call_id)
        .order_by(TranscriptTurn.seq.desc())
        .limit(1)
    )
    return turn_record(turn) if turn else None


async def _latest_tool_event(session: AsyncSession, call_id: str) -> dict[str, Any] | None:
    event = await session.scalar(
        select(CallEvent)
        .where(CallEvent.call_id == call_id, CallEvent.type == "tool_called")
        .order_by(CallEvent.id.desc())
        .limit(1)
    )
    if event is None:
        return None
    return {**event.data, "call_time_s": event.call_time_s, "at": iso(event.at)}


# --- dispatcher -----------------------------------------------------------------------------


@dataclass(slots=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    latency_ms: float
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def is_retryable_status(status_code: int) -> bool:
    """A receiver's 4xx means the request itself is refused (except timeout/rate limit)."""
    return not (400 <= status_code < 500) or status_code in (408, 429)


def _blocked_by_earlier() -> Any:
    """SQL: an earlier event of the same call is still pending or delivering."""
    earlier = aliased(WebhookEvent)
    return exists().where(
        earlier.call_id == WebhookEvent.call_id,
        earlier.status.in_(("pending", "delivering")),
        or_(
            earlier.created_at < WebhookEvent.created_at,
            and_(earlier.created_at == WebhookEvent.created_at, earlier.id < WebhookEvent.id),
        ),
    )


class WebhookDispatcher:
    """Delivers outbox rows. `start()` in the app lifespan, `aclose()` at shutdown;
    `wake()` after committing a row that is due now."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_in_flight: int = 8,
        idle_poll_s: float = 30.0,
        shutdown_grace_s: float = 2.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        guarded = PublicOnlyTransport(transport, allow_private=settings.ALLOW_PRIVATE_URLS)
        self.client = httpx.AsyncClient(
            transport=guarded, timeout=settings.WEBHOOK_TIMEOUT_S, follow_redirects=False
        )
        self.max_in_flight = max_in_flight
        self.idle_poll_s = idle_poll_s
        self.shutdown_grace_s = shutdown_grace_s
        self.jitter = jitter
        self._wake = asyncio.Event()
        # A finished delivery frees a slot and may unblock the next event of its call.
        self._deliveries = TaskSet("webhook-delivery", on_done=self.wake)
        self._loop_task: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        recovered = await self._recover_interrupted()
        if recovered:
            log.info("webhooks: retrying %d deliveries interrupted by a restart", recovered)
        self._loop_task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        """Stop claiming, give in-flight deliveries a short grace, cancel the rest (their
        rows stay `delivering` and are retried at the next start)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        await self._deliveries.wait(self.shutdown_grace_s)
        await self._deliveries.aclose()
        await self.client.aclose()

    async def _recover_interrupted(self) -> int:
        async with self.sessionmaker() as session, session.begin():
            result = await session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.status == "delivering")
                .values(status="pending", next_attempt_at=utcnow())
                .returning(WebhookEvent.id)
                .execution_options(synchronize_session=False)
            )
            return len(result.all())

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self._dispatch_due()
            except Exception:  # the database may be briefly locked; never stop dispatching
                log.exception("webhooks: dispatch pass failed; retrying")
                delay = 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.01)):
                    await self._wake.wait()

    async def _dispatch_due(self) -> float:
        """Start deliveries for due rows; return seconds until the next one is due."""
        free = self.max_in_flight - len(self._deliveries)
        if free <= 0:
            return self.idle_poll_s  # a finishing delivery wakes the loop
        for event_id in await self._claim_due(free):
            self._deliveries.spawn(event_id, self._deliver(event_id))
        next_due = await self._next_due()
        if next_due is None:
            return self.idle_poll_s
        return min(max((next_due - utcnow()).total_seconds(), 0.0), self.idle_poll_s)

    async def _claim_due(self, limit: int) -> list[str]:
        async with self.sessionmaker() as session, session.begin():
            due = await session.scalars(
                select(WebhookEvent.id)
                .where(
                    WebhookEvent.status == "pending",
                    WebhookEvent.next_attempt_at <= utcnow(),
                    ~_blocked_by_earlier(),
                )
                .order_by(WebhookEvent.next_attempt_at, WebhookEvent.created_at)
                .limit(limit)
            )
            ids = list(due)
            if not ids:
                return []
            claimed = await session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(ids), WebhookEvent.status == "pending")
                .values(status="delivering")
                .returning(WebhookEvent.id)
                .execution_options(synchronize_session=False)
            )
            return [row[0] for row in claimed]

    async def _next_due(self) -> datetime | None:
        async with self.sessionmaker() as session:
            return await session.scalar(
                select(func.min(WebhookEvent.next_attempt_at)).where(
                    WebhookEvent.status == "pending", ~_blocked_by_earlier()
                )
            )

    # --- one delivery -------------------------------------------------------------------

    async def _deliver(self, event_id: str) -> None:
        try:
            async with self.sessionmaker() as session:
                event = await session.get(WebhookEvent, event_id)
            if event is None:
                return
            result = await self.attempt(event)
            await self._record(event_id, result)
        except Exception:
            log.exception("webhooks: delivery of %s failed unexpectedly", event_id)
            await self._release_claim(event_id)

    async def attempt(self, event: WebhookEvent) -> AttemptResult:
        """POST the event once. Never raises for receiver or network failures."""
        body = encode_body(event.payload)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            ID_HEADER: event.id,
            EVENT_HEADER: event.event_type,
            ATTEMPT_HEADER: str(event.attempts + 1),
            SIGNATURE_HEADER: signature(
                self.settings.WEBHOOK_SIGNING_SECRET, body, int(time.time())
            ),
        }
        started = time.perf_counter()
        try:
            # Streamed and left unread: a receiver's response body is never needed.
            async with self.client.stream("POST", event.url, content=body, headers=headers) as r:
                code = r.status_code
        except UnsafeURLError as exc:
            return AttemptResult(None, f"refused: {exc}", _ms_since(started), permanent=True)
        except httpx.HTTPError as exc:
            return AttemptResult(None, _describe(exc), _ms_since(started))
        error = None if 200 <= code < 300 else f"HTTP {code}"
        return AttemptResult(code, error, _ms_since(started), not is_retryable_status(code))

    async def _record(self, event_id: str, result: AttemptResult) -> None:
        async with self.sessionmaker() as session, session.begin():
            event = await session.get(WebhookEvent, event_id)
            if event is None:
                return
            session.add(
                WebhookAttempt(
                    event_id=event_id,
                    status_code=result.status_code,
                    latency_ms=round(result.latency_ms, 1),
                    error=result.error,
                )
            )
            event.attempts += 1
            event.last_status_code = result.status_code
            event.last_error = result.error
            self._advance(event, result)
        log.info(
            "webhook %s %s attempt %d: %s",
            event.event_type,
            event_id,
            event.attempts,
            event.status if result.error is None else f"{event.status} ({result.error})",
        )

    def _advance(self, event: WebhookEvent, result: AttemptResult) -> None:
        now = utcnow()
        deadline = event.created_at + timedelta(seconds=self.settings.WEBHOOK_RETRY_PERIOD_S)
        if result.delivered:
            event.status, event.delivered_at = "delivered", now
        elif result.permanent or now >= deadline:
            event.status = "failed"
        else:
            event.status = "pending"
            event.next_attempt_at = min(now + timedelta(seconds=self.backoff(event)), deadline)

    def backoff(self, event: WebhookEvent) -> float:
        """Exponential from WEBHOOK_BACKOFF_BASE_S, capped, with jitter in [50 %, 100 %]."""
        base = self.settings.WEBHOOK_BACKOFF_BASE_S * 2 ** min(event.attempts - 1, 30)
        return min(base, MAX_BACKOFF_S) * (0.5 + self.jitter() / 2)

    async def _release_claim(self, event_id: str) -> None:
        with contextlib.suppress(Exception):
            async with self.sessionmaker() as session, session.begin():
                await session.execute(
                    update(WebhookEvent)
                    .where(WebhookEvent.id == event_id, WebhookEvent.status == "delivering")
                    .values(
                        status="pending",
                        next_attempt_at=utcnow()
                        + timedelta(seconds=self.settings.WEBHOOK_BACKOFF_BASE_S),
                    )
                )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _describe(exc: httpx.HTTPError) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}"[:500] if detail else type(exc).__name__


async def redeliver(session: AsyncSession, event: WebhookEvent) -> None:
    """Queue `event` for another delivery now (same id). Automatic retries after a failed
    redelivery continue only within the original retry period."""
    event.status = "pending"
    event.next_attempt_at = utcnow()
