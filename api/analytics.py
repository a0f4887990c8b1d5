"""`GET /v1/analytics`: call figures per day or per agent over a date range, for the
console's charts and for a CRM.

Per bucket: calls, connected calls and the connect rate, calls by analysed outcome,
meetings booked, average lead score, voice-to-voice p50/p95 (the agent's first audio after
the caller's end of speech, per answer, to 10 ms), barge-ins per call and failed webhook
deliveries. Every figure is of the calls created in the range (and matching the filters),
so the buckets add up to the totals. Each figure is an aggregate query in the database,
grouped by bucket; the percentiles come from a latency histogram (10 ms bins) that the
totals merge, so no rows are pulled into Python.

Must not import: twilio, deepgram, ollama, chromadb, pipeline, voice_pipeline, console.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Integer, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import SessionDep, require_api_key
from api.errors import APIError
from models import Agent, Booking, Call, CallEvent, TranscriptTurn, WebhookEvent

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["analytics"])

MAX_RANGE_DAYS = 366
LATENCY_BIN_MS = 10
"""Voice-to-voice percentiles are read off a histogram of this resolution (upper edges)."""
DEFAULT_RANGE_DAYS = 30
GroupBy = Literal["day", "agent"]
Direction = Literal["inbound", "outbound", "web"]


class Figures(BaseModel):
    calls: int = 0
    connected: int = 0
    connect_rate: float | None = None
    outcomes: dict[str, int] = {}
    meetings_booked: int = 0
    average_lead_score: float | None = None
    voice_to_voice_p50_ms: float | None = None
    voice_to_voice_p95_ms: float | None = None
    barge_ins: int = 0
    barge_ins_per_call: float | None = None
    webhook_failures: int = 0


class Bucket(Figures):
    key: str
    """The day (`YYYY-MM-DD`, UTC) or the agent id ("" for calls without an agent)."""
    label: str
    """The day again, or the agent's name."""


class Analytics(BaseModel):
    start: date
    end: date
    group_by: GroupBy
    agent_id: str | None
    direction: Direction | None
    buckets: list[Bucket]
    totals: Figures


def _range(start: date | None, end: date | None) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    end = end or today
    start = start or end - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if end < start:
        raise APIError(422, "validation_error", "end: must not be before start", "end")
    if (end - start).days >= MAX_RANGE_DAYS:
        message = f"end: the range may span at most {MAX_RANGE_DAYS} days"
        raise APIError(422, "validation_error", message, "end")
    return start, end


@router.get("/analytics", response_model=Analytics)
async def analytics(
    session: SessionDep,
    start: Annotated[date | None, Query(description="first day (UTC), default 30 days ago")] = None,
    end: Annotated[
        date | None, Query(description="last day (UTC), included; default today")
    ] = None,
    group_by: GroupBy = "day",
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    direction: Direction | None = None,
) -> dict[str, Any]:
    start, end = _range(start, end)
    filters: list[ColumnElement[bool]] = [
        Call.created_at >= datetime.combine(start, time(), UTC),
        Call.created_at < datetime.combine(end + timedelta(days=1), time(), UTC),
    ]
    if agent_id:
        filters.append(Call.agent_id == agent_id)
    if direction:
        filters.append(Call.direction == direction)
    # SQLite keeps the UTC time as text: its first ten characters are the day, cheaper than date()
    day = func.substr(Call.created_at, 1, 10)
    bucket = day if group_by == "day" else func.coalesce(Call.agent_id, "")
    tallies = await _tallies(session, bucket, filters)
    total = _Tally()
    for tally in tallies.values():
        total.merge(tally)
    rows = {name: tally.finish() for name, tally in tallies.items()}
    buckets = await _label(session, group_by, start, end, rows)
    return {
        "start": start,
        "end": end,
        "group_by": group_by,
        "agent_id": agent_id,
        "direction": direction,
        "buckets": buckets,
        "totals": total.finish(),
    }


