"""Meeting scheduling: free slots from an agent's calendar settings, conflict checks with a
buffer, day and time parsing for what an LLM passes, spoken times, and iCalendar export.

Pure functions over `CalendarSettings` and plain (start, end) intervals: no database, no
clock of its own (callers pass `now`).

Times: bookings are stored in UTC; slots, parsing and speech use the calendar's timezone.
Slots start on a grid of `slot_minutes` from `working_hours_start`; a slot is free when no
busy interval comes within `buffer_minutes` of it.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb, sqlalchemy, pipeline.
Of ours, imports only: schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from icalendar import Calendar, Event
from pydantic import ValidationError

from schemas import CalendarSettings

Interval = tuple[datetime, datetime]
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY_FORMATS_HINT = "a date like 2026-05-04, 'today', 'tomorrow' or a weekday name"


@dataclass(frozen=True, slots=True)
class Slot:
    start: datetime  # aware, in the calendar's timezone
    end: datetime


def calendar_from(data: dict[str, Any] | None) -> CalendarSettings:
    """The agent's stored calendar dict as settings; defaults when empty or invalid."""
    try:
        return CalendarSettings.model_validate(data or {})
    except ValidationError:
        return CalendarSettings()


def zone(calendar: CalendarSettings) -> ZoneInfo:
    return ZoneInfo(calendar.timezone)


def _hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


# --- slots and conflicts --------------------------------------------------------------------


def day_slots(calendar: CalendarSettings, day: date) -> list[Slot]:
    """Every slot of `day` inside working hours, ignoring bookings."""
    if day.weekday() not in calendar.working_days:
        return []
    tz = zone(calendar)
    opens = datetime.combine(day, _hhmm(calendar.working_hours_start), tz)
    closes = datetime.combine(day, _hhmm(calendar.working_hours_end), tz)
    length = timedelta(minutes=calendar.slot_minutes)
    slots, start = [], opens
    while start + length <= closes:
        slots.append(Slot(start, start + length))
        start += length
    return slots


def conflicts(start: datetime, end: datetime, busy: Sequence[Interval], buffer: timedelta) -> bool:
    """Whether [start, end) comes within `buffer` of any busy interval."""
    return any(start < b_end + buffer and b_start < end + buffer for b_start, b_end in busy)


def horizon_end(calendar: CalendarSettings, now: datetime) -> date:
    return now.astimezone(zone(calendar)).date() + timedelta(days=calendar.booking_horizon_days)


def free_slots(
    calendar: CalendarSettings,
    busy: Sequence[Interval],
    now: datetime,
    first_day: date,
    last_day: date,
) -> list[Slot]:
    """Free, future slots from `first_day` to `last_day` (inclusive, capped at the horizon)."""
    buffer = timedelta(minutes=calendar.buffer_minutes)
    last_day = min(last_day, horizon_end(calendar, now))
    slots: list[Slot] = []
    day = first_day
    while day <= last_day:
        for slot in day_slots(calendar, day):
            if slot.start >= now + buffer and not conflicts(slot.start, slot.end, busy, buffer):
                slots.append(slot)
        day += timedelta(days=1)
    return slots


def unavailable_reason(
    calendar: CalendarSettings, start: datetime, busy: Sequence[Interval], now: datetime
) -> str | None:
    """Why a meeting cannot start at `start` (None when it can)."""
    local = start.astimezone(zone(calendar))
    end = local + timedelta(minutes=calendar.slot_minutes)
    buffer = timedelta(minutes=calendar.buffer_minutes)
    if local < now + buffer:
        return "that time has already passed or is too soon"
    if local.date() > horizon_end(calendar, now):
        return f"bookings are only taken up to {calendar.booking_horizon_days} days ahead"
    if local.weekday() not in calendar.working_days:
        return f"{_WEEKDAYS[local.weekday()].title()} is not a working day"
    opens, closes = _hhmm(calendar.working_hours_start), _hhmm(calendar.working_hours_end)
    if local.time() < opens or end.date() != local.date() or end.time() > closes:
        return (
            f"that is outside working hours ({calendar.working_hours_start} to "
            f"{calendar.working_hours_end})"
        )
    if conflicts(local, end, busy, buffer):
        return "that time is already taken"
    return None


