"""The webhook outbox: `Outbox.on_call_event` is part of the `CallHook`. It runs inside the
transaction that changes a call and adds a `WebhookEvent` row there, so an event exists if
and only if the change it reports committed. The row holds the exact payload; the database
is the only state, so pending deliveries survive a restart. `postcall.dispatcher` delivers
the rows.

`call.ended` is held back up to ANALYSIS_WAIT_S while the call's analysis runs
(`release_report` sends it early with the analysis in it); see `postcall.analysis`.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb, postcall.analysis, postcall.dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from models import Agent, Call, CallEvent, TranscriptTurn, WebhookEvent
from postcall.hooks import after_commit
from postcall.report import (
    analysis_fields,
    build_report,
    call_record,
    iso,
    load_agent,
    turn_record,
)
from utils import new_id, utcnow

ALWAYS_SENT = frozenset({"call.started", "call.ended", "call.analyzed"})
"""Sent to every agent with a webhook URL; the other `schemas.WebhookEventName`s only when
listed in the agent's `webhook_events`."""


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
