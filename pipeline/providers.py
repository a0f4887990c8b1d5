"""Provider contracts: the small protocols the voice pipeline talks to, their event types,
and the error tree. Vendor adapters (`adapters.deepgram_stt`, `adapters.deepgram_tts`,
`adapters.ollama`) implement them; the pipeline depends only on this module.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.

Exception tree::

    ProviderError                 a vendor failed; `.provider` names it
    ├── STTError                  live transcription could not be (re)established
    ├── TTSError                  synthesis failed (after the adapter's own retry)
    └── LLMError
        ├── LLMUnavailable        connection refused / reset, 5xx
        ├── LLMTimeout            no connection or no first token in time
        └── LLMModelNotFound      the configured model is not on the server (404)

Audio everywhere is G.711 mu-law, 8 kHz, mono, as Twilio sends it: no resampling.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

Clock = Callable[[], float]
"""Monotonic seconds. Injected so that latency is measured where it happens."""

default_clock: Clock = time.monotonic

Message = dict[str, Any]
"""A chat message in Ollama's shape: role, content, optional tool_calls / tool_name."""


class ProviderError(Exception):
    provider = "provider"

    def __init__(self, message: str, *, provider: str | None = None) -> None:
        super().__init__(message)
        if provider:
            self.provider = provider


class STTError(ProviderError):
    provider = "stt"


class TTSError(ProviderError):
    provider = "tts"


class LLMError(ProviderError):
    provider = "llm"


class LLMUnavailable(LLMError):
    pass


class LLMTimeout(LLMError):
    pass


class LLMModelNotFound(LLMError):
    pass


# --- speech to text ---------------------------------------------------------------------


@dataclass(slots=True)
class Transcript:
    """A Deepgram `Results` message. `start`/`end` are seconds of the audio stream."""

    text: str
    is_final: bool
    speech_final: bool
    start: float = 0.0
    end: float = 0.0
    from_finalize: bool = False
    received_at: float = 0.0


@dataclass(slots=True)
class SpeechStarted:
    timestamp: float
    received_at: float = 0.0


@dataclass(slots=True)
class UtteranceEnd:
    last_word_end: float
    received_at: float = 0.0


STTEvent = Transcript | SpeechStarted | UtteranceEnd


class STTStream(Protocol):
    """One live transcription stream for one call. Survives socket drops (the adapter
    reconnects and replays buffered audio); raises STTError from `events()` only when it
    has given up."""

    reconnects: int

    async def send_audio(self, mulaw: bytes) -> None: ...

    def push_audio(self, mulaw: bytes) -> bool:
        """Queue audio without waiting; True when `send_pending()` has a batch to send."""
        ...

    async def send_pending(self) -> None: ...

    def caller_speaking(self, speaking: bool) -> None:
        """A hint from the pipeline's VAD: the caller started or stopped speaking."""
        ...

    async def finalize(self) -> None: ...

    def events(self) -> AsyncIterator[STTEvent]: ...


class STTProvider(Protocol):
    def open(self, *, language: str, tag: str = "") -> AbstractAsyncContextManager[STTStream]: ...


# --- language model ---------------------------------------------------------------------


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(slots=True)
class LLMDelta:
    """One streamed piece of an answer: text, and/or complete tool calls."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    done: bool = False


class LLMProvider(Protocol):
    def stream_chat(
        self,
        messages: list[Message],
        *,
        model: str,
        temperature: float,
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[LLMDelta, None]:
        """An async generator of deltas. Use it inside `contextlib.aclosing` so that
        cancellation closes the HTTP stream and the server stops generating."""
        ...

    async def complete_json(
        self, messages: list[Message], *, model: str, schema: dict[str, Any]
    ) -> dict[str, Any]:
        """Schema-constrained, non-streaming completion parsed as JSON (may still be invalid
        against the schema: the caller validates)."""
        ...


# --- text to speech ---------------------------------------------------------------------


class TTSProvider(Protocol):
    def synthesize(self, text: str, *, voice: str) -> AsyncGenerator[bytes, None]:
        """An async generator of raw mu-law 8 kHz audio chunks for `text`."""
        ...
