"""Whole campaigns through the real server, the Twilio emulator's dial plan (who answers
each number, signed status and AMD callbacks, Media Streams from `TwilioCaller`), the
Deepgram and Ollama emulators, over real sockets. The dialer's clock is injected: a
Wednesday in office hours, moving with real time."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from emulators.audio import silence, synth_speech, tone
from emulators.base import async_wait_until
from emulators.ollama import Reply
from emulators.twilio_caller import Hangup, Say, SayAfterAgentAudio
from emulators.twilio_dialplan import Answer
from models import CampaignContact, DncEntry, WebhookEvent
from tests.harness import LiveStack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WEDNESDAY_NOON_NY = datetime(2027, 1, 6, 17, 0, tzinfo=UTC)


def moving_clock(start: datetime) -> Any:
    t0 = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - t0)


def llm_reply(messages: list[dict[str, Any]]) -> Reply:
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    if "OPTOUT" in system and not any(m["role"] == "tool" for m in messages):
        return Reply(tool_calls=[{"name": "opt_out", "arguments": {"reason": "asked"}}])
    return Reply("Great, I will send the details. Goodbye!")


@pytest.fixture(scope="module")
def audio() -> dict[str, bytes]:
    return {
        "yes": synth_speech("Sure, tell me more."),
        "greeting": synth_speech("Hi, you have reached Sam. Leave a message after the tone.")
        + silence(0.2)
        + tone(0.4, 1000),
    }


def human(audio: dict[str, bytes]) -> Answer:
    return Answer(
        "human",
        [SayAfterAgentAudio(1, 0.3, audio["yes"], anchor="end"), Hangup(15.0)],
        amd_after_s=0.8,
    )


def machine(audio: dict[str, bytes]) -> Answer:
    # DetectMessageEnd answers once the greeting and its beep are over
    greeting_s = len(audio["greeting"]) / 8000
    return Answer("machine", [Say(0.0, audio["greeting"])], amd_after_s=greeting_s + 0.3)


AGENT = {
    "system_prompt": "You are calling {{name}} about Acme.",
    "first_message": "Hi {{name}}, Acme here.",
    "end_call_phrases": ["goodbye"],
    "tools": [{"type": "opt_out"}],
    "voicemail": {
        "detect": True,
        "action": "leave_message",
        "message": "Hi {{name}}, this is Acme. Please call us back.",
    },
    "webhook_url": "http://127.0.0.1:9/hooks",
}


async def _wait_until_done(http: Any, campaign_id: str, within_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        body = (await http.get(f"/v1/campaigns/{campaign_id}")).json()
        if body["status"] == "completed":
            return dict(body)
        await asyncio.sleep(0.25)
    raise AssertionError(f"campaign not completed in {within_s} s: {body['stats']}")


async def _dialing_now(stack: LiveStack, campaign_id: str) -> int:
    async def count() -> int:
        async with stack.app.state.db.sessionmaker() as session:
            n = await session.scalar(
                select(func.count())
                .select_from(CampaignContact)
                .where(
                    CampaignContact.campaign_id == campaign_id, CampaignContact.state == "dialing"
                )
            )
            return int(n or 0)

    assert stack.server is not None
    return await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(count(), stack.server.loop)  # type: ignore[arg-type]
    )


def _overlap_peak(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


async def test_hundred_contacts_mixed_outcomes(tmp_path, audio):
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Sure, tell me more."]},
        ollama={"replies": llm_reply, "ttft_ms": 50},
        CAMPAIGN_TICK_MS=50,
        CAMPAIGN_LEASE_S=20,
        MAX_CONCURRENT_CALLS=40,
        CAMPAIGN_INBOUND_RESERVE=5,
    ) as stack:
        stack.app.state.campaign_events.clock = moving_clock(WEDNESDAY_NOON_NY)
        plan = stack.dial_plan()
        agent = await stack.create_agent(**AGENT)
        rows: list[str] = []
        expected: dict[str, tuple[str, int]] = {}

        def add(kind: str, count: int, final: str, attempts: int, *answers: Answer) -> None:
            for i in range(count):
                phone = f"+1415555{len(rows):04d}"
                name = f"{kind}{i}" + ("OPTOUT" if kind == "optout" else "")
                rows.append(f"{phone},{name},{kind}")
                expected[phone] = (final, attempts)
                if answers:
                    plan.script(phone, *answers)

        add("human", 40, "answered", 1, human(audio))
        add("voicemail", 20, "voicemail", 1, machine(audio))
        add("retry", 15, "answered", 2, Answer("no-answer"), human(audio))
        add("busy", 10, "busy", 2, Answer("busy"))
        add("invalid", 10, "invalid", 1, Answer("invalid"))
        add("dnc", 2, "suppressed", 0)
        add("optout", 3, "opted_out", 1, human(audio))
        assert len(rows) == 100
        async with stack.api() as http:
            for phone, (final, _) in expected.items():
                if final == "suppressed":
                    assert (await http.post("/v1/dnc", json={"phone": phone})).status_code == 201
            body = {
                "name": "Mixed",
                "agent_id": agent["id"],
                "max_concurrent_calls": 12,
                "calls_per_second": 20,
                "retry_policy": {
                    "no_answer": {"max_attempts": 3, "delay_seconds": 1},
                    "busy": {"max_attempts": 2, "delay_seconds": 1},
                    "voicemail": {"max_attempts": 1, "delay_seconds": 1},
                },
            }
            campaign = (await http.post("/v1/campaigns", json=body)).json()
            csv_body = "phone,name,kind\n" + "\n".join(rows) + "\n"
            files = {"file": ("leads.csv", csv_body.encode(), "text/csv")}
            report = (
                await http.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files)
            ).json()
            assert (report["imported"], report["suppressed"], report["errors"]) == (100, 2, [])
            started = await http.post(f"/v1/campaigns/{campaign['id']}/start")
            assert started.status_code == 200, started.text

            peak_dialing = 0
            sampling = True

            async def sample() -> None:
                nonlocal peak_dialing
                while sampling:
                    peak_dialing = max(peak_dialing, await _dialing_now(stack, campaign["id"]))
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            began = time.monotonic()
            try:
                done = await _wait_until_done(http, campaign["id"], within_s=150)
            finally:
                sampling = False
                await sampler
            took = time.monotonic() - began
            results = (await http.get(f"/v1/campaigns/{campaign['id']}/results?format=csv")).text
            contacts = []
            for offset in (0, 50):
                page = await http.get(
                    f"/v1/campaigns/{campaign['id']}/contacts?limit=50&offset={offset}"
                )
                contacts += page.json()["items"]
            voicemails = []
            for contact in contacts:
                if contact["state"] == "voicemail":
                    call_id = contact["attempt_log"][0]["call_id"]
                    voicemails.append((await http.get(f"/v1/calls/{call_id}")).json())
        await asyncio.sleep(0.5)  # the last streams close
        records = list(plan.records.values())

        async def read_db() -> tuple[list[Any], list[str]]:
            async with stack.app.state.db.sessionmaker() as session:
                events = list(await session.scalars(select(WebhookEvent)))
                dnc = list(await session.scalars(select(DncEntry.phone)))
                return events, dnc

        assert stack.server is not None
        events, dnc_numbers = stack.server.run_in_loop(read_db())

    by_phone = {row["phone"]: row for row in csv.DictReader(io.StringIO(results))}
    assert len(by_phone) == 100
    wrong = {
        p: (r["final_outcome"], r["attempts"])
        for p, r in by_phone.items()
        if (r["final_outcome"], int(r["attempts"])) != expected[p]
    }
    assert not wrong, wrong
    # every contact's attempts carry their call ids
    for contact in contacts:
        assert len(contact["attempt_log"]) == contact["attempts"]
        assert all(a["call_id"] and a["outcome"] for a in contact["attempt_log"])
    stats = done["stats"]
    assert stats["outcomes"]["voicemail"] == 20 and stats["outcomes"]["opted_out"] == 3
    assert stats["outcomes"]["busy"] == 20 and stats["outcomes"]["invalid"] == 10
    assert stats["calls_in_progress"] == 0
    # the voicemail was left in the agent's voice after the beep, rendered for the contact
    assert len(voicemails) == 20
    for call in voicemails:
        assert call["ended_reason"] == "voicemail" and call["answered_by"] == "machine_end_beep"
        said = [t["text"] for t in call["turns"] if t["role"] == "assistant"]
        assert said and said[-1].startswith("Hi voicemail") and "call us back" in said[-1], call
    # no number ever had two calls at once; the campaign's cap held
    per_number: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        per_number.setdefault(r.to, []).append((r.created, r.ended or r.created))
    assert all(_overlap_peak(iv) == 1 for iv in per_number.values())
    assert 1 <= peak_dialing <= 12
    # opt-outs went on the do-not-call list; webhooks carried the campaign
    optouts = {p for p, (final, _) in expected.items() if final == "opted_out"}
    assert optouts <= set(dnc_numbers)
    types = [e.event_type for e in events]
    assert types.count("campaign.started") == 1 and types.count("campaign.completed") == 1
    assert types.count("call.voicemail") == 20
    ended = [e.payload["data"]["call"] for e in events if e.event_type == "call.ended"]
    assert ended and all(c["campaign_id"] == campaign["id"] and c["contact_id"] for c in ended)
    print(
        f"\n100 contacts in {took:.1f} s: {len(records)} dials, peak dialing {peak_dialing}, "
        f"emulator peak {_overlap_peak([(r.created, r.ended or r.created) for r in records])}"
    )


class SteppedClock:
    """A clock the test moves: `set()` jumps, real time flows on from there."""

    def __init__(self, start: datetime) -> None:
        self.set(start)

    def set(self, at: datetime) -> None:
        self._base, self._t0 = at, time.monotonic()

    def __call__(self) -> datetime:
        return self._base + timedelta(seconds=time.monotonic() - self._t0)


async def test_window_on_injected_clock_then_pause_within_a_second(tmp_path):
    # Wednesday 12:30 UTC: 7:30 in New York, 4:30 in Los Angeles: both windows shut
    clock = SteppedClock(datetime(2027, 1, 6, 12, 30, tzinfo=UTC))
    with LiveStack(tmp_path, CAMPAIGN_TICK_MS=50, MAX_CONCURRENT_CALLS=0) as stack:
        stack.app.state.campaign_events.clock = clock
        plan = stack.dial_plan(default=Answer("no-answer", ring_s=0.2))
        agent = await stack.create_agent()
        new_york = [f"+1212555{i:04d}" for i in range(3)]
        los_angeles = [f"+1415555{i:04d}" for i in range(40)]
        async with stack.api() as http:
            body = {
                "name": "Windows",
                "agent_id": agent["id"],
                "calls_per_second": 4,
                "max_concurrent_calls": 5,
                "retry_policy": {"no_answer": {"max_attempts": 1, "delay_seconds": 0}},
            }
            campaign = (await http.post("/v1/campaigns", json=body)).json()
            contacts = [{"phone": p} for p in new_york + los_angeles]
            url = f"/v1/campaigns/{campaign['id']}/contacts"
            assert (await http.post(url, json={"contacts": contacts})).status_code == 201
            await http.post(f"/v1/campaigns/{campaign['id']}/start")
            await asyncio.sleep(1.0)
            assert plan.records == {}, "dialed outside the local window"

            clock.set(datetime(2027, 1, 6, 14, 0, 30, tzinfo=UTC))  # 9:00 NY, 6:00 LA
            async with asyncio.timeout(20):
                await async_wait_until(lambda: len(plan.records) >= len(new_york))
            await asyncio.sleep(1.0)
            assert {r.to for r in plan.records.values()} == set(new_york)
            waiting = (await http.get(f"{url}?state=pending")).json()["items"]
            assert waiting and all(
                c["next_attempt_at"].startswith("2027-01-06T17:00") for c in waiting
            )

            clock.set(datetime(2027, 1, 6, 17, 0, 30, tzinfo=UTC))  # 9:00 LA
            async with asyncio.timeout(20):
                await async_wait_until(lambda: len(plan.records) >= len(new_york) + 6)
            paused = await http.post(f"/v1/campaigns/{campaign['id']}/pause")
            paused_at = time.monotonic()
            assert paused.json()["status"] == "paused"
            await asyncio.sleep(2.5)
            late = [r for r in plan.records.values() if r.created > paused_at + 1.0]
            assert not late, f"{len(late)} dials more than a second after pause"
            dialed_while_paused = len(plan.records)
            assert dialed_while_paused < len(new_york) + len(los_angeles)

            await http.post(f"/v1/campaigns/{campaign['id']}/resume")
            async with asyncio.timeout(30):
                await async_wait_until(lambda: len(plan.records) >= dialed_while_paused + 3)
            cancelled = (await http.post(f"/v1/campaigns/{campaign['id']}/cancel")).json()
            assert cancelled["status"] == "cancelled"
            await asyncio.sleep(1.5)  # calls in progress finish
            final = (await http.get(f"/v1/campaigns/{campaign['id']}")).json()["stats"]
        assert final["contacts"].get("pending", 0) == 0
        assert final["contacts"].get("cancelled", 0) > 0
        assert final["contacts"].get("dialing", 0) == 0
