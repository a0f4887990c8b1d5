"""Inbound voice webhook, outbound calls through the real twilio SDK against the Twilio REST
emulator, and status callbacks moving the lifecycle forward only."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ACCOUNT_SID, create_agent, make_settings, post_signed, running_app

AGENT_NUMBER = "+14155550100"


def _inbound(call_sid: str, to: str = AGENT_NUMBER) -> dict[str, str]:
    return {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+14155550199",
        "To": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def test_inbound_call_answers_with_a_stream_and_call_id_parameter(client):
    agent = await create_agent(client, phone_number=AGENT_NUMBER)
    response = await post_signed(client, "/twilio/voice", _inbound("CA" + "1" * 32))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    twiml = response.text
    assert '<Stream url="wss://voice.example.test/twilio/media">' in twiml
    assert "<Connect>" in twiml and "?" not in re.search(r'url="([^"]+)"', twiml).group(1)
    call_id = re.search(r'<Parameter name="call_id" value="([^"]+)"', twiml).group(1)
    call = (await client.get(f"/v1/calls/{call_id}")).json()
    assert call["agent_id"] == agent["id"]
    assert (call["direction"], call["status"], call["from"]) == (
        "inbound",
        "ringing",
        "+14155550199",
    )

    again = await post_signed(client, "/twilio/voice", _inbound("CA" + "1" * 32))
    assert call_id in again.text  # Twilio's retry reuses the call
    assert (await client.get("/v1/calls")).json()["total"] == 1


async def test_unknown_number_gets_a_polite_hangup_and_the_reason_is_recorded(client):
    response = await post_signed(client, "/twilio/voice", _inbound("CA" + "2" * 32, "+14155550000"))
    assert "<Say>" in response.text and "<Hangup />" in response.text
    (call,) = (await client.get("/v1/calls")).json()["items"]
    assert call["status"] == "failed"
    assert "no agent" in call["error_message"]


async def test_forged_or_missing_signature_is_403_and_changes_nothing(client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    forged = await post_signed(client, "/twilio/voice", _inbound("CA" + "3" * 32), token_ok=False)
    assert forged.status_code == 403
    missing = await client.post("/twilio/voice", data=_inbound("CA" + "3" * 32))
    assert missing.status_code == 403
    status = await client.post("/twilio/status", data={"CallSid": "CA1", "CallStatus": "completed"})
    assert status.status_code == 403
    assert (await client.get("/v1/calls")).json()["total"] == 0


async def test_status_callbacks_only_move_forward(client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    sid = "CA" + "4" * 32
    twiml = (await post_signed(client, "/twilio/voice", _inbound(sid))).text
    call_id = re.search(r'value="(call_[^"]+)"', twiml).group(1)

    async def status(value: str, **extra: str) -> str:
        params = {"CallSid": sid, "AccountSid": ACCOUNT_SID, "CallStatus": value, **extra}
        assert (await post_signed(client, "/twilio/status", params)).status_code == 204
        return (await client.get(f"/v1/calls/{call_id}")).json()["status"]

    assert await status("in-progress") == "in-progress"
    assert await status("ringing") == "in-progress"  # out of order: ignored
    assert await status("in-progress") == "in-progress"  # duplicate: ignored
    assert await status("completed", CallDuration="42") == "completed"
    assert await status("in-progress") == "completed"
    call = (await client.get(f"/v1/calls/{call_id}")).json()
    assert call["duration_seconds"] == 42
    assert call["ended_at"] is not None


@pytest.fixture
async def dial_client(tmp_path, twilio_emulator):
    settings = make_settings(tmp_path, TWILIO_API_BASE_URL=twilio_emulator.url)
    async with running_app(settings) as (_, http):
        yield http


async def test_outbound_call_dials_through_twilio(dial_client, twilio_emulator):
    agent = await create_agent(dial_client, phone_number=AGENT_NUMBER, variables={"name": "Ann"})
    response = await dial_client.post(
        "/v1/calls",
        json={"agent_id": agent["id"], "to": "+14155550123", "variables": {"name": "Bob"}},
    )
    assert response.status_code == 201, response.text
    call = response.json()
    assert call["twilio_call_sid"].startswith("CA") and call["status"] == "queued"
    assert call["variables"] == {"name": "Bob"}
    (sent,) = twilio_emulator.calls
    form = sent["params"]
    assert (form["To"], form["From"]) == ("+14155550123", AGENT_NUMBER)
    assert f'value="{call["id"]}"' in form["Twiml"]
    assert form["StatusCallback"] == "https://voice.example.test/twilio/status"
    assert sent["status_callback_event"] == ["initiated", "ringing", "answered", "completed"]


async def test_twilio_error_is_a_502_with_its_code_and_the_call_is_marked_failed(
    dial_client, twilio_emulator
):
    agent = await create_agent(dial_client, phone_number=AGENT_NUMBER)
    twilio_emulator.fail_next(status=400, code=21215, message="Geo permission not enabled")
    response = await dial_client.post(
        "/v1/calls", json={"agent_id": agent["id"], "to": "+14155550123"}
    )
    assert response.status_code == 502
    error = response.json()["error"]
    assert "21215" in error["message"] and "Geo permission" in error["message"]
    (call,) = (await dial_client.get("/v1/calls")).json()["items"]
    assert (call["status"], call["ended_reason"], call["twilio_call_sid"]) == (
        "failed",
        "failed",
        None,
    )


async def test_outbound_bad_input(dial_client):
    agent = await create_agent(dial_client)  # no phone number
    cases = [
        ({"agent_id": agent["id"], "to": "555-0123"}, 422, "to"),
        ({"agent_id": agent["id"], "to": "+14155550123"}, 422, "from"),
        ({"agent_id": "agt_missing", "to": "+14155550123"}, 404, "agent_id"),
        ({"agent_id": agent["id"], "to": "+14155550123", "from": "+1"}, 422, "from"),
        ({"to": "+14155550123"}, 422, "agent_id"),
    ]
    for body, status, field in cases:
        response = await dial_client.post("/v1/calls", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["field"] == field


async def test_calls_are_filtered_and_paginated(client):
    agent = await create_agent(client, phone_number=AGENT_NUMBER)
    for i in range(3):
        await post_signed(client, "/twilio/voice", _inbound(f"CA{i:032d}"))
    await post_signed(client, "/twilio/voice", _inbound("CA" + "9" * 32, "+14155559999"))
    page = (await client.get("/v1/calls", params={"agent_id": agent["id"], "limit": 2})).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    failed = (await client.get("/v1/calls", params={"status": "failed"})).json()
    assert failed["total"] == 1
    assert (await client.get("/v1/calls", params={"direction": "sideways"})).status_code == 422
    assert (await client.get("/v1/calls/call_nope")).status_code == 404
