"""The console's call pages: the filtered list (keyset pages), the live feed (server-sent
events) that keeps it current, the call detail timeline, and the recording fetched through
the service so Twilio's credentials never reach the browser.

Must not import: twilio, deepgram, ollama, chromadb, adapters, pipeline, voice_pipeline,
runtime.
Of ours, imports only: api, config, console, models, postcall.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, get_args
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.calls import CallDirection, call_filters
from api.console_session import read_session
from api.deps import DatabaseDep, SessionDep, SettingsDep, TwilioDep
from api.errors import APIError
from console import views
from console.web import PAGE_SIZE, SECURITY_HEADERS, Signed, not_found, page, parse_day
from models import (
    CALL_STATUSES,
    TERMINAL_STATUSES,
    Agent,
    Call,
    CallEvent,
    ToolInvocation,
    WebhookEvent,
)
from postcall.analysis import OUTCOMES
from postcall.report import tool_calls

router = APIRouter(prefix="/console", include_in_schema=False)
LIVE_POLL_S = 1.0
LIVE_STREAM_MAX_S = 300.0
"""A live feed ends after this long; EventSource reconnects by itself."""
LIVE_KEEP_ALIVE_S = 15.0


@router.get("/calls")
async def calls_page(
    request: Request,
    signed: Signed,
    session: SessionDep,
    agent_id: Annotated[str, Query(max_length=40)] = "",
    status: Annotated[str, Query(max_length=20)] = "",
    direction: Annotated[str, Query(max_length=20)] = "",
    outcome: Annotated[str, Query(max_length=40)] = "",
    start: Annotated[str, Query(max_length=10)] = "",
    end: Annotated[str, Query(max_length=10)] = "",
    before: Annotated[str, Query(max_length=80)] = "",
) -> Response:
    """Newest first, 50 a page, by keyset (`before` = the last row's created_at|id): as fast
    on the hundredth page as on the first."""
    first, last = parse_day(start, "start"), parse_day(end, "end")
    filters = call_filters(
        agent_id or None,
        status or None,
        direction or None,
        outcome or None,
        datetime.combine(first, datetime.min.time(), UTC) if first else None,
        datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC) if last else None,
    )
    query = select(Call, Agent.name).outerjoin(Agent, Agent.id == Call.agent_id).where(*filters)
    if before:
        created, _, call_id = before.partition("|")
        try:
            at = datetime.fromisoformat(created)
        except ValueError:
            raise APIError(422, "validation_error", "before: not a page cursor", "before") from None
        query = query.where(
            (Call.created_at < at) | ((Call.created_at == at) & (Call.id > call_id))
        )
    rows = (
        await session.execute(query.order_by(Call.created_at.desc(), Call.id).limit(PAGE_SIZE + 1))
    ).all()
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    agents = (await session.execute(select(Agent.id, Agent.name).order_by(Agent.name))).all()
    chosen = {
        "agent_id": agent_id,
        "status": status,
        "direction": direction,
        "outcome": outcome,
        "start": start,
        "end": end,
    }
    next_url = None
    if more:
        last_call = rows[-1][0]
        cursor = f"{last_call.created_at.isoformat()}|{last_call.id}"
        next_url = "?" + urlencode({**{k: v for k, v in chosen.items() if v}, "before": cursor})
    return page(
        request,
        signed,
        "calls.html",
        rows=rows,
        agents=agents,
        chosen=chosen,
        statuses=CALL_STATUSES,
        directions=get_args(CallDirection),
        outcomes=OUTCOMES,
        next_url=next_url,
        first_page=not before,
    )


@router.get("/calls/live")
async def live_calls(request: Request, settings: SettingsDep, database: DatabaseDep) -> Response:
    """Server-sent events: `calls` with the calls that are live or changed lately, whenever
    that set changes (polled each second, one query). Each poll has its own database
    session: the feed runs for minutes."""
    if read_session(request, settings) is None:
        raise APIError(401, "unauthorized", "sign in to the console first")

    async def events() -> AsyncIterator[str]:
        started, last, quiet = time.monotonic(), "", 0.0
        yield "retry: 2000\n\n"
        while time.monotonic() - started < LIVE_STREAM_MAX_S:
            if await request.is_disconnected():
                return
            since = datetime.now(UTC) - timedelta(minutes=10)
            async with database.sessionmaker() as db:
                result = await db.execute(
                    select(Call, Agent.name)
                    .outerjoin(Agent, Agent.id == Call.agent_id)
                    .where(
                        Call.status.not_in(TERMINAL_STATUSES) | (Call.ended_at >= since),
                        Call.created_at >= datetime.now(UTC) - timedelta(days=1),
                    )
                    .order_by(Call.created_at.desc())
                    .limit(100)
                )
                payload = json.dumps([_live_row(call, name) for call, name in result.all()])
            if payload != last:
                last, quiet = payload, 0.0
                yield f"event: calls\ndata: {payload}\n\n"
            elif (quiet := quiet + LIVE_POLL_S) >= LIVE_KEEP_ALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(LIVE_POLL_S)

    headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _live_row(call: Call, agent_name: str | None) -> dict[str, Any]:
    return {
        "id": call.id,
        "agent": agent_name or "",
        "direction": call.direction,
        "status": call.status,
        "ended_reason": call.ended_reason or "",
        "outcome": call.outcome or "",
        "created_at": call.created_at.isoformat(),
        "started_at": call.started_at.isoformat() if call.started_at else None,
        "duration_seconds": call.duration_seconds,
    }


@router.get("/calls/{call_id}")
async def call_page(
    call_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    call = await session.scalar(
        select(Call).where(Call.id == call_id).options(selectinload(Call.turns))
    )
    if call is None:
        return not_found(request, signed, "call", call_id)
    agent = await session.get(Agent, call.agent_id) if call.agent_id else None
    events = list(
        await session.scalars(
            select(CallEvent).where(CallEvent.call_id == call.id).order_by(CallEvent.id)
        )
    )
    invocations = list(
        await session.scalars(
            select(ToolInvocation)
            .where(ToolInvocation.call_id == call.id)
            .order_by(ToolInvocation.started_at, ToolInvocation.id)
        )
    )
    deliveries = list(
        await session.scalars(
            select(WebhookEvent)
            .where(WebhookEvent.call_id == call.id)
            .order_by(WebhookEvent.created_at, WebhookEvent.id)
        )
    )
    turns = list(call.turns)
    bars, scale = views.latency_bars(turns)
    tool_events = [e for e in events if e.type == "tool_called"]
    return page(
        request,
        signed,
        "call_detail.html",
        call=call,
        agent=agent,
        turns=turns,
        timeline=views.timeline(turns, events),
        width=views.TIMELINE_WIDTH,
        bars=bars,
        scale=scale,
        stages=views.LATENCY_STAGES,
        events=events,
        tools=tool_calls(turns, tool_events, invocations),
        deliveries=deliveries,
        analysis=call.analysis or {},
    )


@router.get("/calls/{call_id}/recording")
async def call_recording(
    call_id: str, signed: Signed, session: SessionDep, twilio: TwilioDep
) -> Response:
    """The call's recording, fetched from Twilio with the service's credentials so they
    never reach the browser. Only Twilio's own recording URL for the account is fetched."""
    call = await session.get(Call, call_id)
    if call is None or not call.recording_sid:
        raise APIError(404, "not_found", f"call {call_id!r} has no recording")
    try:
        audio = await twilio.fetch_recording(call.recording_sid)
    except Exception as exc:  # Twilio unreachable or refusing: a clear 502, not a 500
        raise APIError(502, "twilio_error", f"could not fetch the recording: {exc}") from None
    return Response(audio, media_type="audio/mpeg", headers={"Cache-Control": "private"})
