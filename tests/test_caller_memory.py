"""Caller memory: what the next call's AgentConfig knows about earlier calls with the same
number for the same agent (real app, real SQLite)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from models import Booking, Call, TranscriptTurn
from store.memory import MEMORY_MAX_CHARS
from tests.conftest import create_agent

CALLER = "+14155550199"
OURS = "+14155550100"


async def _call(app: Any, agent_id: str, *, when: datetime, **fields: Any) -> str:
    values = {
        "direction": "inbound",
        "from_number": CALLER,
        "to_number": OURS,
        "status": "completed",
        **fields,
    }
    async with app.state.db.sessionmaker() as session, session.begin():
        call = Call(agent_id=agent_id, created_at=when, **values)
        session.add(call)
    return call.id


async def _turns(app: Any, call_id: str, *texts: tuple[str, str]) -> None:
    async with app.state.db.sessionmaker() as session, session.begin():
        for seq, (role, text) in enumerate(texts, start=1):
            session.add(TranscriptTurn(call_id=call_id, seq=seq, role=role, text=text))


async def _memory(app: Any, call_id: str) -> str:
    config = await app.state.calls.deps.store.load_config(call_id)
    return config.caller_memory


async def test_memory_summarises_earlier_calls_and_bookings(
    app: Any, client: httpx.AsyncClient
) -> None:
    agent = (await create_agent(client))["id"]
    other_agent = (await create_agent(client))["id"]
    now = datetime.now(UTC)
    analysed = await _call(
        app,
        agent,
        when=now - timedelta(days=3),
        analysis={"summary": "Asked about pricing; we promised to email the Pro plan sheet."},
    )
    await _turns(app, analysed, ("user", "Ignored: the summary wins"))
    recent = await _call(app, agent, when=now - timedelta(days=1))
    await _turns(
        app,
        recent,
        ("assistant", "Hi, this is Acme."),
        ("user", "Can we move the demo to Friday?"),
        ("assistant", "Sure, I moved it to Friday at ten."),
    )
    outbound = await _call(
        app,
        agent,
        when=now - timedelta(days=2),
        direction="outbound",
        from_number=OURS,
        to_number=CALLER,
        analysis={"summary": "Outbound follow-up; left a voicemail."},
    )
    await _call(app, other_agent, when=now, analysis={"summary": "Another agent's call"})
    await _call(app, agent, when=now, from_number="+14155550111", analysis={"summary": "Stranger"})
    async with app.state.db.sessionmaker() as session, session.begin():
        start = now.replace(microsecond=0) + timedelta(days=2)
        for status, offset in (("confirmed", 0), ("cancelled", 1)):
            session.add(
                Booking(
                    agent_id=agent,
                    call_id=recent,
                    start_at=start + timedelta(hours=offset),
                    end_at=start + timedelta(hours=offset, minutes=30),
                    timezone="Europe/Berlin",
                    attendee_phone=CALLER,
                    status=status,
                )
            )
    current = await _call(app, agent, when=now + timedelta(seconds=1), status="in-progress")

    memory = await _memory(app, current)

    lines = memory.splitlines()
    assert lines[0].startswith("- Meeting booked for ") and "(Europe/Berlin)" in lines[0]
    assert len([line for line in lines if "Meeting booked" in line]) == 1  # not the cancelled
    assert lines[1:] == [
        f'- Call on {(now - timedelta(days=1)):%Y-%m-%d}: you: "Hi, this is Acme."; '
        'caller: "Can we move the demo to Friday?"; you: "Sure, I moved it to Friday at ten."',
        f"- Call on {(now - timedelta(days=2)):%Y-%m-%d}: Outbound follow-up; left a voicemail.",
        f"- Call on {(now - timedelta(days=3)):%Y-%m-%d}: Asked about pricing; we promised to "
        "email the Pro plan sheet.",
    ]
    assert "Another agent" not in memory and "Stranger" not in memory
    assert analysed != outbound


async def test_memory_is_short_and_empty_for_a_first_call(
    app: Any, client: httpx.AsyncClient
) -> None:
    agent = (await create_agent(client))["id"]
    now = datetime.now(UTC)
    first = await _call(app, agent, when=now)
    assert await _memory(app, first) == ""
    for day in range(1, 4):
        await _call(app, agent, when=now - timedelta(days=day), analysis={"summary": "x" * 500})
    memory = await _memory(app, first)
    assert 0 < len(memory) <= MEMORY_MAX_CHARS
    assert memory.count("- Call on") >= 1
