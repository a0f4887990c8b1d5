"""Pydantic request and response models for the public API. Field names follow the commercial
voice platforms so configurations port over.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, pipeline.
Of ours, imports only: utils.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    field_validator,
)

from utils import normalize_e164

E164 = Annotated[str, AfterValidator(normalize_e164)]
Phrase = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
VariableValue = Annotated[str, StringConstraints(max_length=2000)] | int | float | bool
Variables = Annotated[
    dict[Annotated[str, StringConstraints(max_length=64)], VariableValue], Field(max_length=50)
]
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=64)], VariableValue | None],
    Field(max_length=50),
]
"""Opaque to the service: echoed in call records, results and every webhook."""

DEFAULT_BACKCHANNELS = [
    "uh-huh",
    "uh huh",
    "mm-hmm",
    "mhm",
    "mm",
    "yeah",
    "yep",
    "right",
    "okay",
    "ok",
    "sure",
    "i see",
    "got it",
    "alright",
]
TOOL_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
FirstMessageMode = Literal["assistant_speaks_first", "wait_for_caller"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- tools and calendar -----------------------------------------------------------------


class BuiltinTool(Strict):
    type: Literal["book_meeting", "send_sms", "transfer_call", "end_call", "opt_out"]
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None
    filler_phrase: Annotated[str, StringConstraints(max_length=300)] | None = None


class HttpTool(Strict):
    type: Literal["http"]
    name: Annotated[str, StringConstraints(pattern=TOOL_NAME)]
    description: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    url: HttpUrl
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[
        Annotated[str, StringConstraints(max_length=200)],
        Annotated[str, StringConstraints(max_length=2000)],
    ] = Field(default_factory=dict, max_length=30)
    timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    filler_phrase: Annotated[str, StringConstraints(max_length=300)] | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError("parameters must be a JSON schema with type 'object'")
        return value


ToolConfig = Annotated[BuiltinTool | HttpTool, Field(discriminator="type")]


class ToolLimitSettings(Strict):
    """What the agent's LLM may do at most; the defaults are safe (`pipeline.contracts.
    ToolLimits` holds the same defaults for agents stored without them)."""

    tool_rounds_per_turn: int = Field(default=3, ge=0, le=10)
    tool_calls_per_call: int = Field(default=20, ge=0, le=200)
    sms_per_call: int = Field(default=2, ge=0, le=20)
    sms_per_destination_per_day: int = Field(default=5, ge=0, le=100)
    sms_destinations: list[E164] = Field(default_factory=list, max_length=20)


HHMM = r"^([01]\d|2[0-3]):[0-5]\d$"


class CalendarSettings(Strict):
    timezone: str = "UTC"
    working_days: list[Annotated[int, Field(ge=0, le=6)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], max_length=7
    )
    working_hours_start: Annotated[str, StringConstraints(pattern=HHMM)] = "09:00"
    working_hours_end: Annotated[str, StringConstraints(pattern=HHMM)] = "17:00"
    slot_minutes: int = Field(default=30, ge=5, le=480)
    buffer_minutes: int = Field(default=10, ge=0, le=240)
    booking_horizon_days: int = Field(default=14, ge=1, le=365)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value not in available_timezones():
            raise ValueError(f"unknown IANA timezone {value!r}")
        return value


WebhookEventName = Literal[
    "call.started", "call.ended", "call.analyzed", "call.transcript", "tool.called"
]


# --- agents -----------------------------------------------------------------------------


class VoicemailSettings(Strict):
    """Outbound calls: answering-machine detection, and what to do on a machine."""

    detect: bool = True
    action: Literal["hang_up", "leave_message"] = "hang_up"
    message: Annotated[str, StringConstraints(max_length=1000)] = ""
    """A template (`{{name}}`), spoken after the beep with `leave_message`."""


class AgentFields(Strict):
    """Every agent setting, all optional: shared by create (with defaults) and update."""

    system_prompt: Annotated[str, StringConstraints(max_length=20000)] | None = None
    first_message: Annotated[str, StringConstraints(max_length=2000)] | None = None
    first_message_mode: FirstMessageMode | None = None
    voice: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    language: (
        Annotated[str, StringConstraints(pattern=r"^([a-z]{2,3}(-[A-Za-z]{2,4})?|multi)$")] | None
    ) = None
    llm_model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_call_seconds: int | None = Field(default=None, ge=10, le=14400)
    silence_timeout_seconds: float | None = Field(default=None, ge=2, le=300)
    end_call_phrases: list[Phrase] | None = Field(default=None, max_length=20)
    min_interrupt_speech_ms: int | None = Field(default=None, ge=0, le=3000)
    min_interrupt_words: int | None = Field(default=None, ge=0, le=20)
    backchannel_phrases: list[Phrase] | None = Field(default=None, max_length=50)
    fallback_line: Annotated[str, StringConstraints(max_length=500)] | None = None
    tools: list[ToolConfig] | None = Field(default=None, max_length=20)
    tool_limits: ToolLimitSettings | None = None
    variables: Variables | None = None
    transfer_number: E164 | None = None
    calendar: CalendarSettings | None = None
    analysis_schema: dict[str, Any] | None = None
    webhook_url: HttpUrl | None = None
    webhook_events: list[WebhookEventName] | None = Field(default=None, max_length=5)
    recording_enabled: bool | None = None
    phone_number: E164 | None = None
    voicemail: VoicemailSettings | None = None
    disclosure: Annotated[str, StringConstraints(max_length=500)] | None = None

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[Any] | None) -> list[Any] | None:
        names = [t.name if isinstance(t, HttpTool) else t.type for t in tools or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate tool names: {', '.join(duplicates)}")
        return tools

    @field_validator("analysis_schema")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") != "object":
            raise ValueError("analysis_schema must be a JSON schema with type 'object'")
        return value


AGENT_DEFAULTS: dict[str, Any] = {
    "system_prompt": "You are a helpful, concise phone assistant.",
    "first_message": "",
    "first_message_mode": "assistant_speaks_first",
    "voice": "aura-2-thalia-en",
    "language": "en-US",
    "temperature": 0.4,
    "max_call_seconds": 900,
    "silence_timeout_seconds": 10.0,
    "end_call_phrases": [],
    "min_interrupt_speech_ms": 60,
    "min_interrupt_words": 0,
    "backchannel_phrases": DEFAULT_BACKCHANNELS,
    "tools": [],
    "tool_limits": {},
    "variables": {},
    "calendar": {},
    "analysis_schema": {},
    "webhook_events": [],
    "recording_enabled": False,
    "voicemail": {},
}


class AgentCreate(AgentFields):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class AgentUpdate(AgentFields):
    name: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
        | None
    ) = None


class AgentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    system_prompt: str
    first_message: str
    first_message_mode: FirstMessageMode
    voice: str
    language: str
    llm_model: str | None
    temperature: float
    max_call_seconds: int
    silence_timeout_seconds: float
    end_call_phrases: list[str]
    min_interrupt_speech_ms: int
    min_interrupt_words: int
    backchannel_phrases: list[str]
    fallback_line: str | None
    tools: list[dict[str, Any]]
    tool_limits: dict[str, Any]
    variables: dict[str, Any]
    transfer_number: str | None
    calendar: dict[str, Any]
    analysis_schema: dict[str, Any]
    webhook_url: str | None
    webhook_events: list[str]
    recording_enabled: bool
    phone_number: str | None
    voicemail: dict[str, Any]
    disclosure: str | None
    created_at: datetime
    updated_at: datetime


# --- calls ------------------------------------------------------------------------------


class CallCreate(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    agent_id: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    to: E164
    from_: E164 | None = Field(default=None, alias="from")
    variables: Variables = Field(default_factory=dict)
    metadata: Metadata = Field(default_factory=dict)


class TurnRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    role: str
    text: str
    start_s: float
    end_s: float
    interrupted: bool
    stt_final_ms: float | None
    llm_request_ms: float | None = None
    llm_first_token_ms: float | None
    tts_request_ms: float | None = None
    tts_first_audio_ms: float | None
    first_media_ms: float | None
    retrieval_ms: float | None
    tool_calls: list[Any]


class CallRead(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: str
    agent_id: str | None
    direction: str
    from_number: str = Field(serialization_alias="from")
    to_number: str = Field(serialization_alias="to")
    twilio_call_sid: str | None
    status: str
    ended_reason: str | None
    error_message: str | None
    variables: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_seconds: float | None
    transferred_to: str | None
    recording_url: str | None
    analysis: dict[str, Any] | None
    analysis_status: str | None
    analysis_error: str | None
    metadata: dict[str, Any] = Field(validation_alias="call_metadata")
    campaign_id: str | None = None
    contact_id: str | None = None
    answered_by: str | None = None


class CallDetail(CallRead):
    turns: list[TurnRead]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


# --- knowledge base and bookings --------------------------------------------------------


class DocumentText(Strict):
    """A document sent as JSON instead of a file upload."""

    text: Annotated[str, StringConstraints(min_length=1)]
    filename: Annotated[str, StringConstraints(strip_whitespace=True, max_length=300)] | None = None
    title: Annotated[str, StringConstraints(strip_whitespace=True, max_length=300)] | None = None


class DocumentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    agent_id: str
    filename: str
    title: str | None
    content_type: str
    size_bytes: int
    sha256: str
    chunk_count: int
    status: Literal["processing", "ready"]
    created_at: datetime


class KnowledgeSearch(Strict):
    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
    top_k: int | None = Field(default=None, ge=1, le=50)
    min_similarity: float | None = Field(default=None, ge=-1, le=1)


class PassageRead(BaseModel):
    text: str
    source: str
    heading: str
    document_id: str
    chunk_index: int
    similarity: float


class KnowledgeSearchResult(BaseModel):
    query: str
    passages: list[PassageRead]
    context: str
    """The passages exactly as the pipeline puts them in the LLM context."""


class BookingRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    agent_id: str
    call_id: str | None
    start_at: datetime
    end_at: datetime
    timezone: str
    attendee_name: str | None
    attendee_phone: str | None
    attendee_email: str | None
    notes: str | None
    status: str
    created_at: datetime
