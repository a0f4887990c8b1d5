"""The console's webhook delivery log: deliveries filtered by status, event and call (the
newest first), and one delivery with its payload and every attempt. Redelivery is the page
script's call to `/v1`.

Must not import: twilio, deepgram, ollama, chromadb, adapters, pipeline, voice_pipeline,
runtime.
Of ours, imports only: api, config, console, models, postcall, schemas.
"""

from __future__ import annotations

import json
from typing import Annotated, get_args
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from api.deps import SessionDep
from console.web import PAGE_SIZE, Signed, not_found, page
from models import WebhookAttempt, WebhookEvent
from postcall.dispatcher import DeliveryStatus
from schemas import WebhookEventName

router = APIRouter(prefix="/console", include_in_schema=False)
DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)
EVENT_TYPES: tuple[str, ...] = get_args(WebhookEventName)


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
        statuses=DELIVERY_STATUSES,
        event_types=EVENT_TYPES,
        next_url=next_url,
    )


@router.get("/webhooks/{delivery_id}")
async def webhook_page(
    delivery_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    delivery = await session.get(WebhookEvent, delivery_id)
    if delivery is None:
        return not_found(request, signed, "webhook delivery", delivery_id)
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
