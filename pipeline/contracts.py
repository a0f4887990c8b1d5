"""What the voice pipeline needs from the app, as small protocols and plain records.

The app (store, tools, knowledge, telephony, transports) implements these; the pipeline
knows nothing else of it.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pipeline.metrics import PipelineMetrics
from pipeline.providers import Clock, LLMProvider, STTProvider, ToolCall, TTSProvider
from pipeline.silero import VADBatcher


@dataclass(frozen=True, slots=True)
class ToolLimits:
    """What a prompt-injected LLM can do at most (the agent's `tool_limits`)."""

    tool_rounds_per_turn: int = 3
    """LLM rounds of one turn that may call tools; the next round must answer in words."""
    tool_calls_per_call: int = 20
    sms_per_call: int = 2
    sms_per_destination_per_day: int = 5
    sms_destinations: tuple[str, ...] = ()
    """Numbers besides the caller's own that `send_sms` may text."""


@dataclass(slots=True)
class AgentConfig:
    """Everything a call needs from its agent and call records, templates already filled."""

    call_id: str
    agent_id: str
    system_prompt: str
    first_message: str = ""
    first_message_mode: str = "assistant_speaks_first"
    voice: str = "aura-2-thalia-en"
    language: str = "en-US"
    llm_model: str = "llama3.2"
    temperature: float = 0.4
    max_call_seconds: float = 900.0
    silence_timeout_s: float = 10.0
    end_call_phrases: list[str] = field(default_factory=list)
    min_interrupt_speech_ms: int = 60
    min_interrupt_words: int = 0
    backchannel_phrases: list[str] = field(default_factory=list)
    fallback_line: str = "Sorry, I'm having trouble right now. Could you say that again?"
    tools: list[dict[str, Any]] = field(default_factory=list)
    direction: str = "inbound"
    caller_number: str = ""
    agent_number: str = ""
    transfer_number: str = ""
    caller_memory: str = ""
    variables: dict[str, Any] = field(default_factory=dict)
    tool_limits: ToolLimits = field(default_factory=ToolLimits)
    call_sid: str = ""
    """The call's telephony SID as the database has it: every call-control action uses
    this one, never a SID the media stream claims."""
    wait_for_human: bool = False
    """Outbound: no pitch until the callee speaks (a voicemail greeting is told apart by
    its words) or answering-machine detection says `human`."""
    voicemail_action: str = "hang_up"
    """On a machine: `hang_up`, or `leave_message` (say `voicemail_message`, then hang up)."""
    voicemail_message: str = ""


@dataclass(frozen=True, slots=True)
class StreamStart:
    """A media stream's opening, decoded by its transport: who the stream belongs to."""

    stream_sid: str
    call_sid: str
    """The telephony call, for `CallControl`."""
    parameters: dict[str, str] = field(default_factory=dict)
    """What the app attached when it opened the stream (Twilio's `customParameters`)."""


@dataclass(frozen=True, slots=True)
class MediaSink:
    """Where a transport delivers what the caller's side sends, decoded, as it is read.

    Each callback runs on the event loop inside the transport's read, so it must not block;
    it may raise to end the call (the transport's `run()` then raises it)."""

    on_audio: Callable[[bytes], None]
    """Caller audio: mu-law, 8 kHz, mono."""
    on_mark: Callable[[str], None]
    """A mark sent with `send_mark` came back: its audio played, or a clear discarded it."""
    on_dtmf: Callable[[str], None]
    """One keypad digit."""


class MediaTransport(Protocol):
    """A live call's audio link (the Twilio Media Stream, a browser), media-level: its wire
    format stays in the transport. The call awaits one send at a time, in order, and
    `run()` once; a send to a peer that has gone raises."""

    async def start(self) -> StreamStart | None:
        """Wait for the stream to open; None if the peer stopped or went first."""
        ...

    async def run(self, sink: MediaSink) -> None:
        """Deliver inbound media to `sink` until the peer stops the stream or goes; what
        a sink callback raised is raised here. Malformed messages are the transport's to
        count and ignore."""
        ...

    async def send_audio(self, audio: bytes | bytearray) -> None:
        """Queue mu-law audio for playback after what is queued already."""
        ...

    async def send_mark(self, name: str) -> None:
        """Ask for `name` back once the audio queued before it has played."""
        ...

    async def send_clear(self) -> None:
        """Drop the queued audio now; the marks behind it come back."""
        ...

    async def close(self, code: int = 1000) -> None:
        """End the link (a WebSocket close code: 1000 done, 1008 refused)."""
        ...


class CallStore(Protocol):
    async def load_config(self, call_id: str) -> AgentConfig | None: ...

    async def stream_started(self, call_id: str, *, stream_sid: str, call_sid: str) -> None: ...

    async def add_turn(self, call_id: str, **fields: Any) -> None: ...

    async def add_event(
        self, call_id: str, type_: str, data: dict[str, Any], call_time_s: float | None = None
    ) -> None: ...

    async def set_fields(self, call_id: str, **fields: Any) -> None: ...

    async def finish(self, call_id: str, *, ended_reason: str) -> None: ...


class CallControl(Protocol):
    """Telephony actions on the live call (Twilio REST)."""

    async def hang_up(self, call_sid: str) -> None: ...

    async def transfer(self, call_sid: str, *, number: str, caller_id: str) -> None: ...


class StreamGuard(Protocol):
    async def refusal(self, start: StreamStart) -> str | None:
        """None when the stream may run for the call it names; otherwise why not. Reads,
        never writes."""
        ...


class Retriever(Protocol):
    async def context_for(self, agent_id: str, query: str) -> str:
        """Reference passages for `query`, formatted for the prompt, or ""."""
        ...


@dataclass(slots=True)
class ToolContext:
    config: AgentConfig
    call_sid: str
    idempotency_key: str


@dataclass(slots=True)
class ToolOutcome:
    """A tool's result for the LLM, plus any call-control action the session must take
    once the agent's last words have played."""

    result: Any
    action: Literal["end_call", "transfer"] | None = None
    transfer_to: str | None = None
    say: str | None = None
    refused: str | None = None
    """Why a budget or policy refused the call (`result` says so to the LLM): counted in
    `tool_refusals` and recorded on the call."""


class ToolRunner(Protocol):
    def schemas(self, config: AgentConfig) -> list[dict[str, Any]]: ...

    def filler_for(self, config: AgentConfig, name: str) -> str | None: ...

    async def run(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome: ...


@dataclass(slots=True)
class PipelineDeps:
    stt: STTProvider
    llm: LLMProvider
    tts: TTSProvider
    store: CallStore
    control: CallControl
    metrics: PipelineMetrics
    vad_batcher: Callable[[], VADBatcher]
    retriever: Retriever | None = None
    tools: ToolRunner | None = None
    stream_guard: StreamGuard | None = None
    """Checks each stream's `start` before anything is read or written for its call."""
    vad_threshold: float = 0.5
    end_of_speech_ms: int = 300
    """Silence after which the caller's speech has ended: Finalize is sent to the STT then.
    Kept equal to Deepgram's endpointing so a forced final never cuts a caller off sooner
    than Deepgram itself would."""
    finalize_after_ms: int = 96
    """Silence after which Finalize is sent already, while the end of the turn is not yet
    certain (it is at `end_of_speech_ms`): the final transcript is then in before the turn
    ends, instead of a transcription round trip later, and an early answer can start on it.
    0: only at the end of speech. A pause inside a sentence this long (espeak-ng pauses up
    to ~130 ms at a comma) splits the transcript into segments of one turn, and costs an
    early answer that the resumed speech discards."""
    early_answers: bool = True
    """Start the answer on a pause's final transcript, before the turn is certain; it is
    heard only if the turn then ends with that same transcript (see `EarlyAnswer`)."""
    clock: Clock = time.monotonic
