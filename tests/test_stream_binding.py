"""Stream hijack attempts through the real server over real sockets. Every attacker holds a
valid upgrade signature (it is the same for every stream) and a well-formed `start`; each is
closed with 1008 before anything is read, written or sent, and the victim call's row, turns
and Twilio state stay as they were."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from emulators.base import async_wait_until
from emulators.twilio_caller import CallerResult, Hangup, new_sid
from tests.conftest import post_signed
from tests.harness import AGENT_NUMBER, CALLER_NUMBER, LiveStack

pytestmark = pytest.mark.slow


def _row(tmp_path: Path, call_id: str) -> tuple[Any, ...]:
    with sqlite3.connect(tmp_path / "test.db") as db:
        row = db.execute(
            "SELECT stream_sid, twilio_call_sid, status, ended_reason FROM calls WHERE id = ?",
            (call_id,),
        ).fetchone()
        turns = db.execute("SELECT count(*) FROM transcript_turns WHERE call_id = ?", (call_id,))
        return (*row, turns.fetchone()[0])


async def _attack(stack: LiveStack, parameters: dict[str, str], call_sid: str) -> CallerResult:
    caller = stack.caller("unused", [Hangup(4.0)], call_sid=call_sid, max_duration_s=6)
    caller.custom_parameters = parameters
    return await caller.run()


async def test_hijack_attempts_are_refused_and_change_nothing(
    tmp_path: Path, embedding_model: None
) -> None:
    with LiveStack(tmp_path) as stack:
        await stack.create_agent(first_message="Hi, this is Acme. How can I help?")
        victim_sid, attacker_sid = new_sid("CA"), new_sid("CA")
        victim_id = await stack.answer_inbound(victim_sid)
        attacker_id = await stack.answer_inbound(attacker_sid)  # the attacker's own call
        victim = stack.stream_parameters[victim_id]
        own = stack.stream_parameters[attacker_id]
        victim_call = asyncio.create_task(
            stack.caller(victim_id, [Hangup(14.0)], call_sid=victim_sid).run()
        )
        await async_wait_until(lambda: _row(tmp_path, victim_id)[0] is not None)
        before = _row(tmp_path, victim_id)

        attempts = {
            # a replayed upgrade whose start names another call, with the attacker's token
            "other call's id": ({**own, "call_id": victim_id}, attacker_sid),
            # the victim's token, but a CallSid of the attacker's choosing
            "foreign CallSid": (victim, attacker_sid),
            # no token at all (a stream as the service used to accept)
            "no token": ({"call_id": victim_id}, victim_sid),
            # an exact replay of the victim's start while the victim is live
            "second stream": (victim, victim_sid),
        }
        live = {
            name: await _attack(stack, parameters, sid)
            for name, (parameters, sid) in attempts.items()
        }
        during = _row(tmp_path, victim_id)
        result = await victim_call
        await stack.call_detail(victim_id)
        finished = _row(tmp_path, victim_id)
        # the finished call's exact start, replayed
        after = await _attack(stack, victim, victim_sid)
        async with stack.api() as http:
            replayed = await post_signed(
                http,
                "/twilio/voice",
                {"CallSid": victim_sid, "From": CALLER_NUMBER, "To": AGENT_NUMBER},
            )
            calls = (await http.get("/v1/calls")).json()["total"]
        updates = stack.twilio.call_updates

    for name, attack in {**live, "finished call": after}.items():
        assert attack.close_code == 1008, (name, attack)
        assert attack.media == [] and attack.bytes_received == 0, name
    assert during == before  # same stream, same twilio SID, same turns, still live
    assert before[0] is not None and before[1] == victim_sid and before[2] == "in-progress"
    assert result.ended_by == "hangup" and result.talkspurts  # the victim heard the greeting
    assert finished[3] == "customer-ended-call" and _row(tmp_path, victim_id) == finished
    assert updates == []  # no hang-up or redirect was sent for any call
    # a replayed voice webhook for the finished call: the same row, no second stream
    assert "<Hangup />" in replayed.text and "<Stream" not in replayed.text
    assert calls == 2
    assert _row(tmp_path, attacker_id)[0] is None  # the attacker's own call never streamed


async def test_an_expired_token_is_refused(tmp_path: Path, embedding_model: None) -> None:
    with LiveStack(tmp_path, STREAM_TOKEN_TTL_S=1.0) as stack:
        await stack.create_agent()
        call_sid = new_sid("CA")
        call_id = await stack.answer_inbound(call_sid)
        await asyncio.sleep(2.2)  # the expiry is in whole seconds
        late = await _attack(stack, stack.stream_parameters[call_id], call_sid)
        row = _row(tmp_path, call_id)
    assert late.close_code == 1008 and late.bytes_received == 0
    assert row[0] is None and row[2] == "ringing"
