"""Post-call analysis: one schema-constrained LLM completion per finished call (Ollama's
`format` carries a JSON schema), validated with pydantic, plus the agent's own extraction
schema (`analysis_schema`, checked with jsonschema).

Timing, as a design choice: `call.ended` never waits on the LLM for longer than
`ANALYSIS_WAIT_S`. The outbox holds the report that long; an analysis that finishes in time
is put into it and the report is released at once. Otherwise the report goes out with
`analysis: null` and `analysis_reason` "pending" (still running) or "llm_unavailable" (the
LLM is down: the report is released immediately, not held), and `call.analyzed` follows
when the analysis finishes.

Failures never reach the call: an unreachable LLM is retried in the background with
exponential backoff up to `ANALYSIS_MAX_ATTEMPTS`; invalid or schema-invalid output is
retried (with the validation error fed back) up to `INVALID_OUTPUT_ATTEMPTS` times, then
recorded as `analysis_status` "failed" with `analysis_error`. Calls without a word from the
caller (no-answer, busy, failed, silence) are "skipped" and cost no LLM call. Calls still
"pending" at startup are resumed, so analysis survives a restart.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config import Settings
from models import Agent, Call, TranscriptTurn
from pipeline.providers import LLMError, LLMModelNotFound, LLMProvider, LLMTimeout, LLMUnavailable
from postcall.hooks import TaskSet, after_commit
from postcall.outbox import Outbox
from postcall.report import SPEAKERS, load_agent, load_turns

log = logging.getLogger("ai_sdr.analysis")

Outcome = Literal[
    "meeting_booked",
    "qualified",
    "not_interested",
    "callback_requested",
    "voicemail",
    "no_answer",
    "other",
]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
INVALID_OUTPUT_ATTEMPTS = 3
"""Consecutive invalid answers before the analysis is reported as failed."""
MAX_RETRY_DELAY_S = 3600.0
PROMPT_INSTRUCTIONS_CHARS = 4000
UNAVAILABLE = (LLMUnavailable, LLMTimeout, LLMModelNotFound)


class AnalysisResult(BaseModel):
    """What the model must return; `structured_data` is further checked against the
    agent's `analysis_schema`."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(min_length=1, max_length=2000)
    caller_sentiment: Literal["positive", "neutral", "negative"]
    outcome: Outcome
    lead_score: int = Field(ge=0, le=100)
    lead_score_reasons: list[str] = Field(max_length=10)
    success: bool
    success_reason: str = Field(max_length=1000)
    structured_data: dict[str, Any] = Field(default_factory=dict)


class InvalidAnalysis(ValueError):
    """The model's answer was JSON but not a valid analysis."""


def response_schema(extraction: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema sent as Ollama's `format`: every field required, `structured_data`
    being the agent's own schema (left out when the agent has none)."""
    schema = AnalysisResult.model_json_schema()
    schema["properties"] = dict(schema["properties"])
    if extraction:
        schema["properties"]["structured_data"] = extraction
    else:
        del schema["properties"]["structured_data"]
    schema["required"] = list(schema["properties"])
    return schema


def validate_analysis(raw: dict[str, Any], extraction: dict[str, Any]) -> dict[str, Any]:
    """The analysis as stored, or InvalidAnalysis naming what is wrong (never the values)."""
    try:
        result = AnalysisResult.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise InvalidAnalysis(problems[:500]) from None
    if extraction:
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(extraction).iter_errors(result.structured_data)
        )
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "(root)"
            raise InvalidAnalysis(f"structured_data.{where}: {error.message}"[:500])
    return result.model_dump(mode="json")


def has_conversation(turns: list[TranscriptTurn]) -> bool:
    return any(t.role == "user" and t.text.strip() for t in turns)


def transcript_for_prompt(turns: list[TranscriptTurn]) -> str:
    lines = []
    for turn in turns:
        speaker = SPEAKERS.get(turn.role, turn.role)
        cut = " (cut off by the caller)" if turn.interrupted else ""
        if turn.text.strip():
            lines.append(f"{speaker}: {turn.text.strip()}{cut}")
        for call in turn.tool_calls or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            arguments = json.dumps(function.get("arguments") or {})
            lines.append(f"{speaker} used tool {function.get('name')} with {arguments}")
    return "\n".join(lines)


def build_messages(
    call: Call, agent: Agent | None, turns: list[TranscriptTurn], feedback: str | None
) -> list[dict[str, Any]]:
    instructions = (agent.system_prompt if agent else "")[:PROMPT_INSTRUCTIONS_CHARS]
    system = (
        "You analyse a finished phone call between an AI sales agent and a caller. "
        "Answer with one JSON object that matches the given schema and nothing else.\n"
        "- summary: two or three sentences on what happened.\n"
        "- caller_sentiment: how the caller felt overall.\n"
        f"- outcome: one of {', '.join(OUTCOMES)}.\n"
        "- lead_score: 0-100, how likely this caller is to buy; lead_score_reasons: short "
        "reasons for the score.\n"
        "- success: whether the agent achieved the goal in its instructions; "
        "success_reason: why.\n"
        "- structured_data: only facts stated in the call; leave out what was not said.\n\n"
        f"The agent's instructions:\n{instructions or '(none)'}"
    )
    facts = (
        f"Direction: {call.direction}. Duration: {call.duration_seconds or 0:.0f} s. "
        f"Ended because: {call.ended_reason or 'unknown'}."
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{facts}\n\nTranscript:\n{transcript_for_prompt(turns)}"},
    ]
    if feedback:
        messages.append(
            {
                "role": "user",
                "content": f"Your previous answer was rejected ({feedback}). "
                "Reply again with only a JSON object that matches the schema.",
            }
        )
    return messages


