"""The end-of-call report: the call record, the transcript with interruptions marked, tool
calls with their outcomes, per-stage latency percentiles and the analysis fields. Webhook
payloads, the analysis prompt and the exports are all built from these pieces, so a CRM sees
the same shape everywhere.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb, pipeline, postcall.outbox, postcall.dispatcher, postcall.analysis.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from models import Agent, Call, CallEvent, ToolInvocation, TranscriptTurn

LATENCY_STAGES = (
    "stt_final_ms",
    "llm_request_ms",
    "llm_first_token_ms",
    "tts_request_ms",
    "tts_first_audio_ms",
    "first_media_ms",
    "retrieval_ms",
)
ANALYSIS_REASONS = {"pending": "pending", "skipped": "no_conversation", "failed": "failed"}
"""Why `analysis` is null, by `Call.analysis_status` (the analyser may say "llm_unavailable")."""


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def call_record(call: Call, agent: Agent | None) -> dict[str, Any]:
    return {
        "id": call.id,
        "agent_id": call.agent_id,
        "agent_name": agent.name if agent else None,
        "direction": call.direction,
        "from": call.from_number,
        "to": call.to_number,
        "twilio_call_sid": call.twilio_call_sid,
        "status": call.status,
        "ended_reason": call.ended_reason,
        "error_message": call.error_message,
        "created_at": iso(call.created_at),
        "started_at": iso(call.started_at),
        "ended_at": iso(call.ended_at),
        "duration_seconds": call.duration_seconds,
        "transferred_to": call.transferred_to,
        "recording_url": call.recording_url,
        "variables": dict(call.variables or {}),
        "metadata": dict(call.call_metadata or {}),
        "campaign_id": call.campaign_id,
        "contact_id": call.contact_id,
        "answered_by": call.answered_by,
    }


def turn_record(turn: TranscriptTurn) -> dict[str, Any]:
    return {
        "seq": turn.seq,
        "role": turn.role,
        "text": turn.text,
        "start_s": turn.start_s,
        "end_s": turn.end_s,
        "interrupted": turn.interrupted,
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; `values` must not be empty."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    share = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * share


def latency_stats(turns: list[TranscriptTurn]) -> dict[str, dict[str, Any]]:
    """p50/p95 (ms) per pipeline stage over the turns that measured it."""
    stats: dict[str, dict[str, Any]] = {}
    for stage in LATENCY_STAGES:
        values = [v for t in turns if (v := getattr(t, stage)) is not None]
        stats[stage] = {
            "count": len(values),
            "p50": round(percentile(values, 0.5), 1) if values else None,
            "p95": round(percentile(values, 0.95), 1) if values else None,
        }
    return stats


def _requested_calls(turns: list[TranscriptTurn]) -> list[dict[str, Any]]:
    requested = []
    for turn in turns:
        for call in turn.tool_calls or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            requested.append(
                {
                    "turn_seq": turn.seq,
                    "name": function.get("name"),
                    "arguments": function.get("arguments") or {},
                }
            )
    return requested


def _by_name(items: list[Any], name_of: Any) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        grouped[name_of(item)].append(item)
    return grouped


def tool_calls(
    turns: list[TranscriptTurn], events: list[CallEvent], invocations: list[ToolInvocation]
) -> list[dict[str, Any]]:
    """Every tool call the model made, in order, with its outcome. The k-th call of a tool
    pairs with the k-th `tool_called` event and the k-th invocation of the same tool."""
    events_by_name = _by_name(events, lambda e: e.data.get("name"))
    runs_by_name = _by_name(invocations, lambda i: i.tool_name)
    seen: dict[str, int] = defaultdict(int)
    report = []
    for call in _requested_calls(turns):
        index = seen[call["name"]]
        seen[call["name"]] += 1
        event = _nth(events_by_name.get(call["name"]), index)
        run = _nth(runs_by_name.get(call["name"]), index)
        report.append(
            {
                **call,
                "action": event.data.get("action") if event else None,
                "call_time_s": event.call_time_s if event else None,
                "status": run.status if run else None,
                "result": _result(event, run),
            }
        )
    return report


def _result(event: CallEvent | None, run: ToolInvocation | None) -> Any:
    if event is not None and "result" in event.data:
        return event.data["result"]
    return run.result if run is not None else None


def _nth(items: list[Any] | None, index: int) -> Any:
    return items[index] if items and index < len(items) else None


def analysis_fields(call: Call, reason: str | None = None) -> dict[str, Any]:
    status = call.analysis_status
    if call.analysis is not None:
        reason = None
    elif reason is None:
        reason = ANALYSIS_REASONS.get(status or "", "pending")
    return {
        "analysis": call.analysis,
        "analysis_status": status,
        "analysis_reason": reason,
        "analysis_error": call.analysis_error,
    }


async def load_turns(session: AsyncSession, call_id: str) -> list[TranscriptTurn]:
    query = select(TranscriptTurn).where(TranscriptTurn.call_id == call_id)
    return list(await session.scalars(query.order_by(TranscriptTurn.seq)))


async def load_agent(session: AsyncSession, call: Call) -> Agent | None:
    return await session.get(Agent, call.agent_id) if call.agent_id else None


async def build_report(
    session: AsyncSession, call: Call, *, reason: str | None = None
) -> dict[str, Any]:
    """The `call.ended` data: record, transcript, tools, latency and analysis."""
    turns = await load_turns(session, call.id)
    events = await session.scalars(
        select(CallEvent)
        .where(CallEvent.call_id == call.id, CallEvent.type == "tool_called")
        .order_by(CallEvent.id)
    )
    invocations = await session.scalars(
        select(ToolInvocation)
        .where(ToolInvocation.call_id == call.id)
        .order_by(ToolInvocation.started_at, ToolInvocation.id)
    )
    return {
        "call": call_record(call, await load_agent(session, call)),
        "transcript": [turn_record(t) for t in turns],
        "tool_calls": tool_calls(turns, list(events), list(invocations)),
        "latency": latency_stats(turns),
        **analysis_fields(call, reason),
    }


# --- transcript renderings for export -------------------------------------------------------

SPEAKERS = {"user": "Caller", "assistant": "Agent"}


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(seconds, 0.0), 60)
    return f"{int(minutes):02d}:{rest:04.1f}"


def transcript_text(turns: list[TranscriptTurn]) -> str:
    """One line per turn: `[mm:ss.s] Speaker: text`, cut-off answers marked."""
    lines = []
    for turn in turns:
        speaker = SPEAKERS.get(turn.role, turn.role.capitalize())
        mark = " [interrupted]" if turn.interrupted else ""
        lines.append(f"[{_clock(turn.start_s)}] {speaker}: {turn.text}{mark}")
    return "\n".join(lines) + ("\n" if lines else "")
