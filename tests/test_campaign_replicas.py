"""Two service instances on one database run the same campaign: the claim (a conditional
UPDATE ... RETURNING), the pacing compare-and-set and the attempt rows keep every dial
single. Neither instance gets Twilio's callbacks here (they go nowhere): every call ends
through the lease and `calls(sid).fetch()`, the reconciliation path."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from emulators.base import async_wait_until
from emulators.twilio_dialplan import Answer, DialPlan
from tests.conftest import create_agent, make_settings, running_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_two_dialers_one_database_dial_each_attempt_once(tmp_path, twilio_emulator):
    twilio_emulator.dial_plan = DialPlan(
        app_base="http://127.0.0.1:9",  # callbacks are lost: the lease and fetch() end calls
        public_base="https://voice.example.test",
        media_url="ws://127.0.0.1:9/twilio/media",
        default=Answer("busy", ring_s=0.1),
    )
    settings = make_settings(
        tmp_path,
        TWILIO_API_BASE_URL=twilio_emulator.url,
        CAMPAIGN_TICK_MS=20,
        CAMPAIGN_LEASE_S=0.5,
        MAX_CONCURRENT_CALLS=0,
    )
    async with AsyncExitStack() as stack:
        app_a, http = await stack.enter_async_context(running_app(settings))
        app_b, _ = await stack.enter_async_context(running_app(settings))
        agent = await create_agent(http, phone_number="+14155550100")
        body = {
            "name": "Replicas",
            "agent_id": agent["id"],
            "max_concurrent_calls": 8,
            "calls_per_second": 50,
            "calling_window": {"days": [0, 1, 2, 3, 4, 5, 6], "start": "00:00", "end": "23:59"},
            "retry_policy": {"busy": {"max_attempts": 2, "delay_seconds": 0.2}},
        }
        campaign = (await http.post("/v1/campaigns", json=body)).json()
        phones = [f"+1415555{i:04d}" for i in range(30)]
        csv_body = "phone,timezone\n" + "".join(f"{p},Etc/GMT\n" for p in phones)
        files = {"file": ("c.csv", csv_body.encode(), "text/csv")}
        await http.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files)
        await http.post(f"/v1/campaigns/{campaign['id']}/start")
        async with asyncio.timeout(150):
            await async_wait_until(
                lambda: app_a.state.dialer.dials + app_b.state.dialer.dials >= 60
            )
            for _ in range(1500):
                state = (await http.get(f"/v1/campaigns/{campaign['id']}")).json()
                if state["status"] == "completed":
                    break
                await asyncio.sleep(0.1)
        final = (await http.get(f"/v1/campaigns/{campaign['id']}")).json()["stats"]
        dials = (app_a.state.dialer.dials, app_b.state.dialer.dials)
    calls = twilio_emulator.calls
    per_number: dict[str, int] = {}
    for call in calls:
        per_number[call["to"]] = per_number.get(call["to"], 0) + 1
    assert per_number == {p: 2 for p in phones}  # every attempt dialed once, none twice
    assert final["contacts"] == {"busy": 30} and final["attempts"] == 60
    assert sum(dials) == 60
    print(f"\ndials by instance: {dials}")


async def test_the_process_cap_less_the_inbound_reserve_bounds_the_dialer(
    tmp_path, twilio_emulator
):
    twilio_emulator.dial_plan = DialPlan(
        app_base="http://127.0.0.1:9",
        public_base="https://voice.example.test",
        media_url="ws://127.0.0.1:9/twilio/media",
        default=Answer("busy", ring_s=0.4),
    )
    settings = make_settings(
        tmp_path,
        TWILIO_API_BASE_URL=twilio_emulator.url,
        CAMPAIGN_TICK_MS=20,
        CAMPAIGN_LEASE_S=0.3,
        MAX_CONCURRENT_CALLS=4,
        CAMPAIGN_INBOUND_RESERVE=2,
    )
    async with running_app(settings) as (app, http):
        agent = await create_agent(http, phone_number="+14155550100")
        body = {
            "name": "Capped",
            "agent_id": agent["id"],
            "max_concurrent_calls": 10,
            "calls_per_second": 50,
            "calling_window": {"days": [0, 1, 2, 3, 4, 5, 6], "start": "00:00", "end": "23:59"},
            "retry_policy": {"busy": {"max_attempts": 1, "delay_seconds": 0}},
        }
        campaign = (await http.post("/v1/campaigns", json=body)).json()
        csv_body = "phone,timezone\n" + "".join(f"+1415555{i:04d},Etc/GMT\n" for i in range(12))
        files = {"file": ("c.csv", csv_body.encode(), "text/csv")}
        await http.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files)
        await http.post(f"/v1/campaigns/{campaign['id']}/start")
        peak = 0
        async with asyncio.timeout(120):
            for _ in range(6000):
                peak = max(peak, app.state.admission.in_use())
                state = (await http.get(f"/v1/campaigns/{campaign['id']}")).json()
                if state["status"] == "completed":
                    break
                await asyncio.sleep(0.01)
    assert state["stats"]["contacts"] == {"busy": 12}
    assert peak == 2  # MAX_CONCURRENT_CALLS 4 less 2 kept for inbound, whatever the campaign allows