class _Tally:
    """Sums a bucket's figures are made of; buckets merge into the totals."""

    def __init__(self) -> None:
        self.figures = Figures()
        self.lead_sum = 0.0
        self.lead_count = 0
        self.latency_bins: Counter[int] = Counter()

    def merge(self, other: _Tally) -> None:
        mine, theirs = self.figures, other.figures
        for name in ("calls", "connected", "meetings_booked", "barge_ins", "webhook_failures"):
            setattr(mine, name, getattr(mine, name) + getattr(theirs, name))
        for outcome, count in theirs.outcomes.items():
            mine.outcomes[outcome] = mine.outcomes.get(outcome, 0) + count
        self.lead_sum += other.lead_sum
        self.lead_count += other.lead_count
        self.latency_bins.update(other.latency_bins)

    def finish(self) -> Figures:
        f = self.figures
        if f.calls:
            f.connect_rate = round(f.connected / f.calls, 4)
            f.barge_ins_per_call = round(f.barge_ins / f.calls, 3)
        if self.lead_count:
            f.average_lead_score = round(self.lead_sum / self.lead_count, 1)
        f.voice_to_voice_p50_ms = _percentile(self.latency_bins, 50)
        f.voice_to_voice_p95_ms = _percentile(self.latency_bins, 95)
        return f


def _percentile(bins: Counter[int], percent: int) -> float | None:
    """Nearest rank over the histogram: the upper edge of the bin holding the value whose
    rank reaches `percent`% of the count."""
    total = sum(bins.values())
    if not total:
        return None
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if seen * 100 >= percent * total:
            return float((index + 1) * LATENCY_BIN_MS)
    return None  # pragma: no cover - the loop always reaches the total


async def _tallies(
    session: AsyncSession, bucket: Any, filters: list[ColumnElement[bool]]
) -> dict[str, _Tally]:
    """The tallies per bucket key: five aggregate queries, none reading a call's row (the
    indexes of migration 0006 cover them)."""
    key = bucket.label("bucket")
    tallies: dict[str, _Tally] = {}

    def at(value: Any) -> _Tally:
        return tallies.setdefault(str(value or ""), _Tally())

    per_call = await session.execute(
        select(
            key,
            Call.outcome,
            func.count(),
            func.count(Call.started_at),
            func.sum(Call.lead_score),
            func.count(Call.lead_score),
        )
        .where(*filters)
        .group_by(key, Call.outcome)
    )
    for name, outcome, count, connected, lead_sum, lead_count in per_call:
        tally = at(name)
        tally.figures.calls += count
        tally.figures.connected += connected
        tally.lead_sum += lead_sum or 0
        tally.lead_count += lead_count
        if outcome is not None:
            tally.figures.outcomes[outcome] = count
    counted: list[tuple[str, Any, Any, ColumnElement[bool]]] = [
        ("meetings_booked", Booking, Booking.call_id, Booking.status != "canceled"),
        ("barge_ins", CallEvent, CallEvent.call_id, CallEvent.type == "barge_in"),
        ("webhook_failures", WebhookEvent, WebhookEvent.call_id, WebhookEvent.status == "failed"),
    ]
    for figure, table, call_id, condition in counted:
        query = (
            select(key, func.count())
            .select_from(table)
            .join(Call, Call.id == call_id)
            .where(*filters, condition)
            .group_by(key)
        )
        for name, count in await session.execute(query):
            setattr(at(name).figures, figure, count)
    latency_bin = cast(TranscriptTurn.first_media_ms / LATENCY_BIN_MS, Integer)
    latencies = await session.execute(
        select(key, latency_bin, func.count())
        .select_from(TranscriptTurn)
        .join(Call, Call.id == TranscriptTurn.call_id)
        .where(
            *filters,
            TranscriptTurn.role == "assistant",
            TranscriptTurn.first_media_ms.is_not(None),
        )
        .group_by(key, latency_bin)
    )
    for name, index, count in latencies:
        at(name).latency_bins[int(index)] += count
    return tallies


async def _label(
    session: AsyncSession, group_by: GroupBy, start: date, end: date, rows: dict[str, Figures]
) -> list[dict[str, Any]]:
    """Buckets in order: every day of the range (empty days too), or the agents with calls
    by name."""
    if group_by == "day":
        days = [start + timedelta(days=n) for n in range((end - start).days + 1)]
        return [_bucket(d.isoformat(), d.isoformat(), rows.get(d.isoformat())) for d in days]
    ids = [key for key in rows if key]
    found = await session.execute(select(Agent.id, Agent.name).where(Agent.id.in_(ids)))
    names: dict[str, str] = {agent_id: name for agent_id, name in found}
    buckets = [
        _bucket(key, names.get(key, key) if key else "(no agent)", f) for key, f in rows.items()
    ]
    return sorted(buckets, key=lambda b: (-b["calls"], b["label"]))


def _bucket(key: str, label: str, figures: Figures | None) -> dict[str, Any]:
    return {"key": key, "label": label, **(figures or Figures()).model_dump()}
