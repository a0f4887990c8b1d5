"""Request and response shapes of `/v1/campaigns` and `/v1/dnc` (the shared field types
come from `schemas`).

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb, sqlalchemy.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from schemas import E164, HHMM, Metadata, Strict, Variables

Weekday = Annotated[int, Field(ge=0, le=6)]


def _known_zone(value: str) -> str:
    if value not in available_timezones():
        raise ValueError(f"unknown IANA timezone {value!r}")
    return value


KnownZone = Annotated[str, StringConstraints(max_length=64), AfterValidator(_known_zone)]


class CallingWindowIn(Strict):
    """Local time of each contact; the default is 9:00-20:00 Monday to Friday."""

    days: list[Weekday] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1, max_length=7)
    start: Annotated[str, StringConstraints(pattern=HHMM)] = "09:00"
    end: Annotated[str, StringConstraints(pattern=HHMM)] = "20:00"
    timezone: KnownZone = "America/New_York"
    """For contacts whose number and row give no timezone."""

    @field_validator("end")
    @classmethod
    def _after_start(cls, value: str, info: Any) -> str:
        start = info.data.get("start")
        if start is not None and value <= start:
            raise ValueError("end must be after start (windows do not cross midnight)")
        return value


class RetryRule(Strict):
    max_attempts: int = Field(ge=1, le=20)
    delay_seconds: float = Field(ge=0, le=30 * 86400)


class RetryPolicyIn(Strict):
    """Per outcome: the most attempts a contact gets and the wait before the next one."""

    no_answer: RetryRule | None = None
    busy: RetryRule | None = None
    failed: RetryRule | None = None
    voicemail: RetryRule | None = None


class CampaignCreate(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    agent_id: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    from_: E164 | None = Field(default=None, alias="from")
    calling_window: CallingWindowIn = Field(default_factory=CallingWindowIn)
    max_concurrent_calls: int = Field(default=5, ge=1, le=1000)
    calls_per_second: float = Field(default=1.0, gt=0, le=100)
    retry_policy: RetryPolicyIn = Field(default_factory=RetryPolicyIn)
    start_at: datetime | None = None
    end_at: datetime | None = None
    variables: Variables = Field(default_factory=dict)

    @field_validator("start_at", "end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give a timezone offset (e.g. 2027-01-04T09:00:00Z)")
        return value

    @field_validator("end_at")
    @classmethod
    def _end_after_start(cls, value: datetime | None, info: Any) -> datetime | None:
        start = info.data.get("start_at")
        if value is not None and start is not None and value <= start:
            raise ValueError("end_at must be after start_at")
        return value


class CampaignRead(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: str
    name: str
    agent_id: str
    from_number: str | None = Field(serialization_alias="from")
    status: str
    calling_window: dict[str, Any]
    max_concurrent_calls: int
    calls_per_second: float
    retry_policy: dict[str, Any]
    start_at: datetime | None
    end_at: datetime | None
    variables: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    stats: dict[str, Any] = Field(default_factory=dict)


class ContactIn(Strict):
    phone: Annotated[str, StringConstraints(max_length=40)]
    timezone: Annotated[str, StringConstraints(max_length=64)] | None = None
    variables: Variables = Field(default_factory=dict)
    metadata: Metadata = Field(default_factory=dict)


class ContactsIn(Strict):
    contacts: list[ContactIn] = Field(min_length=1, max_length=10_000)


class RowError(BaseModel):
    line: int
    phone: str
    reason: str


class ImportReportRead(BaseModel):
    received: int
    imported: int
    merged: int
    suppressed: int
    errors: list[RowError]


class AttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    call_id: str | None
    outcome: str | None
    started_at: datetime
    ended_at: datetime | None


class ContactRead(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: str
    phone: str
    timezone: str
    state: str
    attempts: int
    last_outcome: str | None
    next_attempt_at: datetime | None
    variables: dict[str, Any]
    metadata: dict[str, Any] = Field(validation_alias="contact_metadata")
    line: int | None
    attempt_log: list[AttemptRead] = Field(default_factory=list)


class DncIn(Strict):
    phone: Annotated[str, StringConstraints(max_length=40)]
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class DncRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    phone: str
    reason: str | None
    source: str
    call_id: str | None
    created_at: datetime
