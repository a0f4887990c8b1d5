"""The console's pages at `/console`: sign-in and sign-out, agents (with their documents, a
question box and the browser test call), calls (live list, call detail timeline), analytics
and the webhook delivery log. Pages are rendered on the server (Jinja2); the page scripts
(`static/console.js`) call the `/v1` API with the session cookie and the CSRF header.

Every route but the sign-in page and the static assets needs a session: a page without one
redirects to the sign-in page, the live feed answers 401. Every response carries a
Content-Security-Policy that allows no inline script or style.

Must not import the pipeline or vendor SDKs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, WebSocket
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.admission import INBOUND_HOLD_S
from api.analytics import GroupBy
from api.analytics import analytics as analytics_figures
from api.calls import CallDirection, call_filters
from api.deps import SessionDep, SettingsDep
from api.errors import APIError
from config import Settings
from console import views
from console.media import BrowserMediaStream
from console.session import (
    CSRF_FIELD,
    ConsoleSession,
    csrf_ok,
    end_session,
    matching_key_id,
    read_session,
    set_sign_in_cookie,
    sign_in_csrf_ok,
    sign_in_token,
    start_session,
)
from models import (
    CALL_STATUSES,
    TERMINAL_STATUSES,
    Agent,
    Call,
    CallEvent,
    Document,
    ToolInvocation,
    WebhookAttempt,
    WebhookEvent,
)
from postcall.analysis import OUTCOMES
from postcall.report import tool_calls
from schemas import AGENT_DEFAULTS
from utils import new_id

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
PAGE_SIZE = 50
LIVE_POLL_S = 1.0
LIVE_STREAM_MAX_S = 300.0
"""A live feed ends after this long; EventSource reconnects by itself."""

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; worker-src 'self'; font-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class SignInRequired(Exception):
    """A page was asked for without a session: redirect to the sign-in page."""


def console_session(request: Request, settings: SettingsDep) -> ConsoleSession:
    session = read_session(request, settings)
    if session is None:
        raise SignInRequired
    return session


Signed = Annotated[ConsoleSession, Depends(console_session)]
router = APIRouter(prefix="/console", include_in_schema=False)


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def page(request: Request, signed: ConsoleSession, name: str, **context: Any) -> Response:
    return render(request, name, {"csrf": signed.csrf, "section": name.split("_")[0], **context})


# --- sign-in ------------------------------------------------------------------------------


@router.get("")
async def console_home(request: Request, settings: SettingsDep) -> Response:
    if read_session(request, settings) is None:
        return _redirect("/console/sign-in")
    return _redirect("/console/calls")


@router.get("/sign-in")
async def sign_in_page(request: Request, settings: SettingsDep) -> Response:
    return _sign_in_form(request, settings)


def _sign_in_form(
    request: Request, settings: Settings, error: str | None = None, status_code: int = 200
) -> Response:
    token, cookie = sign_in_token(request, settings)
    response = render(
        request,
        "sign_in.html",
        {"sign_in_csrf": token, "error": error, "section": "sign-in"},
        status_code,
    )
    if cookie is not None:
        set_sign_in_cookie(response, request, cookie)
    return response


@router.post("/sign-in")
async def sign_in(
    request: Request,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    if not sign_in_csrf_ok(request, settings, csrf_token):
        return _sign_in_form(request, settings, "The form expired: please sign in again.", 403)
    kid = matching_key_id(settings, api_key.strip())
    if kid is None:
        return _sign_in_form(request, settings, "That API key is not valid.", 401)
    response = _redirect("/console/calls")
    start_session(response, request, settings, kid)
    return response


@router.post("/sign-out")
async def sign_out(
    request: Request, signed: Signed, csrf_token: Annotated[str, Form(max_length=200)] = ""
) -> Response:
    if not csrf_ok(signed.csrf, csrf_token):
        raise APIError(403, "csrf_failed", f"missing or invalid {CSRF_FIELD}")
    response = _redirect("/console/sign-in")
    end_session(response, request)
    return response


def _redirect(url: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response


# --- agents -------------------------------------------------------------------------------

AGENT_FIELDS: list[dict[str, Any]] = [
    {"name": "name", "kind": "text", "help": "Shown in the console and in reports."},
    {"name": "system_prompt", "kind": "textarea", "help": "Instructions; {{variables}} fill."},
    {"name": "first_message", "kind": "textarea", "help": "The greeting; {{variables}} fill."},
    {
        "name": "first_message_mode",
        "kind": "select",
        "options": ["assistant_speaks_first", "wait_for_caller"],
        "help": "Who speaks first.",
    },
    {"name": "voice", "kind": "text", "help": "Deepgram Aura voice, e.g. aura-2-thalia-en."},
    {"name": "language", "kind": "text", "help": "BCP-47 language, e.g. en-US, or multi."},
    {"name": "llm_model", "kind": "text", "help": "Ollama model; empty: the service default."},
    {"name": "temperature", "kind": "number", "step": "0.1", "help": "0 to 2."},
    {"name": "max_call_seconds", "kind": "number", "help": "10 to 14400."},
    {"name": "silence_timeout_seconds", "kind": "number", "step": "0.5", "help": "2 to 300."},
    {"name": "min_interrupt_speech_ms", "kind": "number", "help": "Speech that pauses the agent."},
    {"name": "min_interrupt_words", "kind": "number", "help": "Words that make it a barge-in."},
    {"name": "end_call_phrases", "kind": "lines", "help": "One per line: the agent hangs up."},
    {"name": "backchannel_phrases", "kind": "lines", "help": "One per line: never interrupt."},
    {"name": "fallback_line", "kind": "text", "help": "Said when the LLM fails."},
    {"name": "phone_number", "kind": "text", "help": "E.164 number that reaches this agent."},
    {"name": "transfer_number", "kind": "text", "help": "E.164 number for transfers."},
    {"name": "webhook_url", "kind": "text", "help": "https URL for call reports."},
    {
        "name": "webhook_events",
        "kind": "checks",
        "options": [
            "call.started",
            "call.ended",
            "call.analyzed",
            "call.transcript",
            "tool.called",
        ],
        "help": "Events to send (started, ended, analyzed are always sent).",
    },
    {"name": "recording_enabled", "kind": "bool", "help": "Record calls through Twilio."},
    {"name": "tools", "kind": "json", "help": "JSON list of tools."},
    {"name": "variables", "kind": "json", "help": "JSON object of template variables."},
    {"name": "calendar", "kind": "json", "help": "JSON object: timezone, working hours..."},
    {"name": "analysis_schema", "kind": "json", "help": "JSON schema of extracted data."},
]


def _field_values(agent: Agent | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in AGENT_FIELDS:
        name = spec["name"]
        value = getattr(agent, name) if agent is not None else AGENT_DEFAULTS.get(name)
        if spec["kind"] == "lines":
            value = "\n".join(value or [])
        elif spec["kind"] == "json":
            value = json.dumps(value if value is not None else {}, indent=2)
        values[name] = value if value is not None else ""
    return values


@router.get("/agents")
async def agents_page(request: Request, signed: Signed, session: SessionDep) -> Response:
    agents = list(await session.scalars(select(Agent).order_by(Agent.created_at, Agent.id)))
    return page(request, signed, "agents.html", agents=agents)


@router.get("/agents/new")
async def new_agent_page(request: Request, signed: Signed) -> Response:
    return page(
        request,
        signed,
        "agent_edit.html",
        agent=None,
        fields=AGENT_FIELDS,
        values=_field_values(None),
    )


@router.get("/agents/{agent_id}")
async def agent_page(
    agent_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    agent = await session.get(Agent, agent_id)
    if agent is None:
        return _not_found(request, signed, "agent", agent_id)
    documents = list(
        await session.scalars(
            select(Document).where(Document.agent_id == agent.id).order_by(Document.created_at)
        )
    )
    return page(
        request,
        signed,
        "agent_edit.html",
        agent=agent,
        fields=AGENT_FIELDS,
        values=_field_values(agent),
        documents=documents,
    )


@router.get("/agents/{agent_id}/talk")
async def talk_page(
    agent_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    agent = await session.get(Agent, agent_id)
    if agent is None:
        return _not_found(request, signed, "agent", agent_id)
    return page(request, signed, "talk.html", agent=agent)


@router.websocket("/agents/{agent_id}/talk/ws")
async def talk_socket(agent_id: str, websocket: WebSocket) -> None:
    """The browser test call: the console session and the page's own origin are required;
    the call is stored with direction `web` and runs in the same `CallSession` as a phone
    call, through `BrowserMediaStream`."""
    app = websocket.app
    settings: Settings = app.state.settings
    origin = websocket.headers.get("origin", "")
    same_origin = origin.split("://", 1)[-1] == websocket.headers.get("host", "")
    await websocket.accept()
    if read_session(websocket, settings) is None or not same_origin:
        await websocket.close(code=1008, reason="sign in to the console first")
        return
    async with app.state.db.sessionmaker() as session:
        agent = await session.get(Agent, agent_id)
        if agent is None:
            await websocket.close(code=1008, reason="no such agent")
            return
        call = Call(
            id=new_id("call"),
            agent_id=agent.id,
            direction="web",
            from_number="browser",
            to_number=agent.phone_number or "",
            status="queued",
            variables=dict(agent.variables),
        )
        admission = app.state.admission
        if not admission.try_admit(call.id, INBOUND_HOLD_S):
            await websocket.close(code=1013, reason="at capacity: retry later")
            return
        session.add(call)
        await session.commit()
    await websocket.send_text(json.dumps({"type": "started", "call_id": call.id}))
    try:
        await app.state.calls.handle(BrowserMediaStream(websocket, call.id))
    finally:
        admission.release(call.id)


def _not_found(request: Request, signed: ConsoleSession, kind: str, ident: str) -> Response:
    return render(
        request,
        "not_found.html",
        {"csrf": signed.csrf, "section": "", "kind": kind, "ident": ident},
        status_code=404,
    )


# --- calls --------------------------------------------------------------------------------


def _day(value: str | None, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise APIError(
            422, "validation_error", f"{field}: not a date (YYYY-MM-DD)", field
        ) from None


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
    first, last = _day(start, "start"), _day(end, "end")
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
async def live_calls(request: Request, settings: SettingsDep) -> Response:
    """Server-sent events: `calls` with the calls that are live or changed lately, whenever
    that set changes (polled each second, one query)."""
    if read_session(request, settings) is None:
        raise APIError(401, "unauthorized", "sign in to the console first")
    sessionmaker = request.app.state.db.sessionmaker

    async def events() -> AsyncIterator[str]:
        started, last, quiet = time.monotonic(), "", 0.0
        yield "retry: 2000\n\n"
        while time.monotonic() - started < LIVE_STREAM_MAX_S:
            if await request.is_disconnected():
                return
            since = datetime.now(UTC) - timedelta(minutes=10)
            async with sessionmaker() as db:
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
            elif (quiet := quiet + LIVE_POLL_S) >= 15:
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
        return _not_found(request, signed, "call", call_id)
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
    call_id: str, request: Request, signed: Signed, session: SessionDep, settings: SettingsDep
) -> Response:
    """The call's recording, fetched from Twilio with the service's credentials so they
    never reach the browser. Only Twilio's own recording URL for the account is fetched."""
    call = await session.get(Call, call_id)
    if call is None or not call.recording_sid:
        raise APIError(404, "not_found", f"call {call_id!r} has no recording")
    twilio = request.app.state.twilio
    try:
        audio = await twilio.fetch_recording(call.recording_sid)
    except Exception as exc:  # Twilio unreachable or refusing: a clear 502, not a 500
        raise APIError(502, "twilio_error", f"could not fetch the recording: {exc}") from None
    return Response(audio, media_type="audio/mpeg", headers={"Cache-Control": "private"})


