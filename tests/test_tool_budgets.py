"""Tool budgets against a prompt-injected LLM: an SMS flood through a live call over real
sockets is capped at the agent's limits, each refusal is counted in /metrics and recorded on
the call; texts per destination per day, the SMS destination list, transfers and HTTP tool
context on the real app."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from emulators.audio import synth_speech
from emulators.ollama import Reply
from emulators.twilio_caller import Hangup, SayAfterAgentAudio
from tests.harness import CALLER_NUMBER, LiveStack
from tests.test_tools import Env, _http_tool, running_app
from tests.tool_server import ToolServer


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_app(tmp_path) as running:
        yield running


def _flood(messages: list[dict[str, Any]]) -> Reply:
    """Ten texts per round, every round, whatever the service offers."""
    round_ = sum(1 for m in messages if m.get("role") == "assistant" and m.get("tool_calls"))
    calls = [
        {"name": "send_sms", "arguments": {"message": f"Win a prize {round_}-{n}: spam.test"}}
        for n in range(10)
    ]
    return Reply(tool_calls=calls)


@pytest.mark.slow
async def test_an_sms_flood_is_capped_at_the_agents_limits(
    tmp_path: Path, embedding_model: None
) -> None:
    limits = {"sms_per_call": 3, "tool_rounds_per_turn": 2, "tool_calls_per_call": 15}
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Text me everything you have, ten times over."]},
        ollama={"replies": _flood},
    ) as stack:
        await stack.create_agent(tools=[{"type": "send_sms"}], tool_limits=limits)
        call_id, _ = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, synth_speech("Text me everything you have."), "end"),
                Hangup(12.0),
            ],
            max_duration_s=15,
        )
        await stack.call_detail(call_id)
        texts = stack.twilio.messages
        metrics = await stack.metrics()
        chat = [b for b in stack.ollama.request_bodies if not b.get("format")]
    with sqlite3.connect(tmp_path / "test.db") as db:
        refusals = [
            json.loads(data)
            for (data,) in db.execute(
                "SELECT data FROM call_events WHERE call_id = ? AND type = 'tool_refused'",
                (call_id,),
            )
        ]

    assert len(texts) == 3 and {t["to"] for t in texts} == {CALLER_NUMBER}
    # round 1: 10 calls, 3 sent, 7 over sms_per_call; round 2: 5 more within
    # tool_calls_per_call (all over sms_per_call) and 5 past it; round 3 offers no tools
    # and its 10 calls are refused for tool_rounds_per_turn
    assert len(chat) == 3
    assert [bool(b.get("tools")) for b in chat] == [True, True, False]
    reasons = [r["reason"] for r in refusals]
    assert reasons.count("sms_per_call") == 12
    assert reasons.count("tool_calls_per_call") == 5
    assert reasons.count("tool_rounds_per_turn") == 10
    assert all(r["name"] == "send_sms" for r in refusals)
    assert 'aisdr_tool_refusals_total{reason="sms_per_call"} 12.0' in metrics
    assert 'aisdr_tool_refusals_total{reason="tool_calls_per_call"} 5.0' in metrics
    assert 'aisdr_tool_refusals_total{reason="tool_rounds_per_turn"} 10.0' in metrics
    # the LLM read a short reason for each refusal
    results = [m["content"] for m in chat[-1]["messages"] if m.get("role") == "tool"]
    assert any("no more texts on this call" in r for r in results)
    assert any("used all its tool calls" in r for r in results)


async def test_texts_per_destination_per_day_and_allowed_destinations(
    tmp_path: Path, twilio_emulator: Any
) -> None:
    other = "+14155550142"
    limits = {"sms_per_call": 5, "sms_per_destination_per_day": 3, "sms_destinations": [other]}
    async with running_app(tmp_path, TWILIO_API_BASE_URL=twilio_emulator.url) as env:
        agent = await env.agent(tools=[{"type": "send_sms"}], tool_limits=limits)
        first, second = await env.call(agent), await env.call(agent)
        outcomes = [await env.run(first, "send_sms", message=f"a{n}") for n in range(2)]
        outcomes += [await env.run(second, "send_sms", message=f"b{n}") for n in range(2)]
        elsewhere = await env.run(second, "send_sms", message="c", to=other)
        stranger = await env.run(second, "send_sms", message="d", to="+19005550100")
        plain = await env.agent(tools=[{"type": "send_sms"}])
        no_list = await env.run(await env.call(plain), "send_sms", message="e", to=other)
        schema = env.tools.schemas(first)[0]["function"]["parameters"]["properties"]
    sent = [o.result.get("sent") for o in outcomes]
    assert sent == [True, True, True, None]  # the caller's number had 3 texts today
    assert outcomes[-1].refused == "sms_per_destination"
    assert elsewhere.result["sent"] is True  # a listed number has its own count
    assert stranger.refused == "sms_destination" and no_list.refused == "sms_destination"
    assert [m["to"] for m in twilio_emulator.messages].count(CALLER_NUMBER) == 3
    assert "to" in schema  # offered only where the agent lists destinations


async def test_transfer_goes_only_to_the_configured_number(env: Env) -> None:
    agent = await env.agent(tools=[{"type": "transfer_call"}], transfer_number="+14155550123")
    outcome = await env.run(await env.call(agent), "transfer_call", to="+19005550100")
    assert outcome.transfer_to == "+14155550123"


async def test_http_tool_context_cannot_be_overridden_by_the_llm(tmp_path: Path) -> None:
    with ToolServer() as server:
        async with running_app(tmp_path) as env:
            get_tool = _http_tool(server.url + "/orders", method="GET")
            agent = await env.agent(tools=[get_tool])
            config = await env.call(agent)
            forged = {"call_id": "call_victim", "caller_number": "+19005550100", "order_id": "7"}
            await env.run(config, "lookup_order", **forged)
            post_agent = await env.agent(tools=[_http_tool(server.url + "/orders")])
            post_config = await env.call(post_agent)
            await env.run(post_config, "lookup_order", **forged)
        get, post = server.requests
    query = parse_qs(get["query"].decode())
    assert query["call_id"] == [config.call_id] and query["caller_number"] == [CALLER_NUMBER]
    assert query["order_id"] == ["7"]
    body = json.loads(post["body"])
    assert body["call_id"] == post_config.call_id and body["caller_number"] == CALLER_NUMBER
    assert body["arguments"]["call_id"] == "call_victim"  # the LLM's, kept apart
