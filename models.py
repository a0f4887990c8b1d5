"""SQLAlchemy 2 ORM tables. The schema itself is owned by the Alembic migrations in
`migrations/versions`; `tests/test_db.py` checks the two agree.

Must not import: fastapi, starlette, uvicorn, schemas, pipeline.
Of ours, imports only: utils.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from utils import new_id, utcnow


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns timezone-aware datetimes (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


CALL_STATUSES = (
    "queued",
    "ringing",
    "in-progress",
    "completed",
    "busy",
    "no-answer",
    "failed",
    "canceled",
)
TERMINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("agt"))
    name: Mapped[str] = mapped_column(String(200))
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    first_message: Mapped[str] = mapped_column(Text, default="")
    first_message_mode: Mapped[str] = mapped_column(String(40), default="assistant_speaks_first")
    voice: Mapped[str] = mapped_column(String(100), default="aura-2-thalia-en")
    language: Mapped[str] = mapped_column(String(20), default="en-US")
    llm_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    temperature: Mapped[float] = mapped_column(Float, default=0.4)
    max_call_seconds: Mapped[int] = mapped_column(Integer, default=900)
    silence_timeout_seconds: Mapped[float] = mapped_column(Float, default=10.0)
    end_call_phrases: Mapped[list[Any]] = mapped_column(default=list)
    min_interrupt_speech_ms: Mapped[int] = mapped_column(Integer, default=60)
    min_interrupt_words: Mapped[int] = mapped_column(Integer, default=0)
    backchannel_phrases: Mapped[list[Any]] = mapped_column(default=list)
    fallback_line: Mapped[str | None] = mapped_column(Text, nullable=True)
    tools: Mapped[list[Any]] = mapped_column(default=list)
    tool_limits: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    transfer_number: Mapped[str | None] = mapped_column(String(20), nullable=True)
    calendar: Mapped[dict[str, Any]] = mapped_column(default=dict)
    analysis_schema: Mapped[dict[str, Any]] = mapped_column(default=dict)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    webhook_events: Mapped[list[Any]] = mapped_column(default=list)
    recording_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    phone_number: Mapped[str | None] = mapped_column(String(20), unique=True, nullable=True)
    voicemail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Outbound answering-machine handling: `detect`, `action` (`hang_up`/`leave_message`),
    `message` (a template)."""
    disclosure: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Spoken before the first message ("this call is recorded")."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Call(Base):
    __tablename__ = "calls"
    __table_args__ = (
        Index("ix_calls_agent_created", "agent_id", "created_at"),
        Index("ix_calls_status", "status"),
        Index("ix_calls_from_number", "from_number"),
        Index("ix_calls_to_number", "to_number"),
        Index("ix_calls_created", "created_at", "id"),
        Index("ix_calls_status_created", "status", "created_at"),
        Index("ix_calls_direction_created", "direction", "created_at"),
        Index("ix_calls_outcome_created", "outcome", "created_at"),
        Index(
            "ix_calls_analytics",
            "created_at",
            "agent_id",
            "direction",
            "outcome",
            "lead_score",
            "started_at",
        ),
        Index("ix_calls_campaign", "campaign_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("call"))
    agent_id: Mapped[str | None] = mapped_column(
        ForeignKey("agents.id", ondelete="SET NULL"), nullable=True
    )
    direction: Mapped[str] = mapped_column(String(20))
    from_number: Mapped[str] = mapped_column(String(20))
    to_number: Mapped[str] = mapped_column(String(20))
    twilio_call_sid: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    stream_sid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    ended_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
    duration_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    transferred_to: Mapped[str | None] = mapped_column(String(20), nullable=True)
    recording_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    recording_sid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    analysis_status: Mapped[str | None] = mapped_column(String(20), nullable=True)
    analysis_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    analysis_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # copies of analysis["outcome"] and ["lead_score"], indexed for the analytics
    outcome: Mapped[str | None] = mapped_column(String(40), nullable=True)
    lead_score: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # `metadata` is taken by SQLAlchemy's declarative base: the attribute has another name
    call_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    campaign_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    contact_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    answered_by: Mapped[str | None] = mapped_column(String(40), nullable=True)
    """Twilio's answering-machine detection result (`human`, `machine_end_beep`, `fax`...)."""
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    agent: Mapped[Agent | None] = relationship(lazy="raise")
    turns: Mapped[list[TranscriptTurn]] = relationship(
        back_populates="call", order_by="TranscriptTurn.seq", lazy="raise"
    )


class TranscriptTurn(Base):
    __tablename__ = "transcript_turns"
    __table_args__ = (
        UniqueConstraint("call_id", "seq"),
        Index("ix_turns_call_latency", "call_id", "role", "first_media_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(Text, default="")
    start_s: Mapped[float] = mapped_column(Float, default=0.0)
    end_s: Mapped[float] = mapped_column(Float, default=0.0)
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    # latency from the caller's end of speech, in milliseconds
    stt_final_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    llm_request_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    llm_first_token_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tts_request_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tts_first_audio_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    first_media_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    retrieval_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tool_calls: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    call: Mapped[Call] = relationship(back_populates="turns", lazy="raise")


class CallEvent(Base):
    __tablename__ = "call_events"
    __table_args__ = (Index("ix_call_events_call_type", "call_id", "type"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    call_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Document(Base):
    """An uploaded document. `processing` until all its chunks are in the knowledge base;
    rows left `processing` by a crash are removed, with their chunks, at startup. One
    content hash per agent: a duplicate upload loses the unique index race."""

    __tablename__ = "documents"
    __table_args__ = (Index("uq_documents_agent_sha256", "agent_id", "sha256", unique=True),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("doc"))
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    content_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    title: Mapped[str | None] = mapped_column(String(300), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="processing", server_default="ready")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Booking(Base):
    __tablename__ = "bookings"
    __table_args__ = (
        Index("ix_bookings_agent_start", "agent_id", "start_at"),
        Index("ix_bookings_call", "call_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("bkg"))
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    call_id: Mapped[str | None] = mapped_column(
        ForeignKey("calls.id", ondelete="SET NULL"), nullable=True
    )
    start_at: Mapped[datetime] = mapped_column()
    end_at: Mapped[datetime] = mapped_column()
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    attendee_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attendee_phone: Mapped[str | None] = mapped_column(String(20), nullable=True)
    attendee_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="confirmed")
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ToolInvocation(Base):
    """One side-effecting tool call; `idempotency_key` makes retries and repeats no-ops."""

    __tablename__ = "tool_invocations"
    __table_args__ = (Index("ix_tool_invocations_destination", "destination", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str | None] = mapped_column(
        ForeignKey("calls.id", ondelete="CASCADE"), nullable=True, index=True
    )
    tool_name: Mapped[str] = mapped_column(String(100))
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    arguments: Mapped[dict[str, Any]] = mapped_column(default=dict)
    destination: Mapped[str | None] = mapped_column(String(20), nullable=True)
    """The number a text went to: texts per destination per day are counted by it."""
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="running")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class WebhookEvent(Base):
    """Transactional outbox: written in the same transaction as the state change."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_due", "status", "next_attempt_at"),
        Index("ix_webhook_events_call_status", "call_id", "status"),
        Index("ix_webhook_events_created", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evt"))
    call_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    agent_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    event_type: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


# --- outbound campaigns -----------------------------------------------------------------


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cmp"))
    name: Mapped[str] = mapped_column(String(200))
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    from_number: Mapped[str | None] = mapped_column(String(20), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="draft")
    calling_window: Mapped[dict[str, Any]] = mapped_column(default=dict)
    max_concurrent_calls: Mapped[int] = mapped_column(Integer, default=5)
    calls_per_second: Mapped[float] = mapped_column(Float, default=1.0)
    retry_policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    start_at: Mapped[datetime | None] = mapped_column(nullable=True)
    end_at: Mapped[datetime | None] = mapped_column(nullable=True)
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    next_dial_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """Pacing: the earliest time of the next dial, moved forward by a conditional UPDATE."""
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)


class CampaignContact(Base):
    """One number of a campaign, a small state machine: `pending` (due at
    `next_attempt_at`) -> `dialing` (claimed; `lease_until` says when to check on it) ->
    `pending` again for a retry, or a final state (the outcome, `suppressed`, `expired`,
    `cancelled`)."""

    __tablename__ = "campaign_contacts"
    __table_args__ = (
        UniqueConstraint("campaign_id", "phone"),
        Index("ix_campaign_contacts_due", "campaign_id", "state", "next_attempt_at"),
        Index("ix_campaign_contacts_phone_state", "phone", "state"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cct"))
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    phone: Mapped[str] = mapped_column(String(20))
    timezone: Mapped[str] = mapped_column(String(64))
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    contact_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    state: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(nullable=True)
    line: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The CSV line (or list index) it was imported from."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CampaignAttempt(Base):
    """One dial of a contact; `(contact_id, number)` is unique, so an attempt is never
    made twice whoever claims it."""

    __tablename__ = "campaign_attempts"
    __table_args__ = (UniqueConstraint("contact_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), index=True
    )
    contact_id: Mapped[str] = mapped_column(
        ForeignKey("campaign_contacts.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    call_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    twilio_call_sid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)


class DncEntry(Base):
    """The do-not-call list: a number here is never dialed."""

    __tablename__ = "dnc_numbers"

    phone: Mapped[str] = mapped_column(String(20), primary_key=True)
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    source: Mapped[str] = mapped_column(String(20), default="api")
    call_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
