"""`/v1/bookings`: meetings the agents booked during calls, as JSON and as iCalendar files.

Bookings are created by the `book_meeting` tool (`tools.runner`), never through this API.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import select

from api.deps import PageDep, SessionDep, paginate, require_api_key
from api.errors import not_found
from models import Agent, Booking
from schemas import BookingRead, Page
from tools.scheduling import booking_ics

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["bookings"])


async def get_booking(booking_id: str, session: SessionDep) -> Booking:
    booking = await session.get(Booking, booking_id)
    if booking is None:
        raise not_found("booking", booking_id)
    return booking


BookingDep = Annotated[Booking, Depends(get_booking)]


@router.get("/bookings", response_model=Page[BookingRead])
async def list_bookings(
    session: SessionDep,
    page: PageDep,
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    call_id: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    query = select(Booking).order_by(Booking.start_at, Booking.id)
    if agent_id:
        query = query.where(Booking.agent_id == agent_id)
    if call_id:
        query = query.where(Booking.call_id == call_id)
    items, total = await paginate(session, query, page)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


# Registered before /bookings/{booking_id}, which would otherwise take "bkg_x.ics" as an id.
@router.get(
    "/bookings/{booking_id}.ics",
    response_class=Response,
    responses={200: {"content": {"text/calendar": {}}}},
)
async def booking_calendar_file(booking: BookingDep, session: SessionDep) -> Response:
    agent = await session.get(Agent, booking.agent_id)
    who = booking.attendee_name or "a caller"
    description = "\n".join(
        line
        for line in (
            f"Booked by {agent.name if agent else 'the AI agent'} during a call with {who}.",
            f"Phone: {booking.attendee_phone}" if booking.attendee_phone else "",
            f"Email: {booking.attendee_email}" if booking.attendee_email else "",
            booking.notes or "",
        )
        if line
    )
    body = booking_ics(
        uid=f"{booking.id}@ai-sdr",
        start=booking.start_at,
        end=booking.end_at,
        created=booking.created_at,
        summary=f"Meeting with {who}",
        description=description,
        cancelled=booking.status == "cancelled",
    )
    disposition = f'attachment; filename="{booking.id}.ics"'
    return Response(
        body,
        media_type="text/calendar; charset=utf-8",
        headers={"Content-Disposition": disposition},
    )


@router.get("/bookings/{booking_id}", response_model=BookingRead)
async def read_booking(booking: BookingDep) -> Booking:
    return booking
