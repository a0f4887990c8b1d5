"""Single outbound calls through the real server, the Twilio emulator's dial plan and real
sockets: waiting for a human, answering-machine detection and the transcript fallback,
voicemail drop, fax, the disclosure line, `Idempotency-Key` and `metadata` on
`POST /v1/calls`, and `POST /v1/calls/{id}/end`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from emulators.audio import synth_speech
from emulators.base import async_wait_until
from emulators.twilio_caller import Hangup, Say
from emulators.twilio_dialplan import Answer
from tests.harness import LiveStack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CALLEE = "+14155550177"


async def _dial(stack: LiveStack, agent: dict[str, Any], **extra: Any) -> dict[str, Any]:
    async with stack.api() as http:
        response = await http.post(
            "/v1/calls", json={"agent_id": agent["id"], "to": CALLEE, **extra}
        )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_machine_by_transcript_gets_the_message_and_no_pitch(tmp_path):
    greeting = "Hi, you have reached Sam. Please leave a message after the tone."
    with LiveStack(tmp_path, deepgram={"listen_script": [greeting]}) as stack:
        plan = stack.dial_plan()
        # AMD far too late to matter: the words give the machine away
        plan.script(
            CALLEE,
            Answer("machine", [Say(0.3, synth_speech(greeting)), Hangup(20)], amd_after_s=30),
        )
        agent = await stack.create_agent(
            first_message="Hi {{name}}, I'm calling about your demo.",
            voicemail={"action": "leave_message", "message": "Hi {{name}}, please call Acme back."},
        )
        body = {"variables": {"name": "Sam"}, "metadata": {"crm_id": "42"}}
        async with stack.api() as http:
            headers = {"Idempotency-Key": "dial-1"}
            payload = {"agent_id": agent["id"], "to": CALLEE, **body}
            first = (await http.post("/v1/calls", json=payload, headers=headers)).json()
            again = await http.post("/v1/calls", json=payload, headers=headers)
            other = await http.post(
                "/v1/calls", json={**payload, "metadata": {"crm_id": "43"}}, headers=headers
            )
        assert again.status_code == 201 and again.json()["id"] == first["id"]
        assert other.status_code == 409
        assert len(stack.twilio.calls) == 1  # one dial for the three requests
        params = stack.twilio.calls[0]["params"]
        assert params["MachineDetection"] == "DetectMessageEnd" and params["AsyncAmd"] == "true"
        assert params["AsyncAmdStatusCallback"].endswith("/twilio/amd")
        call = await stack.call_detail(first["id"])
    assert call["ended_reason"] == "voicemail"
    assert call["metadata"] == {"crm_id": "42"}
    said = [t["text"] for t in call["turns"] if t["role"] == "assistant"]
    assert said == ["Hi Sam, please call Acme back."]  # the message, never the pitch


async def test_human_by_amd_hears_disclosure_then_greeting_and_end_route(tmp_path):
    with LiveStack(tmp_path) as stack:
        plan = stack.dial_plan()
        plan.script(CALLEE, Answer("human", [Hangup(25)], amd_after_s=0.5))
        agent = await stack.create_agent(
            first_message="Hi, this is Acme with a long story about our product and its many "
            "features, which I will now tell you in considerable detail, one by one.",
            disclosure="This call is recorded.",
        )
        created = await _dial(stack, agent)
        await async_wait_until(lambda: stack.active_calls() == 1)
        await asyncio.sleep(2.0)  # AMD said human at 0.5 s: the greeting is playing
        async with stack.api() as http:
            ended = await http.post(f"/v1/calls/{created['id']}/end")
            assert ended.status_code == 202, ended.text
        call = await stack.call_detail(created["id"])
        async with stack.api() as http:
            late = await http.post(f"/v1/calls/{created['id']}/end")
    assert late.status_code == 409
    assert call["ended_reason"] == "api-ended-call" and call["answered_by"] == "human"
    said = [t["text"] for t in call["turns"] if t["role"] == "assistant"]
    assert said[0].startswith("This call is recorded.")
    assert said[-1] == "Sorry, I have to go now. Thanks for your time, goodbye."


async def test_fax_hangs_up(tmp_path):
    with LiveStack(tmp_path) as stack:
        plan = stack.dial_plan()
        plan.script(CALLEE, Answer("fax", [Hangup(20)], amd_after_s=0.5))
        agent = await stack.create_agent()
        created = await _dial(stack, agent)
        call = await stack.call_detail(created["id"])
    assert call["ended_reason"] == "fax" and call["answered_by"] == "fax"
    assert [t for t in call["turns"] if t["role"] == "assistant"] == []
