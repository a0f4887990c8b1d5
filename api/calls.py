"""`/v1/calls`: place an outbound call (with an optional `Idempotency-Key`; never to a number
on the do-not-call list), list and read calls with their transcripts, end a live call.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from adapters.telephony import TelephonyError, TwilioGateway, stream_twiml
from api.admission import OUTBOUND_HOLD_S, RETRY_AFTER_S
from api.deps import (
    AdmissionDep,
    MetricsDep,
    PageDep,
    SessionDep,
    SettingsDep,
    StreamTokensDep,
    TwilioDep,
    page_of,
    paginate,
    require_api_key,
)
from api.errors import APIError, not_found
from api.idempotency import IdempotencyKey, replay, request_hash
from api.stream_binding import TOKEN_PARAMETER, StreamTokens
from config import Settings
from models import TERMINAL_STATUSES, Agent, Call, DncEntry
from schemas import CallCreate, CallDetail, CallRead, Page
from utils import mask_phone, new_id

if TYPE_CHECKING:
    from voice_pipeline import CallSession

log = logging.getLogger("ai_sdr.api")
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

_DIAL_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"description": "Twilio refused the call (its code in the message); the call is failed"},
    503: {"description": "MAX_CONCURRENT_CALLS are up: nothing stored, retry after Retry-After"},
    409: {"description": "`dnc`: the number is on the do-not-call list; or the key was reused"},
}
API_ENDED = "api-ended-call"
"""`ended_reason` of a call hung up through `POST /v1/calls/{id}/end`."""
END_GOODBYE = "Sorry, I have to go now. Thanks for your time, goodbye."


@router.post(
    "/calls",
    status_code=201,
    response_model=CallRead,
    response_model_by_alias=True,
    responses=_DIAL_ERRORS,
)
async def create_call(
    body: CallCreate,
    session: SessionDep,
    settings: SettingsDep,
    twilio: TwilioDep,
    admission: AdmissionDep,
    metrics: MetricsDep,
    tokens: StreamTokensDep,
    idempotency_key: IdempotencyKey = None,
) -> Call:
    digest = request_hash(body)
    if idempotency_key:
        existing = await session.scalar(select(Call).where(Call.idempotency_key == idempotency_key))
        if existing is not None:
            return replay(existing, digest)
    if await session.get(DncEntry, body.to) is not None:
        raise APIError(409, "dnc", "to: the number is on the do-not-call list", "to")
    agent = await session.get(Agent, body.agent_id)
    if agent is None:
        raise APIError(404, "not_found", f"agent {body.agent_id!r} does not exist", "agent_id")
    from_number = body.from_ or agent.phone_number or settings.TWILIO_DEFAULT_FROM
    if not from_number:
        raise APIError(
            422, "validation_error", "from: required, the agent has no phone_number", "from"
        )
    call_id = new_id("call")
    if not admission.try_admit(call_id, OUTBOUND_HOLD_S):
        metrics.calls_refused.labels("outbound").inc()
        raise APIError(
            503,
            "at_capacity",
            f"at capacity: {admission.limit} calls are up (MAX_CONCURRENT_CALLS); retry later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        return await _dial(
            session,
            settings,
            twilio,
            tokens,
            agent,
            body,
            call_id,
            from_number,
            (idempotency_key, digest),
        )
    except BaseException:
        admission.release(call_id)  # not dialled (Twilio refused, or the request failed)
        raise


async def _dial(
    session: AsyncSession,
    settings: Settings,
    twilio: TwilioGateway,
    tokens: StreamTokens,
    agent: Agent,
    body: CallCreate,
    call_id: str,
    from_number: str,
    idempotency: tuple[str | None, str],
) -> Call:
    call = Call(
        id=call_id,
        agent_id=agent.id,
        direction="outbound",
        from_number=from_number,
        to_number=body.to,
        status="queued",
        variables={**agent.variables, **body.variables},
        call_metadata=dict(body.metadata),
        idempotency_key=idempotency[0],
        request_hash=idempotency[1],
    )
    session.add(call)
    try:
        await session.commit()
    except IntegrityError:  # the same Idempotency-Key raced in: answer as its repeat
        await session.rollback()
        existing = await session.scalar(select(Call).where(Call.idempotency_key == idempotency[0]))
        if existing is None:
            raise
        return replay(existing, idempotency[1])
    token = tokens.mint(call.id, outbound=True)
    twiml = stream_twiml(settings.media_stream_url, {"call_id": call.id, TOKEN_PARAMETER: token})
    try:
        created = await twilio.create_call(
            to=body.to,
            from_=from_number,
            twiml=twiml,
            status_callback=settings.public_url("/twilio/status"),
            record=agent.recording_enabled,
            recording_status_callback=settings.public_url("/twilio/recording"),
            amd_callback=amd_callback(settings, agent),
        )
    except TelephonyError as exc:
        call.status, call.ended_reason = "failed", "failed"
        call.error_message = f"Twilio error {exc.code}: {exc.message}"
        call.ended_at = call.created_at
        await session.commit()
        log.warning(
            "outbound call %s to %s refused by Twilio (code %s)",
            call.id,
            mask_phone(body.to),
            exc.code,
        )
        raise APIError(
            502, "twilio_error", f"Twilio error {exc.code}: {exc.message}", None
        ) from None
    call.twilio_call_sid = created.sid
    await session.commit()
    await session.refresh(call)
    return call


CallDirection = Literal["inbound", "outbound", "web"]


def call_filters(
    agent_id: str | None = None,
    status: str | None = None,
    direction: str | None = None,
    outcome: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> list[ColumnElement[bool]]:
    """The WHERE clauses of a calls list (the API's and the console's)."""
    filters: list[ColumnElement[bool]] = []
    if agent_id:
        filters.append(Call.agent_id == agent_id)
    if status:
        filters.append(Call.status == status)
    if direction:
        filters.append(Call.direction == direction)
    if outcome:
        filters.append(Call.outcome == outcome)
    if created_after:
        filters.append(Call.created_at >= created_after)
    if created_before:
        filters.append(Call.created_at < created_before)
    return filters


@router.get("/calls", response_model=Page[CallRead], response_model_by_alias=True)
async def list_calls(
    session: SessionDep,
    page: PageDep,
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    direction: CallDirection | None = None,
    outcome: Annotated[str | None, Query(max_length=40, description="the analysis outcome")] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> dict[str, Any]:
    filters = call_filters(agent_id, status, direction, outcome, created_after, created_before)
    query = select(Call).where(*filters).order_by(Call.created_at.desc(), Call.id)
    items, total = await paginate(session, query, page)
    return page_of(items, total, page)


@router.get("/calls/{call_id}", response_model=CallDetail, response_model_by_alias=True)
async def read_call(call_id: str, session: SessionDep) -> Call:
    call = await session.scalar(
        select(Call).where(Call.id == call_id).options(selectinload(Call.turns))
    )
    if call is None:
        raise not_found("call", call_id)
    return call


def amd_callback(settings: Settings, agent: Agent) -> str:
    """Where Twilio posts the answering-machine result; empty when the agent turned
    detection off."""
    if not (agent.voicemail or {}).get("detect", True):
        return ""
    return settings.public_url("/twilio/amd")


@router.post(
    "/calls/{call_id}/end", status_code=202, response_model=CallRead, response_model_by_alias=True
)
async def end_call(call_id: str, session: SessionDep, twilio: TwilioDep, request: Request) -> Call:
    """Hang up a live call: the agent finishes with a goodbye if it is speaking, then
    hangs up (a call whose stream is not up here is hung up through Twilio). The record
    settles with `ended_reason` `api-ended-call`; a 409 if it had already ended."""
    call = await session.get(Call, call_id)
    if call is None:
        raise not_found("call", call_id)
    if call.status in TERMINAL_STATUSES:
        raise APIError(409, "call_ended", f"call {call_id!r} has already ended ({call.status})")
    if not call.twilio_call_sid:
        raise APIError(409, "not_dialed", f"call {call_id!r} has no Twilio call yet")
    if request.app.state.calls.control(call.id, _end_live):
        return call  # the session says its goodbye if it is speaking, then hangs up
    call.ended_reason = call.ended_reason or API_ENDED
    await session.commit()
    try:
        await twilio.hang_up(call.twilio_call_sid)
    except TelephonyError as exc:
        raise APIError(502, "twilio_error", f"Twilio error {exc.code}: {exc.message}") from None
    return call


async def _end_live(call: CallSession) -> None:
    goodbye = END_GOODBYE if call.playout.speech is not None else None
    await call.end(API_ENDED, goodbye)