@dataclass
class _Job:
    call_id: str
    feedback: str | None = None
    invalid_answers: int = 0


class CallAnalyser:
    """Runs analyses in the background. `on_call_event` is its part of the CallHook."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        llm: LLMProvider,
        outbox: Outbox,
        settings: Settings,
        *,
        concurrency: int = 1,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.llm = llm
        self.outbox = outbox
        self.settings = settings
        self.jitter = jitter
        # Live calls share the LLM: post-call work must not crowd them out.
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks = TaskSet("analysis")

    async def on_call_event(self, session: AsyncSession, call: Call, event_name: str) -> None:
        """At `call.ended`: mark the call pending (or skipped) before the outbox writes the
        report, and start the analysis once the transaction commits."""
        if event_name != "call.ended" or call.analysis_status is not None:
            return
        # a call that never streamed has no transcript to read (busy, no answer, refused)
        if call.stream_sid is None or not has_conversation(await load_turns(session, call.id)):
            call.analysis_status = "skipped"
            return
        call.analysis_status = "pending"
        call_id = call.id
        after_commit(session, lambda: self.schedule(call_id))

    def schedule(self, call_id: str) -> None:
        self._tasks.spawn(call_id, self._analyse(_Job(call_id)))

    async def start(self) -> None:
        async with self.sessionmaker() as session:
            pending = await session.scalars(
                select(Call.id).where(Call.analysis_status == "pending").order_by(Call.ended_at)
            )
            for call_id in pending:
                self.schedule(call_id)

    async def aclose(self) -> None:
        await self._tasks.aclose()

    async def _analyse(self, job: _Job) -> None:
        while True:
            delay = await self._attempt(job)
            if delay is None:
                return
            await asyncio.sleep(delay)  # backoff between attempts

    async def _attempt(self, job: _Job) -> float | None:
        """One try; the delay before the next, or None when the analysis is settled. The
        whole try holds a slot: at a burst of hang-ups, the reads and writes of a hundred
        analyses must not queue in front of live calls' database work either."""
        async with self._slots:
            return await self._attempt_in_slot(job)

    async def _attempt_in_slot(self, job: _Job) -> float | None:
        async with self.sessionmaker() as session:
            call = await session.get(Call, job.call_id)
            if call is None or call.analysis_status != "pending":
                return None
            agent = await load_agent(session, call)
            turns = await load_turns(session, call.id)
        extraction = dict(agent.analysis_schema or {}) if agent else {}
        model = (agent.llm_model if agent else None) or self.settings.OLLAMA_MODEL
        messages = build_messages(call, agent, turns, job.feedback)
        try:
            raw = await self.llm.complete_json(
                messages, model=model, schema=response_schema(extraction)
            )
            analysis = validate_analysis(raw, extraction)
        except UNAVAILABLE as exc:
            return await self._unavailable(job, exc)
        except (LLMError, InvalidAnalysis) as exc:
            return await self._invalid(job, exc)
        except jsonschema.SchemaError as exc:
            await self._settle(job, None, f"analysis_schema is not a valid JSON schema: {exc}")
            return None
        await self._settle(job, analysis, None)
        return None

    async def _unavailable(self, job: _Job, exc: Exception) -> float | None:
        attempts = await self._count_failure(job, f"llm_unavailable: {exc}")
        log.info("call %s: analysis attempt %d: LLM unavailable", job.call_id, attempts)
        if attempts >= self.settings.ANALYSIS_MAX_ATTEMPTS:
            await self._settle(job, None, f"LLM unavailable after {attempts} attempts: {exc}")
            return None
        delay = self.settings.ANALYSIS_RETRY_BASE_S * 2.0 ** min(attempts - 1, 30)
        return min(delay, MAX_RETRY_DELAY_S) * (0.5 + self.jitter() / 2)

    async def _invalid(self, job: _Job, exc: Exception) -> float | None:
        job.invalid_answers += 1
        job.feedback = str(exc)
        attempts = await self._count_failure(job, f"invalid output: {exc}", release=False)
        log.info("call %s: analysis attempt %d: invalid output", job.call_id, attempts)
        if (
            job.invalid_answers >= INVALID_OUTPUT_ATTEMPTS
            or attempts >= self.settings.ANALYSIS_MAX_ATTEMPTS
        ):
            await self._settle(job, None, f"invalid output after {attempts} attempts: {exc}")
            return None
        return min(self.settings.ANALYSIS_RETRY_BASE_S, 1.0)

    async def _count_failure(self, job: _Job, error: str, *, release: bool = True) -> int:
        """Count the attempt; when the LLM is down, let a held report go out now."""
        async with self.sessionmaker() as session, session.begin():
            call = await session.get(Call, job.call_id)
            if call is None:
                return self.settings.ANALYSIS_MAX_ATTEMPTS
            call.analysis_attempts += 1
            call.analysis_error = error[:1000]
            if release:
                await self.outbox.release_report(session, call, reason="llm_unavailable")
            return call.analysis_attempts

    async def _settle(self, job: _Job, analysis: dict[str, Any] | None, error: str | None) -> None:
        """Store the outcome and report it, in one transaction: inside the held `call.ended`
        if it has not gone out yet, otherwise as `call.analyzed`."""
        async with self.sessionmaker() as session, session.begin():
            call = await session.get(Call, job.call_id)
            if call is None:
                return
            if analysis is not None:
                call.analysis_attempts += 1
            call.analysis = analysis
            call.analysis_status = "completed" if analysis is not None else "failed"
            call.analysis_error = error[:1000] if error else None
            if not await self.outbox.release_report(session, call):
                await self.outbox.analyzed(session, call)
        log.info("call %s: analysis %s", job.call_id, call.analysis_status)
