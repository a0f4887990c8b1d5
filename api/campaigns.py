"""`/v1/campaigns`: create outbound campaigns, add contacts (JSON or CSV), move them through
their lifecycle, and read live counters, contacts with their attempts and a results CSV.

Lifecycle: draft -> running <-> paused -> completed (the dialer, when no contact is left)
or cancelled. Pause and cancel stop new dials; calls in progress finish.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile

from api.deps import (
    PageDep,
    SessionDep,
    SettingsDep,
    get_or_404,
    page_of,
    paginate,
    require_api_key,
)
from api.errors import APIError
from api.idempotency import IdempotencyKey, replay, request_hash
from campaigns.contacts import ImportError_, RowIn, import_contacts, parse_csv
from campaigns.schemas import (
    AttemptRead,
    CampaignCreate,
    CampaignRead,
    ContactRead,
    ContactsIn,
    ImportReportRead,
)
from campaigns.service import CampaignEvents, live_counters
from models import Agent, Campaign, CampaignAttempt, CampaignContact
from schemas import Page

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["campaigns"])

UPLOAD_PATHS = (r"/v1/campaigns/[^/]+/contacts", r"/v1/dnc/import")
"""Contact and do-not-call lists may pass MAX_REQUEST_BYTES (`api.errors.BodySizeLimit`),
up to UPLOAD_BYTES: 100,000 rows (the import's limit) of about 200 bytes."""
UPLOAD_BYTES = 20 * 1024 * 1024

ContactState = Literal[
    "pending",
    "dialing",
    "answered",
    "voicemail",
    "no_answer",
    "busy",
    "failed",
    "invalid",
    "opted_out",
    "suppressed",
    "expired",
    "cancelled",
]


def get_campaign_events(request: Request) -> CampaignEvents:
    events: CampaignEvents = request.app.state.campaign_events
    return events


EventsDep = Annotated[CampaignEvents, Depends(get_campaign_events)]


async def get_campaign(campaign_id: str, session: SessionDep) -> Campaign:
    return await get_or_404(session, Campaign, campaign_id, "campaign")


CampaignDep = Annotated[Campaign, Depends(get_campaign)]


async def _read(session: AsyncSession, campaign: Campaign, events: CampaignEvents) -> CampaignRead:
    read = CampaignRead.model_validate(campaign)
    read.stats = await live_counters(session, campaign, events.clock())
    return read


@router.post(
    "/campaigns", status_code=201, response_model=CampaignRead, response_model_by_alias=True
)
async def create_campaign(
    body: CampaignCreate,
    session: SessionDep,
    settings: SettingsDep,
    events: EventsDep,
    idempotency_key: IdempotencyKey = None,
) -> CampaignRead:
    digest = request_hash(body)
    if idempotency_key:
        existing = await session.scalar(
            select(Campaign).where(Campaign.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return await _read(session, replay(existing, digest), events)
    agent = await session.get(Agent, body.agent_id)
    if agent is None:
        raise APIError(404, "not_found", f"agent {body.agent_id!r} does not exist", "agent_id")
    if not (body.from_ or agent.phone_number or settings.TWILIO_DEFAULT_FROM):
        raise APIError(
            422, "validation_error", "from: required, the agent has no phone_number", "from"
        )
    policy = body.retry_policy.model_dump(mode="json", exclude_none=True)
    campaign = Campaign(
        name=body.name,
        agent_id=body.agent_id,
        from_number=body.from_,
        status="draft",
        calling_window=body.calling_window.model_dump(mode="json"),
        max_concurrent_calls=body.max_concurrent_calls,
        calls_per_second=body.calls_per_second,
        retry_policy=policy,
        start_at=body.start_at,
        end_at=body.end_at,
        variables=body.variables,
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    session.add(campaign)
    try:
        await session.commit()
    except IntegrityError:  # the same key raced in: answer as its repeat
        await session.rollback()
        existing = await session.scalar(
            select(Campaign).where(Campaign.idempotency_key == idempotency_key)
        )
        if existing is None:
            raise
        return await _read(session, replay(existing, digest), events)
    return await _read(session, campaign, events)


@router.get("/campaigns", response_model=Page[CampaignRead], response_model_by_alias=True)
async def list_campaigns(
    session: SessionDep,
    page: PageDep,
    status: Literal["draft", "running", "paused", "completed", "cancelled"] | None = None,
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    query = select(Campaign).order_by(Campaign.created_at.desc(), Campaign.id)
    if status:
        query = query.where(Campaign.status == status)
    if agent_id:
        query = query.where(Campaign.agent_id == agent_id)
    items, total = await paginate(session, query, page)
    return page_of(items, total, page)


@router.get("/campaigns/{campaign_id}", response_model=CampaignRead, response_model_by_alias=True)
async def read_campaign(
    campaign: CampaignDep, session: SessionDep, events: EventsDep
) -> CampaignRead:
    return await _read(session, campaign, events)


# --- contacts ---------------------------------------------------------------------------


@router.post(
    "/campaigns/{campaign_id}/contacts",
    status_code=201,
    response_model=ImportReportRead,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ContactsIn.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        }
    },
)
async def add_contacts(
    campaign: CampaignDep,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    events: EventsDep,
) -> dict[str, Any]:
    """Inline JSON `{"contacts": [...]}` or a multipart CSV upload in a `file` field."""
    if campaign.status in ("completed", "cancelled"):
        raise APIError(409, "conflict", f"campaign is {campaign.status}: no contacts can be added")
    rows = await _contact_rows(request)
    fallback = (campaign.calling_window or {}).get("timezone", "America/New_York")
    report = await import_contacts(
        session,
        campaign.id,
        rows,
        region=settings.DEFAULT_PHONE_REGION,
        fallback_tz=fallback,
        now=events.clock(),
    )
    await session.commit()
    if campaign.status == "running":
        events.wake_dialer()
    return {
        "received": report.received,
        "imported": report.imported,
        "merged": report.merged,
        "suppressed": report.suppressed,
        "errors": report.errors,
    }


async def _contact_rows(request: Request) -> list[RowIn]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        try:
            body = ContactsIn.model_validate(json.loads(await request.body()))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "body"
            message = str(error["msg"]).removeprefix("Value error, ")
            raise APIError(422, "validation_error", f"{field}: {message}", field) from None
        except ValueError:
            raise APIError(422, "validation_error", "body: malformed JSON", "body") from None
        return [
            RowIn(i + 1, c.phone, c.timezone or "", dict(c.variables), dict(c.metadata))
            for i, c in enumerate(body.contacts)
        ]
    if media_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=5)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError(
                    422, "validation_error", "file: a CSV file field named 'file'", "file"
                )
            data = await upload.read()
        finally:
            await form.close()
    elif media_type in ("text/csv", "application/csv"):
        data = await request.body()
    else:
        raise APIError(
            415,
            "unsupported_media_type",
            f"content-type: {media_type or 'none'} is not accepted; send JSON "
            "{\"contacts\": [...]} or multipart/form-data with a CSV in a 'file' field",
            "content-type",
        )
    try:
        return parse_csv(data)
    except ImportError_ as exc:
        raise APIError(422, "invalid_csv", f"file: {exc}", "file") from None


@router.get("/campaigns/{campaign_id}/contacts", response_model=Page[ContactRead])
async def list_contacts(
    campaign: CampaignDep,
    session: SessionDep,
    page: PageDep,
    state: ContactState | None = None,
) -> dict[str, Any]:
    query = (
        select(CampaignContact)
        .where(CampaignContact.campaign_id == campaign.id)
        .order_by(CampaignContact.line, CampaignContact.id)
    )
    if state:
        query = query.where(CampaignContact.state == state)
    contacts, total = await paginate(session, query, page)
    attempts: dict[str, list[CampaignAttempt]] = {}
    if contacts:
        rows = await session.scalars(
            select(CampaignAttempt)
            .where(CampaignAttempt.contact_id.in_([c.id for c in contacts]))
            .order_by(CampaignAttempt.number)
        )
        for attempt in rows:
            attempts.setdefault(attempt.contact_id, []).append(attempt)
    items = [
        ContactRead.model_validate(contact).model_copy(
            update={
                "attempt_log": [AttemptRead.model_validate(a) for a in attempts.get(contact.id, [])]
            }
        )
        for contact in contacts
    ]
    return page_of(items, total, page)


# --- lifecycle --------------------------------------------------------------------------

_MOVES: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    "start": (("draft",), "running", "campaign.started"),
    "pause": (("running",), "paused", "campaign.paused"),
    "resume": (("paused",), "running", "campaign.started"),
    "cancel": (("draft", "running", "paused"), "cancelled", None),
}


async def _move(
    session: AsyncSession, campaign: Campaign, events: EventsDep, action: str
) -> CampaignRead:
    allowed, target, event = _MOVES[action]
    current, now = campaign.status, events.clock()
    values: dict[str, Any] = {"status": target, "updated_at": now}
    if action == "start":
        values["started_at"] = now
    if action == "cancel":
        values["ended_at"] = now
    moved = await session.execute(
        update(Campaign)
        .where(Campaign.id == campaign.id, Campaign.status.in_(allowed))
        .values(**values)
        .returning(Campaign.id)
        .execution_options(synchronize_session=False)
    )
    if moved.first() is None:
        await session.rollback()
        raise APIError(
            409,
            "invalid_state",
            f"cannot {action} a campaign that is {current} (only from {' or '.join(allowed)})",
        )
    if action == "cancel":
        await session.execute(
            update(CampaignContact)
            .where(CampaignContact.campaign_id == campaign.id, CampaignContact.state == "pending")
            .values(state="cancelled", next_attempt_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    await session.refresh(campaign)
    if event is not None:
        await events.emit(session, campaign, event)
    await session.commit()
    events.wake_dialer()
    return await _read(session, campaign, events)


@router.post(
    "/campaigns/{campaign_id}/start", response_model=CampaignRead, response_model_by_alias=True
)
async def start_campaign(
    campaign: CampaignDep, session: SessionDep, events: EventsDep
) -> CampaignRead:
    return await _move(session, campaign, events, "start")


@router.post(
    "/campaigns/{campaign_id}/pause", response_model=CampaignRead, response_model_by_alias=True
)
async def pause_campaign(
    campaign: CampaignDep, session: SessionDep, events: EventsDep
) -> CampaignRead:
    return await _move(session, campaign, events, "pause")


@router.post(
    "/campaigns/{campaign_id}/resume", response_model=CampaignRead, response_model_by_alias=True
)
async def resume_campaign(
    campaign: CampaignDep, session: SessionDep, events: EventsDep
) -> CampaignRead:
    return await _move(session, campaign, events, "resume")


@router.post(
    "/campaigns/{campaign_id}/cancel", response_model=CampaignRead, response_model_by_alias=True
)
async def cancel_campaign(
    campaign: CampaignDep, session: SessionDep, events: EventsDep
) -> CampaignRead:
    return await _move(session, campaign, events, "cancel")
