"""An agent utterance and its bookkeeping: the audio synthesised so far, its text chunks, how
far it was sent and what the caller heard; barge-in, early answers and per-turn timing.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pipeline.text import cut_at_share


@dataclass(slots=True)
class Chunk:
    text: str
    start: int
    end: int | None = None  # byte offset in Speech.audio once its audio is complete
    mark: str = ""
    mark_sent: bool = False
    acked: bool = False
    due: float = 0.0  # when the playback clock says its last byte plays


@dataclass(eq=False)
class Speech:
    """One agent utterance: the audio synthesised so far, its text chunks, how far it has
    been sent, and what the caller has heard."""

    id: int
    kind: str
    audio: bytearray = field(default_factory=bytearray)
    chunks: list[Chunk] = field(default_factory=list)
    sent: int = 0
    producer_done: bool = False
    cancelled: bool = False
    played: asyncio.Event = field(default_factory=asyncio.Event)
    first_media_at: float | None = None
    first_audio_at: float | None = None
    llm_request_at: float | None = None  # its answer's first LLM request was made
    tts_request_at: float | None = None  # its first chunk's synthesis was requested
    end_at: float | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    timing: TurnTiming | None = None
    latency: dict[str, float | None] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the speech may be heard and act: at once, or for an early answer when the
    turn ends as it guessed. Until then it is synthesised but not sent, runs no tool."""

    def complete_bytes(self) -> int:
        ends = [c.end for c in self.chunks if c.end is not None]
        return ends[-1] if ends else 0

    def heard_text(self, played_bytes: int) -> str:
        """Chunks whose marks came back, plus the played share of the next one."""
        parts = []
        for chunk in self.chunks:
            if chunk.acked:
                parts.append(chunk.text)
                continue
            end = chunk.end if chunk.end is not None else len(self.audio)
            length = max(end - chunk.start, 1)
            share = min(max(played_bytes - chunk.start, 0) / length, 1.0)
            parts.append(cut_at_share(chunk.text, share))
            break
        return " ".join(p for p in parts if p).strip()

    def full_text(self) -> str:
        return " ".join(c.text for c in self.chunks).strip()


@dataclass(slots=True)
class BargeIn:
    """A pause for caller speech, waiting for the transcript to confirm or dismiss it."""

    speech: Speech
    heard: str
    vad_ended_at: float | None = None


@dataclass(slots=True)
class EarlyAnswer:
    """An answer started on the final transcript of a pause, before the turn is certain.
    It is used if the turn ends with exactly that transcript; speech resuming, or any other
    speech starting, discards it."""

    text: str
    speech: Speech
    task: asyncio.Task[None]
    timing: TurnTiming


@dataclass(slots=True)
class TurnTiming:
    eos_at: float | None = None
    final_at: float | None = None
    llm_first_token_at: float | None = None
    tts_first_audio_at: float | None = None
    retrieval_ms: float | None = None

    def ms(self, at: float | None) -> float | None:
        if at is None or self.eos_at is None:
            return None
        return round((at - self.eos_at) * 1000, 1)
