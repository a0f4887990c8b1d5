"""The `/v1` routes for webhook deliveries (the delivery log and redelivery) and for exports
(one call's transcript; calls as CSV for CRM imports). Bearer API key on every route.

Include this router before `api.calls`: `/v1/calls/export` would otherwise be read as
`/v1/calls/{call_id}`.

The calls export is streamed in keyset-paginated batches, each read in its own short
session, so neither the export nor a slow client holds memory or a database snapshot open.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.deps import PageDep, SessionDep, paginate, require_api_key
from api.errors import APIError, not_found
from models import Agent, Call, WebhookAttempt, WebhookEvent
from postcall.dispatcher import DeliveryStatus, redeliver
from postcall.report import SPEAKERS, iso, load_turns, transcript_text, turn_record
from schemas import Page

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

EXPORT_BATCH = 500


# --- delivery log -------------------------------------------------------------------------


class WebhookAttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempted_at: datetime
    status_code: int | None
    latency_ms: float | None
    error: str | None


class WebhookDeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    call_id: str | None
    agent_id: str | None
    event_type: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    attempt_log: list[WebhookAttemptRead]


class WebhookDeliveryDetail(WebhookDeliveryRead):
    payload: dict[str, Any]


async def _attempt_logs(session: AsyncSession, ids: list[str]) -> dict[str, list[Any]]:
    logs: dict[str, list[Any]] = {event_id: [] for event_id in ids}
    attempts = await session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.event_id.in_(ids))
        .order_by(WebhookAttempt.attempted_at, WebhookAttempt.id)
    )
    for attempt in attempts:
        logs[attempt.event_id].append(attempt)
    return logs


def _delivery(event: WebhookEvent, log: list[Any], *, detail: bool = False) -> dict[str, Any]:
    fields = WebhookDeliveryRead.model_fields.keys() - {"attempt_log"}
    values = {name: getattr(event, name) for name in fields}
    values["attempt_log"] = log
    if detail:
        values["payload"] = event.payload
    return values


async def _get_delivery(delivery_id: str, session: SessionDep) -> WebhookEvent:
    event = await session.get(WebhookEvent, delivery_id)
    if event is None:
        raise not_found("webhook delivery", delivery_id)
    return event


DeliveryDep = Annotated[WebhookEvent, Depends(_get_delivery)]


@router.get("/webhook-deliveries", response_model=Page[WebhookDeliveryRead])
async def list_deliveries(
    session: SessionDep,
    page: PageDep,
    call_id: Annotated[str | None, Query(max_length=40)] = None,
    status: DeliveryStatus | None = None,
) -> dict[str, Any]:
    query = select(WebhookEvent).order_by(WebhookEvent.created_at.desc(), WebhookEvent.id)
    if call_id:
        query = query.where(WebhookEvent.call_id == call_id)
    if status:
        query = query.where(WebhookEvent.status == status)
    events, total = await paginate(session, query, page)
    logs = await _attempt_logs(session, [e.id for e in events])
    items = [_delivery(e, logs[e.id]) for e in events]
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/webhook-deliveries/{delivery_id}", response_model=WebhookDeliveryDetail)
async def read_delivery(event: DeliveryDep, session: SessionDep) -> dict[str, Any]:
    logs = await _attempt_logs(session, [event.id])
    return _delivery(event, logs[event.id], detail=True)


@router.post(
    "/webhook-deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=WebhookDeliveryRead,
)
async def redeliver_delivery(
    event: DeliveryDep, session: SessionDep, request: Request
) -> dict[str, Any]:
    if event.status == "delivering":
        raise APIError(409, "conflict", "this delivery is being attempted right now")
    await redeliver(session, event)
    await session.commit()
    request.app.state.post_call.dispatcher.wake()
    logs = await _attempt_logs(session, [event.id])
    return _delivery(event, logs[event.id])


# --- transcript export ----------------------------------------------------------------------

TranscriptFormat = Literal["json", "txt", "csv"]
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str | None) -> str:
    """Free text for a spreadsheet cell: a leading formula character is neutralised."""
    if not text:
        return ""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def _attachment(call_id: str, extension: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{call_id}-transcript.{extension}"'}


def _transcript_csv(turns: list[Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["seq", "speaker", "role", "start_s", "end_s", "interrupted", "text"])
    for turn in turns:
        speaker = SPEAKERS.get(turn.role, turn.role)
        writer.writerow(
            [
                turn.seq,
                speaker,
                turn.role,
                turn.start_s,
                turn.end_s,
                str(turn.interrupted).lower(),
                safe_cell(turn.text),
            ]
        )
    return out.getvalue()


@router.get("/calls/{call_id}/transcript", response_model=None)
async def export_transcript(
    call_id: str,
    session: SessionDep,
    fmt: Annotated[TranscriptFormat, Query(alias="format")] = "json",
) -> Response | dict[str, Any]:
    if await session.get(Call, call_id) is None:
        raise not_found("call", call_id)
    turns = await load_turns(session, call_id)
    if fmt == "txt":
        return PlainTextResponse(transcript_text(turns), headers=_attachment(call_id, "txt"))
    if fmt == "csv":
        return Response(
            _transcript_csv(turns),
            media_type="text/csv; charset=utf-8",
            headers=_attachment(call_id, "csv"),
        )
    return {"call_id": call_id, "turns": [turn_record(t) for t in turns]}


# --- calls export ---------------------------------------------------------------------------

CALL_COLUMNS = (
    "call_id",
    "agent_id",
    "agent_name",
    "direction",
    "from",
    "to",
    "status",
    "ended_reason",
    "created_at",
    "started_at",
    "ended_at",
    "duration_seconds",
    "recording_url",
    "analysis_status",
    "outcome",
    "lead_score",
    "caller_sentiment",
    "success",
    "summary",
    "structured_data",
)


def call_row(call: Call, agent_name: str | None) -> list[Any]:
    analysis = call.analysis or {}
    structured = analysis.get("structured_data")
    return [
        call.id,
        call.agent_id or "",
        safe_cell(agent_name),
        call.direction,
        call.from_number,
        call.to_number,
        call.status,
        call.ended_reason or "",
        iso(call.created_at),
        iso(call.started_at) or "",
        iso(call.ended_at) or "",
        call.duration_seconds if call.duration_seconds is not None else "",
        call.recording_url or "",
        call.analysis_status or "",
        analysis.get("outcome", ""),
        analysis.get("lead_score", ""),
        analysis.get("caller_sentiment", ""),
        str(analysis["success"]).lower() if "success" in analysis else "",
        safe_cell(analysis.get("summary")),
        json.dumps(structured, ensure_ascii=False) if structured else "",
    ]


async def call_batches(
    sessionmaker: async_sessionmaker[AsyncSession], filters: list[Any], batch: int = EXPORT_BATCH
) -> AsyncIterator[list[tuple[Call, str | None]]]:
    """Matching calls oldest first, `batch` at a time, by keyset on (created_at, id)."""
    after: tuple[datetime, str] | None = None
    while True:
        query = (
            select(Call, Agent.name)
            .outerjoin(Agent, Agent.id == Call.agent_id)
            .where(*filters)
            .order_by(Call.created_at, Call.id)
            .limit(batch)
        )
        if after is not None:
            query = query.where(
                or_(
                    Call.created_at > after[0],
                    and_(Call.created_at == after[0], Call.id > after[1]),
                )
            )
        async with sessionmaker() as session:
            result = await session.execute(query)
            rows: list[tuple[Call, str | None]] = [(call, name) for call, name in result.all()]
        if rows:
            yield rows
        if len(rows) < batch:
            return
        after = (rows[-1][0].created_at, rows[-1][0].id)


async def _csv_stream(batches: AsyncIterator[list[tuple[Call, str | None]]]) -> AsyncIterator[str]:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CALL_COLUMNS)
    yield out.getvalue()
    async for rows in batches:
        out.seek(0)
        out.truncate()
        writer.writerows(call_row(call, name) for call, name in rows)
        yield out.getvalue()


@router.get("/calls/export", response_class=StreamingResponse)
async def export_calls(
    request: Request,
    fmt: Annotated[Literal["csv"], Query(alias="format")] = "csv",
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    direction: Literal["inbound", "outbound"] | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> StreamingResponse:
    filters: list[Any] = []
    if agent_id:
        filters.append(Call.agent_id == agent_id)
    if status:
        filters.append(Call.status == status)
    if direction:
        filters.append(Call.direction == direction)
    if created_after:
        filters.append(Call.created_at >= created_after)
    if created_before:
        filters.append(Call.created_at < created_before)
    batches = call_batches(request.app.state.db.sessionmaker, filters)
    return StreamingResponse(
        _csv_stream(batches),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="calls.csv"'},
    )
