"""`CallSession.end()`: a live call ended from outside the call (a shutdown drain, the API),
through the real server over real sockets, with the wire emulators."""

from __future__ import annotations

import asyncio

import pytest

from emulators.audio import synth_speech
from emulators.base import async_wait_until
from emulators.twilio_caller import CallerResult, Hangup, SayAfterAgentAudio, new_sid
from tests.harness import LiveStack

pytestmark = pytest.mark.slow

GOODBYE = "We are closing for the night. Goodbye!"


async def _end_call_once_greeted(
    stack: LiveStack, timeline: list, reason: str, goodbye: str | None
) -> tuple[str, CallerResult]:
    """An inbound call; once its greeting has played, `end(reason, goodbye)` from the
    server's loop, as another task of the app would."""
    assert stack.server is not None
    call_sid = new_sid("CA")
    call_id = await stack.answer_inbound(call_sid)
    caller = stack.caller(call_id, timeline, call_sid=call_sid, max_duration_s=35)
    calling = asyncio.create_task(caller.run())
    calls = stack.app.state.calls

    def greeted() -> bool:
        session = calls.active.get(call_id)
        spoken = len(stack.deepgram.speak_texts) >= 1  # the greeting's speech exists
        return session is not None and spoken and session.playout.speech is None

    async with asyncio.timeout(15):
        await async_wait_until(greeted)
    session = calls.active[call_id]
    ending = asyncio.run_coroutine_threadsafe(session.end(reason, goodbye), stack.server.loop)
    await asyncio.wrap_future(ending)
    assert call_id not in calls.active  # over by the time end() returns
    return call_id, await calling


def _hang_ups(stack: LiveStack, call_sid: str) -> list[dict]:
    return [
        r
        for r in stack.twilio.requests
        if r["path"].endswith(f"/Calls/{call_sid}.json") and ("Status", "completed") in r["form"]
    ]


async def test_end_with_a_goodbye_says_it_then_hangs_up_with_the_reason(tmp_path):
    with LiveStack(tmp_path) as stack:
        await stack.create_agent()
        call_id, result = await _end_call_once_greeted(stack, [Hangup(30.0)], "shutdown", GOODBYE)
        call = await stack.call_detail(call_id)
        spoken = stack.deepgram.speak_texts
        hang_ups = _hang_ups(stack, result.call_sid)

    assert call["ended_reason"] == "shutdown"
    assert result.ended_by == "server" and result.duration < 25
    assert spoken[-1] == GOODBYE
    assert call["turns"][-1]["text"] == GOODBYE  # played to the end, not cut
    assert len(hang_ups) == 1


async def test_end_without_a_goodbye_hangs_up_at_once(tmp_path):
    with LiveStack(tmp_path) as stack:
        await stack.create_agent()
        call_id, result = await _end_call_once_greeted(stack, [Hangup(30.0)], "api-ended", None)
        call = await stack.call_detail(call_id)
        spoken = stack.deepgram.speak_texts
        hang_ups = _hang_ups(stack, result.call_sid)

    assert call["ended_reason"] == "api-ended"
    assert result.ended_by == "server" and result.duration < 15
    assert GOODBYE not in spoken
    assert len(hang_ups) == 1


async def test_speech_over_the_goodbye_does_not_keep_the_call_open(tmp_path):
    """The caller talks over the goodbye (the greeting is talkspurt 1, the goodbye 2): the
    goodbye is cut to what was heard, and the call still ends with the reason given."""
    wait = synth_speech("Wait, actually I have a question about that")
    with LiveStack(tmp_path, deepgram={"listen_script": ["Wait, I have a question."]}) as stack:
        await stack.create_agent()
        timeline = [SayAfterAgentAudio(2, 0.5, wait), Hangup(30.0)]
        call_id, result = await _end_call_once_greeted(stack, timeline, "shutdown", GOODBYE)
        call = await stack.call_detail(call_id)

    assert call["ended_reason"] == "shutdown"
    assert result.ended_by == "server" and result.duration < 25
    goodbye = call["turns"][-1] if call["turns"][-1]["role"] == "assistant" else None
    assert goodbye is not None and goodbye["interrupted"] is True
    assert GOODBYE.startswith(goodbye["text"]) and goodbye["text"] != GOODBYE
