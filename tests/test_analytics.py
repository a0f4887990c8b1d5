"""`GET /v1/analytics`: figures per day and per agent from stored calls, turns, events,
bookings and webhook deliveries, through the real app and a real SQLite database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from models import Booking, Call, CallEvent, TranscriptTurn, WebhookEvent
from tests.conftest import create_agent


async def _seed(app: Any, agent_id: str, other_agent: str) -> datetime:
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    yesterday = today - timedelta(days=1)
    calls = [
        # id, agent, day, connected, outcome, lead score, direction
        ("call_a1", agent_id, today, True, "meeting_booked", 90, "outbound"),
        ("call_a2", agent_id, today, True, "not_interested", 30, "inbound"),
        ("call_a3", agent_id, today, False, None, None, "outbound"),
        ("call_b1", other_agent, yesterday, True, "qualified", 60, "web"),
    ]
    rows = [
        {
            "id": cid,
            "agent_id": agent,
            "direction": direction,
            "from_number": "+14155550100",
            "to_number": "+14155550199",
            "status": "completed" if connected else "no-answer",
            "created_at": day,
            "started_at": day if connected else None,
            "variables": {},
            "analysis": {"outcome": outcome, "lead_score": score} if outcome else None,
            "outcome": outcome,
            "lead_score": score,
        }
        for cid, agent, day, connected, outcome, score, direction in calls
    ]
    latencies = {"call_a1": [500.0, 700.0, 900.0], "call_a2": [1500.0], "call_b1": [300.0]}
    turns = [
        {"call_id": cid, "seq": n + 1, "role": "assistant", "text": "", "first_media_ms": ms}
        for cid, values in latencies.items()
        for n, ms in enumerate(values)
    ]
    turns.append({"call_id": "call_a1", "seq": 9, "role": "user", "text": "", "first_media_ms": 1})
    database = app.state.db
    async with database.sessionmaker() as session, session.begin():
        await session.execute(insert(Call), rows)
        await session.execute(insert(TranscriptTurn), turns)
        await session.execute(
            insert(CallEvent),
            [{"call_id": "call_a1", "type": "barge_in"}] * 2
            + [{"call_id": "call_a2", "type": "backchannel"}],
        )
        await session.execute(
            insert(Booking),
            [{"agent_id": agent_id, "call_id": "call_a1", "start_at": today, "end_at": today}],
        )
        await session.execute(
            insert(WebhookEvent),
            [
                {"call_id": "call_a1", "event_type": "call.ended", "url": "u", "status": "failed"},
                {
                    "call_id": "call_a2",
                    "event_type": "call.ended",
                    "url": "u",
                    "status": "delivered",
                },
            ],
        )
    return today


async def test_analytics_per_day_and_per_agent(app, client):
    agent = await create_agent(client, name="Sales")
    other = await create_agent(client, name="Support")
    today = await _seed(app, agent["id"], other["id"])
    start = (today - timedelta(days=2)).date().isoformat()
    response = await client.get(f"/v1/analytics?start={start}&end={today.date().isoformat()}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [b["key"] for b in body["buckets"]][-1] == today.date().isoformat()
    assert len(body["buckets"]) == 3  # every day of the range, empty ones too
    day = body["buckets"][-1]
    assert day["calls"] == 3 and day["connected"] == 2
    assert day["connect_rate"] == round(2 / 3, 4)
    assert day["outcomes"] == {"meeting_booked": 1, "not_interested": 1}
    assert day["meetings_booked"] == 1
    assert day["average_lead_score"] == 60.0
    assert day["barge_ins"] == 2 and day["barge_ins_per_call"] == round(2 / 3, 3)
    assert day["webhook_failures"] == 1
    # nearest rank over 500, 700, 900, 1500 ms (10 ms bins, upper edges)
    assert day["voice_to_voice_p50_ms"] == 710.0
    assert day["voice_to_voice_p95_ms"] == 1510.0
    assert body["buckets"][0]["calls"] == 0 and body["buckets"][0]["connect_rate"] is None
    totals = body["totals"]
    assert totals["calls"] == 4 and totals["voice_to_voice_p50_ms"] == 710.0
    assert totals["outcomes"]["qualified"] == 1

    by_agent = (await client.get(f"/v1/analytics?group_by=agent&start={start}")).json()
    labels = {b["label"]: b for b in by_agent["buckets"]}
    assert labels["Sales"]["calls"] == 3 and labels["Support"]["calls"] == 1
    assert labels["Support"]["voice_to_voice_p95_ms"] == 310.0

    only_web = (await client.get(f"/v1/analytics?direction=web&start={start}")).json()
    assert only_web["totals"]["calls"] == 1


async def test_analytics_refuses_a_bad_range(client):
    response = await client.get("/v1/analytics?start=2026-05-02&end=2026-05-01")
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "end"
    response = await client.get("/v1/analytics?start=2024-01-01&end=2026-01-01")
    assert response.status_code == 422 and "366" in response.json()["error"]["message"]
    response = await client.get("/v1/analytics?group_by=week")
    assert response.status_code == 422 and response.json()["error"]["field"] == "group_by"


async def test_calls_list_filters_by_outcome_and_web_direction(app, client):
    agent = await create_agent(client)
    other = await create_agent(client, name="Other")
    await _seed(app, agent["id"], other["id"])
    booked = (await client.get("/v1/calls?outcome=meeting_booked")).json()
    assert [c["id"] for c in booked["items"]] == ["call_a1"]
    web = (await client.get("/v1/calls?direction=web")).json()
    assert [c["id"] for c in web["items"]] == ["call_b1"]