def spread(slots: Sequence[Slot], count: int) -> list[Slot]:
    """At most `count` slots, evenly spread over `slots` (first and last kept)."""
    if len(slots) <= count:
        return list(slots)
    if count == 1:
        return [slots[0]]
    step = (len(slots) - 1) / (count - 1)
    return [slots[round(i * step)] for i in range(count)]


# --- parsing what the LLM sends -------------------------------------------------------------


def parse_day(text: str, today: date) -> date:
    """An ISO date, 'today', 'tomorrow', or a weekday name ('friday', 'next friday': the next
    one on or after today). Raises ValueError naming the accepted forms."""
    value = " ".join(text.lower().replace(",", " ").split())
    if value == "today":
        return today
    if value == "tomorrow":
        return today + timedelta(days=1)
    name = value.removeprefix("next ").removeprefix("this ")
    if name in _WEEKDAYS:
        return today + timedelta(days=(_WEEKDAYS.index(name) - today.weekday()) % 7)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"could not read the day {text!r}; use {DAY_FORMATS_HINT}") from None


def parse_start(text: str, calendar: CalendarSettings) -> datetime:
    """A start time like '2026-05-04T10:00' (calendar time) or with an offset; aware result.
    Raises ValueError naming the expected form."""
    try:
        value = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise ValueError(
            f"could not read the time {text!r}; use the 'start' value from "
            "check_availability, like 2026-05-04T10:00"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone(calendar))
    return value.astimezone(zone(calendar))


# --- speech and display ---------------------------------------------------------------------


def local_iso(moment: datetime, calendar: CalendarSettings) -> str:
    """'2026-05-04T10:00' in the calendar's timezone: the form the LLM passes back."""
    return moment.astimezone(zone(calendar)).strftime("%Y-%m-%dT%H:%M")


def spoken_time(moment: datetime, calendar: CalendarSettings) -> str:
    """'Monday, May 4 at 10 AM' / '... at 2:30 PM', for text-to-speech."""
    return spoken_in(moment, calendar.timezone)


def spoken_in(moment: datetime, timezone: str) -> str:
    """`spoken_time` for an IANA timezone name (UTC when unknown)."""
    try:
        local = moment.astimezone(ZoneInfo(timezone))
    except (ValueError, KeyError):
        local = moment.astimezone(UTC)
    hour = local.hour % 12 or 12
    clock = f"{hour}" if local.minute == 0 else f"{hour}:{local.minute:02d}"
    return f"{local:%A}, {local:%B} {local.day} at {clock} {'AM' if local.hour < 12 else 'PM'}"


def zone_label(calendar: CalendarSettings) -> str:
    """'Berlin time' for Europe/Berlin, 'UTC' for UTC."""
    if calendar.timezone in ("UTC", "Etc/UTC"):
        return "UTC"
    return calendar.timezone.rsplit("/", 1)[-1].replace("_", " ") + " time"


# --- iCalendar ------------------------------------------------------------------------------


def booking_ics(
    *,
    uid: str,
    start: datetime,
    end: datetime,
    created: datetime,
    summary: str,
    description: str = "",
    cancelled: bool = False,
) -> bytes:
    """One VEVENT as an .ics file (RFC 5545); times in UTC."""
    calendar = Calendar()
    calendar.add("prodid", "-//AI SDR//bookings//EN")
    calendar.add("version", "2.0")
    calendar.add("method", "PUBLISH")
    event = Event()
    event.add("uid", uid)
    event.add("dtstamp", created.astimezone(UTC))
    event.add("dtstart", start.astimezone(UTC))
    event.add("dtend", end.astimezone(UTC))
    event.add("summary", summary)
    if description:
        event.add("description", description)
    event.add("status", "CANCELLED" if cancelled else "CONFIRMED")
    calendar.add_component(event)
    ical: bytes = calendar.to_ical()
    return ical
