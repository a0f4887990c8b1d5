"""The browser test call at the wire, through the real server over a real socket: the
console page's side is `tests/browser_page.py` (plays what it receives against its own
clock, echoes marks once played, honours `clear`).

What the service stores of an interrupted answer is judged from the page's marks as from
Twilio's: the chunks whose marks came back, plus the played share of the next one. And the
socket refuses anyone without a console session, or a page from another origin.
"""

from __future__ import annotations

from typing import Any

import pytest
from itsdangerous import URLSafeTimedSerializer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from api.console_session import SESSION_COOKIE, key_id, session_cookie_value
from emulators.audio import synth_speech
from emulators.twilio_caller import HangupAfterAgentAudio, SayAfterAgentAudio
from tests.browser_page import BrowserPage
from tests.conftest import API_KEY
from tests.harness import LiveStack

TTS_S_PER_CHAR = 0.065  # the Deepgram emulator's default voice
FIRST_SENTENCE = "Our pricing has three plans."
LONG_REPLY = (
    f"{FIRST_SENTENCE} The starter plan is nineteen dollars a month for one user, and the pro "
    "plan is forty nine dollars a month and adds call recording and CRM sync. "
    "The enterprise plan is custom priced and includes a dedicated success manager."
)


@pytest.fixture(scope="module")
def lines() -> dict[str, bytes]:
    return {
        "more": synth_speech("Tell me more please"),
        "wait": synth_speech("Wait, actually I have a question about that"),
    }


def _page_headers(stack: LiveStack, cookie: str | None, origin: str | None) -> dict[str, str]:
    headers = {}
    if cookie is not None:
        headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
    if origin is not None:
        headers["Origin"] = origin
    return headers


def _signed_in(stack: LiveStack) -> str:
    assert stack.settings is not None
    return session_cookie_value(stack.settings, key_id(stack.settings, API_KEY))


def _talk_url(stack: LiveStack, agent_id: str) -> str:
    assert stack.server is not None
    return f"{stack.server.ws_url}/console/agents/{agent_id}/talk/ws"


async def test_a_browser_call_keeps_what_the_page_played_judged_by_its_marks(tmp_path, lines):
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Tell me about pricing.", "Wait, I have a question."]},
        ollama={"replies": [LONG_REPLY, "Sure, what is your question?"]},
    ) as stack:
        agent = await stack.create_agent()
        assert stack.server is not None
        page = BrowserPage(
            _talk_url(stack, agent["id"]),
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                # 3 s into the answer: its first sentence (1.8 s) has played, and its mark
                # come back; the second is being heard
                SayAfterAgentAudio(2, 3.0, lines["wait"]),
                HangupAfterAgentAudio(3, 0.5, anchor="end"),
            ],
            headers=_page_headers(stack, _signed_in(stack), stack.server.url),
        )
        result = await page.run()
        assert result.call_id is not None and result.ended_by == "hangup"
        call = await stack.call_detail(result.call_id)

    assert call["direction"] == "web" and call["from"] == "browser"
    answers = [t for t in call["turns"] if t["role"] == "assistant"]
    interrupted = answers[1]
    assert interrupted["interrupted"] is True
    heard = interrupted["text"]
    # the first sentence's mark came back before the barge-in: without it, the service
    # could not credit more than that sentence
    answer = result.talkspurts[1]
    played_in_answer = [
        m for m in result.marks if m.received >= answer.start and m.echoed and not m.cleared
    ]
    assert played_in_answer and played_in_answer[0].echoed < result.clears[0], result.marks
    assert heard.startswith(FIRST_SENTENCE) and len(heard) > len(FIRST_SENTENCE) + 10
    assert LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY)
    # ... and the played share of the next sentence: what the page played, in characters
    spoken = answer.bytes / 8000 / TTS_S_PER_CHAR
    assert abs(len(heard) - spoken) < 15, (heard, spoken)
    assert result.clears and result.bytes_discarded > 0
    roles = [(t["role"], t["text"]) for t in call["turns"]]
    assert roles[-2:] == [
        ("user", "Wait, I have a question."),
        ("assistant", "Sure, what is your question?"),
    ]


async def _refusal(url: str, headers: dict[str, str]) -> tuple[int | None, str]:
    async with connect(url, additional_headers=headers) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
        return ws.close_code, ws.close_reason or ""


async def test_the_browser_call_socket_refuses_without_a_session_or_from_another_origin(
    tmp_path,
):
    with LiveStack(tmp_path) as stack:
        agent = await stack.create_agent()
        assert stack.server is not None and stack.settings is not None
        url, own = _talk_url(stack, agent["id"]), stack.server.url
        other_secret = URLSafeTimedSerializer(
            "another-secret", salt="ai-sdr-console-session"
        ).dumps({"k": key_id(stack.settings, API_KEY), "c": "token"})
        refused: list[tuple[Any, ...]] = []
        for cookie, origin in [
            (None, own),  # no session
            (other_secret, own),  # a cookie signed with another secret
            (_signed_in(stack), "http://evil.example"),  # a page of another origin
            (_signed_in(stack), None),  # no Origin at all: not a page of ours
        ]:
            refused.append(await _refusal(url, _page_headers(stack, cookie, origin)))
        unknown = await _refusal(
            _talk_url(stack, "agt_missing"), _page_headers(stack, _signed_in(stack), own)
        )
        async with stack.api() as http:
            listed = (await http.get("/v1/calls")).json()

    assert refused == [(1008, "sign in to the console first")] * 4
    assert unknown == (1008, "no such agent")
    assert listed["total"] == 0  # nothing admitted, nothing stored
