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
from pipeline.vad import VADBatcher


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


class MediaTransport(Protocol):
    """The Twilio WebSocket as the pipeline sees it. A transport may also offer
    `subscribe(sink) -> bool`: text messages then go to `sink` as they are read, not
    through `receive_text()` (which still returns None at the end)."""

    async def receive_text(self) -> str | None:
        """The next text message, or None once the peer has gone."""
        ...

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int = 1000) -> None: ...


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
