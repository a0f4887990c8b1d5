"""The `/v1` REST API a CRM uses: agents and calls. Bearer API key on every route.

Routes stay short: dependencies (`SessionDep`, `AgentDep`, `SettingsDep`) do the lookups.
"""

from __future__ import annotations

import hmac
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from admission import OUTBOUND_HOLD_S, RETRY_AFTER_S, CallAdmission
from config import Settings
from db import SessionDep
from errors import APIError, not_found
from models import Agent, Call
from netguard import check_public_url
from schemas import (
    AGENT_DEFAULTS,
    AgentCreate,
    AgentRead,
    AgentUpdate,
    CallCreate,
    CallDetail,
    CallRead,
    Page,
)
from telephony import TelephonyError, TwilioGateway, stream_twiml
from utils import mask_phone, new_id

log = logging.getLogger("ai_sdr.api")
_bearer = HTTPBearer(auto_error=False)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "unauthorized", "missing Bearer API key in the Authorization header")
    supplied = credentials.credentials.encode()
    if not any(hmac.compare_digest(supplied, key.encode()) for key in settings.API_KEYS):
        raise APIError(401, "unauthorized", "invalid API key")


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


async def get_agent(agent_id: str, session: SessionDep) -> Agent:
    agent = await session.get(Agent, agent_id)
    if agent is None:
        raise not_found("agent", agent_id)
    return agent


AgentDep = Annotated[Agent, Depends(get_agent)]


class Pagination:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> None:
        self.limit, self.offset = limit, offset


PageDep = Annotated[Pagination, Depends()]


async def paginate(
    session: SessionDep, query: Select[Any], page: Pagination
) -> tuple[list[Any], int]:
    total = await session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = await session.scalars(query.limit(page.limit).offset(page.offset))
    return list(rows), int(total or 0)


def _check_webhook_url(body: AgentCreate | AgentUpdate, settings: Settings) -> None:
    if body.webhook_url is None:
        return
    try:
        check_public_url(str(body.webhook_url), settings.ALLOW_PRIVATE_URLS)
    except ValueError as exc:
        raise APIError(422, "validation_error", f"webhook_url: {exc}", "webhook_url") from None


def _agent_values(body: AgentCreate | AgentUpdate, *, partial: bool) -> dict[str, Any]:
    values = body.model_dump(mode="json", exclude_unset=partial, exclude_none=not partial)
    if not partial:
        values = {**AGENT_DEFAULTS, **values}
    return values


async def _commit_agent(session: SessionDep, agent: Agent) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise APIError(
            409, "conflict", "phone_number is already assigned to another agent", "phone_number"
        ) from None
    await session.refresh(agent)


# --- agents -----------------------------------------------------------------------------


@router.post("/agents", status_code=201, response_model=AgentRead)
async def create_agent(body: AgentCreate, session: SessionDep, settings: SettingsDep) -> Agent:
    _check_webhook_url(body, settings)
    agent = Agent(**_agent_values(body, partial=False))
    session.add(agent)
    await _commit_agent(session, agent)
    return agent


@router.get("/agents", response_model=Page[AgentRead])
async def list_agents(session: SessionDep, page: PageDep) -> dict[str, Any]:
    items, total = await paginate(session, select(Agent).order_by(Agent.created_at, Agent.id), page)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/agents/{agent_id}", response_model=AgentRead)
async def read_agent(agent: AgentDep) -> Agent:
    return agent


@router.patch("/agents/{agent_id}", response_model=AgentRead)
async def update_agent(
    body: AgentUpdate, agent: AgentDep, session: SessionDep, settings: SettingsDep
) -> Agent:
    _check_webhook_url(body, settings)
    for key, value in _agent_values(body, partial=True).items():
        if value is None and key in AGENT_DEFAULTS:
            raise APIError(422, "validation_error", f"{key}: may not be null", key)
        if value is None and key == "name":
            raise APIError(422, "validation_error", "name: may not be null", "name")
        setattr(agent, key, value)
    await _commit_agent(session, agent)
    return agent


@router.delete("/agents/{agent_id}", status_code=204)
async def delete_agent(agent: AgentDep, session: SessionDep, request: Request) -> Response:
    await session.delete(agent)
    await session.commit()
    knowledge = getattr(request.app.state, "knowledge", None)
    if knowledge is not None:
        await knowledge.delete_agent(agent.id)
    return Response(status_code=204)


# --- calls ------------------------------------------------------------------------------


def _twilio(request: Request) -> TwilioGateway:
    return request.app.state.twilio


TwilioDep = Annotated[TwilioGateway, Depends(_twilio)]


_DIAL_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"description": "Twilio refused the call (its code in the message); the call is failed"},
    503: {"description": "MAX_CONCURRENT_CALLS are up: nothing stored, retry after Retry-After"},
}


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
    request: Request,
) -> Call:
    agent = await session.get(Agent, body.agent_id)
    if agent is None:
        raise APIError(404, "not_found", f"agent {body.agent_id!r} does not exist", "agent_id")
    from_number = body.from_ or agent.phone_number or settings.TWILIO_DEFAULT_FROM
    if not from_number:
        raise APIError(
            422, "validation_error", "from: required, the agent has no phone_number", "from"
        )
    admission: CallAdmission = request.app.state.admission
    call_id = new_id("call")
    if not admission.try_admit(call_id, OUTBOUND_HOLD_S):
        request.app.state.metrics.calls_refused.labels("outbound").inc()
        raise APIError(
            503,
            "at_capacity",
            f"at capacity: {admission.limit} calls are up (MAX_CONCURRENT_CALLS); retry later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        return await _dial(session, settings, twilio, agent, body, call_id, from_number)
    except BaseException:
        admission.release(call_id)  # not dialled (Twilio refused, or the request failed)
        raise


async def _dial(
    session: SessionDep,
    settings: Settings,
    twilio: TwilioGateway,
    agent: Agent,
    body: CallCreate,
    call_id: str,
    from_number: str,
) -> Call:
    call = Call(
        id=call_id,
        agent_id=agent.id,
        direction="outbound",
        from_number=from_number,
        to_number=body.to,
        status="queued",
        variables={**agent.variables, **body.variables},
    )
    session.add(call)
    await session.commit()
    twiml = stream_twiml(settings.media_stream_url, {"call_id": call.id})
    try:
        created = await twilio.create_call(
            to=body.to,
            from_=from_number,
            twiml=twiml,
            status_callback=settings.public_url("/twilio/status"),
            record=agent.recording_enabled,
            recording_status_callback=settings.public_url("/twilio/recording"),
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


@router.get("/calls", response_model=Page[CallRead], response_model_by_alias=True)
async def list_calls(
    session: SessionDep,
    page: PageDep,
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    direction: Literal["inbound", "outbound"] | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> dict[str, Any]:
    query = select(Call).order_by(Call.created_at.desc(), Call.id)
    if agent_id:
        query = query.where(Call.agent_id == agent_id)
    if status:
        query = query.where(Call.status == status)
    if direction:
        query = query.where(Call.direction == direction)
    if created_after:
        query = query.where(Call.created_at >= created_after)
    if created_before:
        query = query.where(Call.created_at < created_before)
    items, total = await paginate(session, query, page)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/calls/{call_id}", response_model=CallDetail, response_model_by_alias=True)
async def read_call(call_id: str, session: SessionDep) -> Call:
    call = await session.scalar(
        select(Call).where(Call.id == call_id).options(selectinload(Call.turns))
    )
    if call is None:
        raise not_found("call", call_id)
    return call
