"""MAX_CONCURRENT_CALLS: past the cap an inbound call gets a busy signal and is recorded as
refused, `POST /v1/calls` gets a 503 with Retry-After and stores nothing, and a slot frees
when its call ends (stream over, status callback, or a reservation that lapsed)."""

from __future__ import annotations

import asyncio
import re

import pytest

from api.admission import CallAdmission
from emulators.base import async_wait_until
from emulators.twilio_caller import Hangup, new_sid
from tests.conftest import (
    ACCOUNT_SID,
    create_agent,
    make_settings,
    post_signed,
    running_app,
)
from tests.harness import LiveStack

AGENT_NUMBER = "+14155550100"


def _inbound(call_sid: str) -> dict[str, str]:
    return {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+14155550199",
        "To": AGENT_NUMBER,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


def _status(call_sid: str, status: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "CallStatus": status}


def _call_id(twiml: str) -> str:
    match = re.search(r'<Parameter name="call_id" value="([^"]+)"', twiml)
    assert match, twiml
    return match.group(1)


@pytest.fixture
async def capped(tmp_path, twilio_emulator):
    settings = make_settings(
        tmp_path, TWILIO_API_BASE_URL=twilio_emulator.url, MAX_CONCURRENT_CALLS=1
    )
    async with running_app(settings) as (_, http):
        yield http


async def test_inbound_call_past_the_cap_hears_busy_and_is_recorded_as_refused(capped):
    http = capped
    await create_agent(http, phone_number=AGENT_NUMBER)
    first_sid, second_sid = new_sid("CA"), new_sid("CA")
    first = await post_signed(http, "/twilio/voice", _inbound(first_sid))
    first_id = _call_id(first.text)
    assert (await http.get("/health")).json()["calls"] == {"live": 0, "reserved": 1, "limit": 1}

    second = await post_signed(http, "/twilio/voice", _inbound(second_sid))
    assert second.status_code == 200
    assert '<Reject reason="busy" />' in second.text and "<Stream" not in second.text
    refused = [c for c in (await http.get("/v1/calls")).json()["items"] if c["id"] != first_id]
    assert [(c["status"], c["ended_reason"]) for c in refused] == [("busy", "at-capacity")]
    assert refused[0]["ended_at"] is not None
    assert refused[0]["analysis_status"] == "skipped"  # call.ended went out, no LLM spent
    metrics = (await http.get("/metrics")).text
    assert 'aisdr_calls_refused_total{direction="inbound"} 1.0' in metrics
    assert "aisdr_call_slots_in_use 1.0" in metrics

    # Twilio retrying either webhook gets the same answer, and nothing is counted twice
    assert _call_id((await post_signed(http, "/twilio/voice", _inbound(first_sid))).text)
    retried = await post_signed(http, "/twilio/voice", _inbound(second_sid))
    assert "<Reject" in retried.text
    assert 'direction="inbound"} 1.0' in (await http.get("/metrics")).text
    assert (await http.get("/v1/calls")).json()["total"] == 2

    # the admitted call ends before its stream started: its slot is free again
    await post_signed(http, "/twilio/status", _status(first_sid, "canceled"))
    third = await post_signed(http, "/twilio/voice", _inbound(new_sid("CA")))
    assert "<Stream" in third.text


async def test_outbound_call_past_the_cap_is_a_503_and_stores_nothing(capped, twilio_emulator):
    http = capped
    agent = await create_agent(http, phone_number=AGENT_NUMBER)
    dial = {"agent_id": agent["id"], "to": "+14155550123"}
    first = await http.post("/v1/calls", json=dial)
    assert first.status_code == 201, first.text

    refused = await http.post("/v1/calls", json=dial)
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    error = refused.json()["error"]
    assert error["code"] == "at_capacity" and "MAX_CONCURRENT_CALLS" in error["message"]
    assert (await http.get("/v1/calls")).json()["total"] == 1
    assert len(twilio_emulator.calls) == 1  # never dialled
    assert (
        'aisdr_calls_refused_total{direction="outbound"} 1.0' in (await http.get("/metrics")).text
    )

    # the first callee never answers: Twilio's status callback frees the slot
    sid = first.json()["twilio_call_sid"]
    await post_signed(http, "/twilio/status", _status(sid, "no-answer"))
    assert (await http.post("/v1/calls", json=dial)).status_code == 201


async def test_a_dial_twilio_refuses_gives_its_slot_back(capped, twilio_emulator):
    http = capped
    agent = await create_agent(http, phone_number=AGENT_NUMBER)
    dial = {"agent_id": agent["id"], "to": "+14155550123"}
    twilio_emulator.fail_next(status=400, code=21215, message="Geo permission not enabled")
    assert (await http.post("/v1/calls", json=dial)).status_code == 502
    assert (await http.post("/v1/calls", json=dial)).status_code == 201


def test_a_reservation_lapses_and_live_streams_always_hold_their_slot():
    now = [0.0]
    live: set[str] = set()
    admission = CallAdmission(2, live=lambda: live, clock=lambda: now[0])
    assert admission.try_admit("a", hold_s=30) and admission.try_admit("b", hold_s=30)
    assert not admission.try_admit("c", hold_s=30)
    live.add("a")  # a's stream started: its reservation becomes the live call
    assert (admission.in_use(), admission.reserved()) == (2, 1)
    now[0] = 31.0  # b's stream never came
    assert admission.in_use() == 1 and admission.try_admit("c", hold_s=30)
    live.update({"x", "y"})  # streams admitted elsewhere (say, before a restart) still count
    assert admission.in_use() == 4 and not admission.try_admit("d", hold_s=30)
    assert admission.try_admit("a", hold_s=30)  # a call holding a slot stays admitted
    assert CallAdmission(0, live=lambda: live).try_admit("z", hold_s=1)  # 0: no limit


@pytest.mark.slow
async def test_a_live_call_holds_its_slot_until_it_hangs_up(tmp_path):
    """Real server, real sockets: while one call streams, a second is refused; once the
    first caller hangs up, the next call is admitted and is answered."""
    with LiveStack(tmp_path, MAX_CONCURRENT_CALLS=1) as stack:
        await stack.create_agent()
        first_sid = new_sid("CA")
        first_id = await stack.answer_inbound(first_sid)
        first = asyncio.create_task(stack.caller(first_id, [Hangup(3.0)], call_sid=first_sid).run())
        await async_wait_until(lambda: stack.active_calls() == 1)
        # the stream consumed the reservation: the slot is held by the live call alone
        async with stack.api() as http:
            assert (await http.get("/health")).json()["calls"]["reserved"] == 0
            refused = await post_signed(http, "/twilio/voice", _inbound(new_sid("CA")))
        assert '<Reject reason="busy" />' in refused.text
        result = await first
        assert result.greeting_latency is not None  # the admitted call went on as normal
        await async_wait_until(lambda: stack.active_calls() == 0)
        second_id, second = await stack.inbound_call([Hangup(2.0)])
        assert second.greeting_latency is not None and second_id != first_id
