"""Calling windows: when a contact may be called, in the contact's own local time.

A window is a set of weekdays (0 = Monday) and a start and end time of day, applied in
each contact's timezone: the CSV's, or the one `phonenumbers` gives for its number, or the
window's fallback. All maths is on aware datetimes through `zoneinfo`, so a window across
a daylight-saving change opens at the local time it says.

Pure. Of ours, imports only: nothing.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_timezones

DEFAULT_WINDOW: dict[str, Any] = {
    "days": [0, 1, 2, 3, 4],
    "start": "09:00",
    "end": "20:00",
    "timezone": "America/New_York",
}
"""9:00-20:00 local, Monday to Friday: inside the US TCPA 8:00-21:00 rule."""

_SEARCH_DAYS = 8


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


@dataclass(frozen=True, slots=True)
class CallingWindow:
    days: frozenset[int]
    start: time
    end: time
    timezone: str

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CallingWindow:
        merged = {**DEFAULT_WINDOW, **(data or {})}
        return cls(
            frozenset(int(d) for d in merged["days"]),
            _clock(merged["start"]),
            _clock(merged["end"]),
            merged["timezone"],
        )

    def is_open(self, at: datetime, tz: str) -> bool:
        local = at.astimezone(zone(tz, self.timezone))
        return local.weekday() in self.days and self.start <= local.time() < self.end

    def next_open(self, at: datetime, tz: str) -> datetime | None:
        """`at` itself if the window is open then, else when it next opens (None: never,
        e.g. no days)."""
        if self.is_open(at, tz):
            return at
        local_zone = zone(tz, self.timezone)
        local = at.astimezone(local_zone)
        for offset in range(_SEARCH_DAYS):
            day = local.date() + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens = datetime.combine(day, self.start, tzinfo=local_zone)
            if opens > local:
                return opens.astimezone(at.tzinfo)
        return None


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def zone(name: str, fallback: str) -> ZoneInfo:
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        return _zone(fallback)


def is_known_zone(name: str) -> bool:
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def timezone_for_number(number: phonenumbers.PhoneNumber, fallback: str) -> str:
    """The number's timezone from `phonenumbers`' geographic data; `fallback` when the
    number has none (mobile ranges, unknown prefixes). When a prefix spans several zones
    the fallback is kept if it is one of them, else the first is taken."""
    zones = [z for z in phone_timezones.time_zones_for_number(number) if z != "Etc/Unknown"]
    if not zones:
        return fallback
    return fallback if fallback in zones else zones[0]
