"""The console's analytics page: the figures of `GET /v1/analytics` (the same aggregate
queries) per day or per agent over a chosen range, drawn on the server as SVG bar charts.

Must not import: twilio, deepgram, ollama, chromadb, adapters, pipeline, voice_pipeline,
runtime.
Of ours, imports only: api, config, console, models.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from api.analytics import GroupBy
from api.analytics import analytics as analytics_figures
from api.deps import SessionDep
from console import views
from console.web import Signed, page, parse_day
from models import Agent

router = APIRouter(prefix="/console", include_in_schema=False)

CHARTS = (
    ("Calls", "calls", "calls"),
    ("Connect rate", "%", "connect_rate"),
    ("Meetings booked", "meetings", "meetings_booked"),
    ("Average lead score", "points", "average_lead_score"),
    ("Voice-to-voice p50", "ms", "voice_to_voice_p50_ms"),
    ("Voice-to-voice p95", "ms", "voice_to_voice_p95_ms"),
    ("Barge-ins per call", "per call", "barge_ins_per_call"),
    ("Webhook failures", "deliveries", "webhook_failures"),
)
"""Each chart: its title, its unit, and the bucket figure it draws."""


@router.get("/analytics")
async def analytics_page(
    request: Request,
    signed: Signed,
    session: SessionDep,
    start: Annotated[str, Query(max_length=10)] = "",
    end: Annotated[str, Query(max_length=10)] = "",
    group_by: Annotated[str, Query(max_length=10)] = "day",
    agent_id: Annotated[str, Query(max_length=40)] = "",
) -> Response:
    grouping: GroupBy = "agent" if group_by == "agent" else "day"
    data = await analytics_figures(
        session,
        parse_day(start, "start"),
        parse_day(end, "end"),
        grouping,
        agent_id or None,
        None,
    )
    buckets = data["buckets"]

    def points(name: str) -> list[tuple[str, float | None]]:
        labelled = []
        for bucket in buckets:
            label = bucket["label"][5:] if grouping == "day" else bucket["label"]  # MM-DD
            value = bucket[name]
            if name == "connect_rate" and value is not None:
                value = round(value * 100, 1)
            labelled.append((label, value))
        return labelled

    charts = [views.bar_chart(title, unit, points(name)) for title, unit, name in CHARTS]
    outcome_names = sorted({name for b in buckets for name in b["outcomes"]})
    agents = (await session.execute(select(Agent.id, Agent.name).order_by(Agent.name))).all()
    return page(
        request,
        signed,
        "analytics.html",
        data=data,
        charts=charts,
        outcome_names=outcome_names,
        agents=agents,
        chosen={
            "start": data["start"],
            "end": data["end"],
            "group_by": grouping,
            "agent_id": agent_id,
        },
    )
