"""What every tool module shares: the error result the LLM reads, argument text, and the
idempotency key hash.

Must not import FastAPI, routes, store/ or voice_pipeline.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.contracts import ToolOutcome


def error(message: str, **extra: Any) -> ToolOutcome:
    return ToolOutcome(result={"error": message, **extra})


def refused(reason: str, message: str) -> ToolOutcome:
    """A tool call a budget or policy does not allow: `message` for the LLM, `reason` for
    the metrics and the call's events."""
    return ToolOutcome(result={"error": message}, refused=reason)


def is_error(result: Any) -> bool:
    return isinstance(result, dict) and "error" in result


def text_arg(arguments: dict[str, Any], key: str, limit: int = 500) -> str:
    value = arguments.get(key)
    return "" if value is None else str(value).strip()[:limit]


def key_hash(idempotency_key: str) -> str:
    """What tool_invocations and bookings store: fixed length, no raw arguments."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()
