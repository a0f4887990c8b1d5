"""Caller memory: a few lines on an agent's earlier calls with the same number (the analysis
summary, else the last words) and the meetings booked for it, for the next call's prompt.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from models import Booking, Call, TranscriptTurn
from tools.scheduling import spoken_in
from utils import utcnow

MEMORY_CALLS = 3
MEMORY_MAX_CHARS = 600
_MEMORY_TURNS = 4


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


async def caller_memory(
    session: AsyncSession, agent_id: str, number: str, *, exclude_call: str | None = None
) -> str:
    """A few lines on this agent's earlier calls with `number` (newest first) and the
    meetings booked for it: the analysis summary when there is one, else the last words."""
    with_number = or_(
        and_(Call.direction == "inbound", Call.from_number == number),
        and_(Call.direction == "outbound", Call.to_number == number),
    )
    calls = await session.scalars(
        select(Call)
        .where(Call.agent_id == agent_id, Call.id != (exclude_call or ""), with_number)
        .order_by(Call.created_at.desc())
        .limit(MEMORY_CALLS)
    )
    lines = await _booking_lines(session, agent_id, number)  # first: they matter most
    earlier_calls = list(calls.all())
    last_words = await _last_turns(session, [c.id for c in earlier_calls if not _summary(c)])
    for earlier in earlier_calls:
        if digest := _summary(earlier) or _digest(last_words.get(earlier.id, [])):
            lines.append(f"- Call on {earlier.created_at:%Y-%m-%d}: {digest}")
    memory = ""
    for line in lines:  # whole lines only, within the budget
        if len(memory) + len(line) + 1 > MEMORY_MAX_CHARS:
            break
        memory += line + "\n"
    return memory.rstrip()


def _summary(call: Call) -> str:
    analysis = call.analysis if isinstance(call.analysis, dict) else {}
    summary = str(analysis.get("summary") or "").strip()
    return _clip(summary, 240) if summary else ""


async def _last_turns(
    session: AsyncSession, call_ids: list[str]
) -> dict[str, list[TranscriptTurn]]:
    """The last few spoken turns of each call, oldest first: one query for all of them."""
    if not call_ids:
        return {}
    rows = await session.scalars(
        select(TranscriptTurn)
        .where(TranscriptTurn.call_id.in_(call_ids), TranscriptTurn.text != "")
        .order_by(TranscriptTurn.call_id, TranscriptTurn.seq.desc())
    )
    last: dict[str, list[TranscriptTurn]] = {}
    for turn in rows:
        kept = last.setdefault(turn.call_id, [])
        if len(kept) < _MEMORY_TURNS:
            kept.append(turn)
    return {call_id: kept[::-1] for call_id, kept in last.items()}


def _digest(turns: list[TranscriptTurn]) -> str:
    said = [
        f'{"caller" if turn.role == "user" else "you"}: "{_clip(turn.text, 70)}"' for turn in turns
    ]
    return "; ".join(said)


async def _booking_lines(session: AsyncSession, agent_id: str, number: str) -> list[str]:
    bookings = await session.scalars(
        select(Booking)
        .where(
            Booking.agent_id == agent_id,
            Booking.attendee_phone == number,
            Booking.status == "confirmed",
            Booking.start_at >= utcnow(),
        )
        .order_by(Booking.start_at)
        .limit(2)
    )
    return [
        f"- Meeting booked for {spoken_in(b.start_at, b.timezone)} ({b.timezone})."
        for b in bookings.all()
    ]