# --- analytics ----------------------------------------------------------------------------


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
        session, _day(start, "start"), _day(end, "end"), grouping, agent_id or None, None
    )
    buckets = data["buckets"]

    def points(name: str) -> list[tuple[str, float | None]]:
        return [(b["label"][5:] if grouping == "day" else b["label"], b[name]) for b in buckets]

    connect = [
        (label, None if v is None else round(v * 100, 1)) for label, v in points("connect_rate")
    ]
    charts = [
        views.bar_chart("Calls", "calls", points("calls")),
        views.bar_chart("Connect rate", "%", connect),
        views.bar_chart("Meetings booked", "meetings", points("meetings_booked")),
        views.bar_chart("Average lead score", "points", points("average_lead_score")),
        views.bar_chart("Voice-to-voice p50", "ms", points("voice_to_voice_p50_ms")),
        views.bar_chart("Voice-to-voice p95", "ms", points("voice_to_voice_p95_ms")),
        views.bar_chart("Barge-ins per call", "per call", points("barge_ins_per_call")),
        views.bar_chart("Webhook failures", "deliveries", points("webhook_failures")),
    ]
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


# --- webhooks -----------------------------------------------------------------------------


@router.get("/webhooks")
async def webhooks_page(
    request: Request,
    signed: Signed,
    session: SessionDep,
    status: Annotated[str, Query(max_length=20)] = "",
    event_type: Annotated[str, Query(max_length=40)] = "",
    call_id: Annotated[str, Query(max_length=40)] = "",
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Response:
    query = select(WebhookEvent)
    if status:
        query = query.where(WebhookEvent.status == status)
    if event_type:
        query = query.where(WebhookEvent.event_type == event_type)
    if call_id:
        query = query.where(WebhookEvent.call_id == call_id)
    deliveries = list(
        await session.scalars(
            query.order_by(WebhookEvent.created_at.desc(), WebhookEvent.id)
            .limit(PAGE_SIZE + 1)
            .offset(offset)
        )
    )
    chosen = {"status": status, "event_type": event_type, "call_id": call_id}
    next_url = None
    if len(deliveries) > PAGE_SIZE:
        query_string = {**{k: v for k, v in chosen.items() if v}, "offset": offset + PAGE_SIZE}
        next_url = "?" + urlencode(query_string)
    return page(
        request,
        signed,
        "webhooks.html",
        deliveries=deliveries[:PAGE_SIZE],
        chosen=chosen,
        statuses=("pending", "delivering", "delivered", "failed"),
        event_types=(
            "call.started",
            "call.ended",
            "call.analyzed",
            "call.transcript",
            "tool.called",
        ),
        next_url=next_url,
    )


@router.get("/webhooks/{delivery_id}")
async def webhook_page(
    delivery_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    delivery = await session.get(WebhookEvent, delivery_id)
    if delivery is None:
        return _not_found(request, signed, "webhook delivery", delivery_id)
    attempts = list(
        await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id == delivery.id)
            .order_by(WebhookAttempt.attempted_at, WebhookAttempt.id)
        )
    )
    payload = json.dumps(delivery.payload, indent=2, ensure_ascii=False)
    return page(
        request,
        signed,
        "webhook_detail.html",
        delivery=delivery,
        attempts=attempts,
        payload=payload,
    )


# --- wiring -------------------------------------------------------------------------------


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    return _redirect("/console/sign-in")


def install(app: FastAPI) -> None:
    """The console's routes, its static assets and the sign-in redirect, on `app`."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(SignInRequired, _sign_in_required)
