"""The calendar tools: `check_availability` (read-only) and `book_meeting`, over the
agent's calendar settings and the `bookings` table. Bookings are serialised per agent, so
two calls never take the same slot.

Must not import FastAPI, routes or voice_pipeline.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import date, datetime, timedelta
from itertools import groupby, islice
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from models import Agent, Booking
from pipeline.contracts import ToolContext, ToolOutcome
from pipeline.providers import ToolCall
from schemas import CalendarSettings
from tools.common import error, key_hash, text_arg
from tools.scheduling import (
    Interval,
    Slot,
    calendar_from,
    free_slots,
    horizon_end,
    local_iso,
    parse_day,
    parse_start,
    spoken_time,
    spread,
    unavailable_reason,
    zone,
    zone_label,
)

SLOTS_FOR_A_DAY = 6
DAYS_OFFERED, SLOTS_PER_DAY = 3, 2


class Bookings:
    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], clock: Callable[[], datetime]
    ) -> None:
        self.sessionmaker = sessionmaker
        self.clock = clock
        self._booking_locks: dict[str, asyncio.Lock] = {}

    async def _calendar(self, agent_id: str) -> CalendarSettings:
        async with self.sessionmaker() as session:
            agent = await session.get(Agent, agent_id)
        return calendar_from(agent.calendar if agent else None)

    async def _busy(self, agent_id: str, start: datetime, end: datetime) -> list[Interval]:
        async with self.sessionmaker() as session:
            rows = await session.execute(
                select(Booking.start_at, Booking.end_at).where(
                    Booking.agent_id == agent_id,
                    Booking.status != "cancelled",
                    Booking.start_at < end,
                    Booking.end_at > start,
                )
            )
            return [(row.start_at, row.end_at) for row in rows]

    async def _availability(
        self, agent_id: str, calendar: CalendarSettings, day: date | None
    ) -> dict[str, Any]:
        now = self.clock()
        today = now.astimezone(zone(calendar)).date()
        last = horizon_end(calendar, now)
        busy = await self._busy(agent_id, now - timedelta(days=1), now + timedelta(days=400))
        chosen: list[Slot] = []
        if day is not None:
            chosen = spread(free_slots(calendar, busy, now, day, day), SLOTS_FOR_A_DAY)
        result: dict[str, Any] = {
            "today": f"{today:%A} {today.isoformat()}",
            "timezone": calendar.timezone,
        }
        if not chosen:
            after = today if day is None else max(day + timedelta(days=1), today)
            if day is not None:
                result["note"] = "no free times that day; here are the next free times"
            chosen = first_days(free_slots(calendar, busy, now, after, last))
        result["free_slots"] = [
            {"start": local_iso(slot.start, calendar), "spoken": spoken_time(slot.start, calendar)}
            for slot in chosen
        ]
        if not chosen:
            result["note"] = "no free times in the booking window"
        return result

    async def check_availability(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        calendar = await self._calendar(ctx.config.agent_id)
        day = None
        if day_text := text_arg(call.arguments, "date", 40):
            today = self.clock().astimezone(zone(calendar)).date()
            try:
                day = parse_day(day_text, today)
            except ValueError as exc:
                return error(str(exc))
        return ToolOutcome(await self._availability(ctx.config.agent_id, calendar, day))

    async def book_meeting(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        start_text = text_arg(call.arguments, "start_time", 40)
        if not start_text:
            return error("start_time is required: pass the 'start' of a free time")
        calendar = await self._calendar(ctx.config.agent_id)
        try:
            start = parse_start(start_text, calendar)
        except ValueError as exc:
            return error(str(exc))
        lock = self._booking_locks.setdefault(ctx.config.agent_id, asyncio.Lock())
        async with lock:
            booking, reason, already = await self._insert_booking(call, ctx, calendar, start)
        if booking is None:
            alternatives = await self._availability(ctx.config.agent_id, calendar, start.date())
            return error(reason or "that time is not available", **alternatives)
        return ToolOutcome(confirmation(booking, calendar, already=already))

    async def _insert_booking(
        self, call: ToolCall, ctx: ToolContext, calendar: CalendarSettings, start: datetime
    ) -> tuple[Booking | None, str | None, bool]:
        """(booking, why not, whether it existed). Callers hold the agent's booking lock, so
        the conflict check and the insert cannot interleave with another booking."""
        end = start + timedelta(minutes=calendar.slot_minutes)
        buffer = timedelta(minutes=calendar.buffer_minutes)
        key = key_hash(ctx.idempotency_key)
        async with self.sessionmaker() as session, session.begin():
            nearby = list(
                await session.scalars(
                    select(Booking).where(
                        Booking.agent_id == ctx.config.agent_id,
                        Booking.status != "cancelled",
                        Booking.start_at < end + buffer,
                        Booking.end_at > start - buffer,
                    )
                )
            )
            for booking in nearby:
                same_call = booking.call_id == ctx.config.call_id and booking.start_at == start
                if same_call or booking.idempotency_key == key:
                    return booking, None, True
            busy = [(b.start_at, b.end_at) for b in nearby]
            reason = unavailable_reason(calendar, start, busy, self.clock())
            if reason:
                return None, reason, False
            booking = Booking(
                agent_id=ctx.config.agent_id,
                call_id=ctx.config.call_id,
                start_at=start,
                end_at=end,
                timezone=calendar.timezone,
                attendee_name=text_arg(call.arguments, "name", 200) or None,
                attendee_phone=ctx.config.caller_number[:20] or None,
                attendee_email=text_arg(call.arguments, "email", 320) or None,
                notes=text_arg(call.arguments, "notes", 2000) or None,
                idempotency_key=key,
            )
            session.add(booking)
        return booking, None, False


def first_days(slots: list[Slot]) -> list[Slot]:
    """A couple of slots from each of the first few days that have any."""
    days = groupby(slots, key=lambda slot: slot.start.date())
    chosen: list[Slot] = []
    for _, day in islice(days, DAYS_OFFERED):
        chosen += spread(list(day), SLOTS_PER_DAY)
    return chosen


def confirmation(booking: Booking, calendar: CalendarSettings, *, already: bool) -> dict[str, Any]:
    when = spoken_time(booking.start_at, calendar)
    label = zone_label(calendar)
    sentence = (
        f"That meeting is already booked for {when}, {label}."
        if already
        else f"You're booked for {when}, {label}."
    )
    return {
        "booked": True,
        "booking_id": booking.id,
        "start": local_iso(booking.start_at, calendar),
        "when": when,
        "timezone": calendar.timezone,
        "confirmation": sentence,
    }
