"""Outcomes and the retry policy: what one attempt's call came to, and what the contact
does next (dial again after a delay, or end in a final state).

Pure: it reads a `Call`'s fields only.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from models import Call
from pipeline.voicemail import VOICEMAIL
from tools.dnc import OPTED_OUT

RETRYABLE = ("no_answer", "busy", "failed", "voicemail")
OUTCOMES = ("answered", *RETRYABLE, "invalid", "opted_out")

DEFAULT_RETRY_POLICY: dict[str, dict[str, float]] = {
    "no_answer": {"max_attempts": 3, "delay_seconds": 3600},
    "busy": {"max_attempts": 3, "delay_seconds": 600},
    "failed": {"max_attempts": 2, "delay_seconds": 1800},
    "voicemail": {"max_attempts": 2, "delay_seconds": 4 * 3600},
}
"""Per outcome: the most attempts a contact gets when its last one ended so, and the wait
before the next."""

INVALID_NUMBER_CODES = frozenset({13223, 13224, 21211, 21214, 21217, 21401, 21407, 21612})
"""Twilio errors that mean the number itself cannot be called."""


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int
    delay_s: float


def retry_rule(policy: dict[str, Any] | None, outcome: str) -> Retry | None:
    """The rule for `outcome`, None when the outcome is final whatever the policy."""
    if outcome not in RETRYABLE:
        return None
    rule = {**DEFAULT_RETRY_POLICY[outcome], **((policy or {}).get(outcome) or {})}
    return Retry(int(rule["max_attempts"]), float(rule["delay_seconds"]))


def outcome_of(call: Call) -> str:
    """What a finished campaign call came to."""
    reason = call.ended_reason or ""
    if reason == OPTED_OUT:
        return "opted_out"
    if reason == VOICEMAIL or (call.answered_by or "").startswith("machine"):
        return "voicemail"
    if call.answered_by == "fax":
        return "failed"
    if call.status == "busy":
        return "busy"
    if call.status in ("no-answer", "canceled"):
        return "no_answer"
    if call.status == "failed":
        return "invalid" if _invalid_number(call.error_message) else "failed"
    if call.started_at is not None or call.stream_sid is not None:
        return "answered"
    return "no_answer"


def outcome_of_error(code: int | None) -> str:
    """A dial Twilio refused outright."""
    return "invalid" if code in INVALID_NUMBER_CODES else "failed"


def _invalid_number(message: str | None) -> bool:
    return any(f"Twilio error {code}" in (message or "") for code in INVALID_NUMBER_CODES)


@dataclass(frozen=True, slots=True)
class NextStep:
    state: str
    """`pending` (dial again at `at`) or a final state."""
    at: datetime | None = None


def next_step(
    outcome: str, attempts: int, policy: dict[str, Any] | None, now: datetime
) -> NextStep:
    """After attempt number `attempts` ended with `outcome`."""
    rule = retry_rule(policy, outcome)
    if rule is None or attempts >= rule.max_attempts:
        return NextStep(outcome)
    return NextStep("pending", now + timedelta(seconds=rule.delay_s))
