"""The webhook dispatcher: one background task per app claims due outbox rows (`pending` ->
`delivering`), POSTs them with httpx and records every attempt (`WebhookAttempt`). Rules:

- 2xx delivered; 4xx other than 408/429, or a receiver on a refused address: failed at once;
  anything else (5xx, 408, 429, timeouts, connection errors) retried with exponential
  backoff and jitter until `WEBHOOK_RETRY_PERIOD_S` after the event was created.
- Events of one call go out in creation order: a row waits while an earlier row of its call
  is pending or delivering (delivered and failed rows no longer block).
- Delivery is at least once. Each event keeps its id (`X-Webhook-Id`) across retries and
  redeliveries, so a receiver that records ids gets exactly once.
- One dispatcher per database: at start, rows left `delivering` by a crash are retried.
- Each attempt is signed afresh (`adapters.signing`) over the exact body bytes.

The rows come from `postcall.outbox`.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb, postcall.analysis, postcall.outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from adapters.netguard import UnsafeURLError, guarded_client
from adapters.signing import SIGNATURE_HEADER, signature
from config import Settings
from models import WebhookAttempt, WebhookEvent
from postcall.hooks import TaskSet
from utils import utcnow

log = logging.getLogger("ai_sdr.webhooks")

ID_HEADER = "X-Webhook-Id"
EVENT_HEADER = "X-Webhook-Event"
ATTEMPT_HEADER = "X-Webhook-Attempt"
USER_AGENT = "ai-sdr-webhooks/0.1"

MAX_BACKOFF_S = 3600.0
DeliveryStatus = Literal["pending", "delivering", "delivered", "failed"]


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


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
        self.client = guarded_client(
            allow_private=settings.ALLOW_PRIVATE_URLS,
            timeout=settings.WEBHOOK_TIMEOUT_S,
            inner=transport,
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
        base = self.settings.WEBHOOK_BACKOFF_BASE_S * 2.0 ** min(event.attempts - 1, 30)
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
