"""Agent tools. First the runner on the real app (real SQLite, a real local tool server, the
Twilio REST emulator), then whole calls through the live stack where the Ollama emulator
asks for the tools and the caller hears the results."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import icalendar
import pytest
from sqlalchemy import func, select

from emulators.audio import synth_speech
from emulators.ollama import Reply
from emulators.twilio_caller import Hangup, HangupAfterAgentAudio, Say, SayAfterAgentAudio
from models import Booking, Call, ToolInvocation
from pipeline.contracts import AgentConfig, ToolContext, ToolOutcome
from pipeline.providers import ToolCall
from tests.conftest import create_agent, make_settings
from tests.conftest import running_app as app_with_client
from tests.harness import AGENT_NUMBER, CALLER_NUMBER, LiveStack
from tests.tool_server import ToolServer

SECRET = "dev-webhook-secret"  # make_settings leaves the development default
EVERY_DAY = [0, 1, 2, 3, 4, 5, 6]
CALENDAR = {
    "timezone": "UTC",
    "working_days": EVERY_DAY,
    "working_hours_start": "08:00",
    "working_hours_end": "18:00",
    "slot_minutes": 30,
    "buffer_minutes": 10,
    "booking_horizon_days": 14,
}


def _day(offset: int) -> date:
    return datetime.now(UTC).date() + timedelta(days=offset)


def _at(day: date, hhmm: str) -> str:
    return f"{day.isoformat()}T{hhmm}"


# --- the runner on the real app ---------------------------------------------------------


class Env:
    def __init__(self, app: Any, http: httpx.AsyncClient) -> None:
        self.app, self.http = app, http

    @property
    def tools(self) -> Any:
        return self.app.state.calls.deps.tools

    async def agent(self, **fields: Any) -> dict[str, Any]:
        return await create_agent(self.http, **fields)

    async def call(self, agent: dict[str, Any], caller: str = CALLER_NUMBER) -> AgentConfig:
        async with self.app.state.db.sessionmaker() as session, session.begin():
            call = Call(
                agent_id=agent["id"],
                direction="inbound",
                from_number=caller,
                to_number=AGENT_NUMBER,
                status="in-progress",
            )
            session.add(call)
        config = await self.app.state.calls.deps.store.load_config(call.id)
        assert config is not None
        return config

    async def run(self, config: AgentConfig, tool: str, /, **arguments: Any) -> ToolOutcome:
        """As the pipeline calls it: the key is call + tool + arguments."""
        key = f"{config.call_id}:{tool}:{json.dumps(arguments, sort_keys=True, default=str)}"
        ctx = ToolContext(config, "CA" + "0" * 32, key)
        return await self.tools.run(ToolCall(tool, arguments), ctx)

    async def count(self, model: Any, *where: Any) -> int:
        async with self.app.state.db.sessionmaker() as session:
            return int(await session.scalar(select(func.count()).select_from(model).where(*where)))


@asynccontextmanager
async def running_app(tmp_path: Path, **overrides: Any) -> AsyncIterator[Env]:
    async with app_with_client(make_settings(tmp_path, **overrides)) as (app, http):
        yield Env(app, http)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_app(tmp_path) as running:
        yield running


def _http_tool(url: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "name": "lookup_order",
        "description": "Look up an order's delivery status",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
        "url": url,
        **fields,
    }


def _verify_signature(header: str, signed: bytes) -> None:
    """The receiver's side, written independently of the service's signer."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(
        SECRET.encode(), parts["t"].encode() + b"." + signed, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    assert abs(int(parts["t"]) - datetime.now(UTC).timestamp()) < 60


async def test_schemas_follow_the_agents_tools(env: Env) -> None:
    agent = await env.agent(
        tools=[
            {"type": "book_meeting", "filler_phrase": "Let me look at the calendar."},
            {"type": "send_sms"},
            {"type": "end_call", "description": "Hang up politely."},
            _http_tool("https://tools.example.test/orders", filler_phrase="Checking."),
        ]
    )
    config = await env.call(agent)
    schemas = {s["function"]["name"]: s for s in env.tools.schemas(config)}
    assert set(schemas) == {
        "check_availability",
        "book_meeting",
        "send_sms",
        "end_call",
        "lookup_order",
    }
    for schema in schemas.values():
        assert schema["type"] == "function"
        assert schema["function"]["parameters"]["type"] == "object"
    assert schemas["book_meeting"]["function"]["parameters"]["required"] == ["start_time"]
    assert schemas["end_call"]["function"]["description"] == "Hang up politely."
    assert env.tools.filler_for(config, "check_availability") == "Let me look at the calendar."
    assert env.tools.filler_for(config, "lookup_order") == "Checking."
    assert env.tools.filler_for(config, "send_sms") is None
    unknown = await env.run(config, "transfer_call")
    assert "no tool named" in unknown.result["error"] and unknown.action is None


async def test_check_availability_offers_free_times_within_working_hours(env: Env) -> None:
    agent = await env.agent(tools=[{"type": "book_meeting"}], calendar=CALENDAR)
    config = await env.call(agent)
    target = _day(2)
    outcome = await env.run(config, "check_availability", date=target.isoformat())
    result = outcome.result
    assert result["today"].endswith(_day(0).isoformat()) and result["timezone"] == "UTC"
    starts = [slot["start"] for slot in result["free_slots"]]
    assert 1 < len(starts) <= 6
    assert starts[0] == _at(target, "08:00") and starts[-1] == _at(target, "17:30")
    assert all(s.startswith(target.isoformat()) for s in starts)
    assert result["free_slots"][0]["spoken"].endswith("at 8 AM")

    upcoming = (await env.run(config, "check_availability")).result["free_slots"]
    assert len({slot["start"][:10] for slot in upcoming}) == 3
    weekday = (await env.run(config, "check_availability", date="tomorrow")).result
    assert weekday["free_slots"][0]["start"].startswith(_day(1).isoformat())
    bad = await env.run(config, "check_availability", date="someday soon")
    assert "could not read the day" in bad.result["error"]


async def test_a_slot_is_booked_once_whatever_the_repeats(env: Env) -> None:
    agent = await env.agent(tools=[{"type": "book_meeting"}], calendar=CALENDAR)
    config, other = await env.call(agent), await env.call(agent, caller="+14155550142")
    target = _day(3)
    args = {"start_time": _at(target, "10:00"), "name": "Dana", "email": "dana@example.test"}

    first = await env.run(config, "book_meeting", **args)
    assert first.result["booked"] is True
    assert first.result["start"] == _at(target, "10:00")
    assert first.result["confirmation"].startswith("You're booked for")
    assert (await env.run(config, "book_meeting", **args)).result == first.result  # LLM repeat
    reworded = await env.run(config, "book_meeting", start_time=_at(target, "10:00"), name="D")
    assert reworded.result["booking_id"] == first.result["booking_id"]
    assert "already booked" in reworded.result["confirmation"]

    taken = await env.run(other, "book_meeting", start_time=_at(target, "10:00"))
    assert taken.result["error"] == "that time is already taken"
    offered = [slot["start"] for slot in taken.result["free_slots"]]
    assert offered and _at(target, "10:00") not in offered
    adjacent = await env.run(other, "book_meeting", start_time=_at(target, "10:30"))
    assert adjacent.result["error"] == "that time is already taken"  # inside the buffer
    later = await env.run(other, "book_meeting", start_time=_at(target, "11:00"))
    assert later.result["booked"] is True

    assert await env.count(Booking) == 2
    async with env.app.state.db.sessionmaker() as session:
        booking = await session.get(Booking, first.result["booking_id"])
    assert booking is not None
    assert (booking.attendee_name, booking.attendee_phone) == ("Dana", CALLER_NUMBER)
    assert booking.end_at - booking.start_at == timedelta(minutes=30)
    assert await env.count(ToolInvocation, ToolInvocation.status == "done") == 3
    assert await env.count(ToolInvocation, ToolInvocation.status == "failed") == 2


async def test_booking_rules_are_explained_to_the_llm(env: Env) -> None:
    calendar = {**CALENDAR, "working_days": [d for d in EVERY_DAY if d != _day(4).weekday()]}
    agent = await env.agent(tools=[{"type": "book_meeting"}], calendar=calendar)
    config = await env.call(agent)
    cases = {
        _at(_day(-1), "10:00"): "already passed",
        _at(_day(30), "10:00"): "14 days ahead",
        _at(_day(4), "10:00"): "not a working day",
        _at(_day(2), "07:30"): "outside working hours",
        _at(_day(2), "17:45"): "outside working hours",
        "next week sometime": "could not read the time",
    }
    for start, reason in cases.items():
        outcome = await env.run(config, "book_meeting", start_time=start)
        assert reason in outcome.result["error"], (start, outcome.result)
    missing = await env.run(config, "book_meeting", name="Dana")
    assert "start_time is required" in missing.result["error"]
    assert await env.count(Booking) == 0


async def test_two_calls_racing_for_one_slot_book_it_once(env: Env) -> None:
    agent = await env.agent(tools=[{"type": "book_meeting"}], calendar=CALENDAR)
    calls = [await env.call(agent, caller=f"+1415555017{i}") for i in range(4)]
    start = _at(_day(2), "14:00")
    outcomes = await asyncio.gather(
        *(env.run(config, "book_meeting", start_time=start) for config in calls)
    )
    assert sum(1 for o in outcomes if o.result.get("booked")) == 1
    assert await env.count(Booking) == 1


async def test_bookings_api_lists_and_exports_ics(env: Env) -> None:
    agent = await env.agent(tools=[{"type": "book_meeting"}], calendar=CALENDAR)
    config = await env.call(agent)
    booked = await env.run(
        config,
        "book_meeting",
        start_time=_at(_day(2), "09:00"),
        name="Dana",
        notes="Demo of the dialer",
    )
    booking_id = booked.result["booking_id"]

    listed = (await env.http.get("/v1/bookings", params={"agent_id": agent["id"]})).json()
    assert [b["id"] for b in listed["items"]] == [booking_id] and listed["total"] == 1
    assert listed["items"][0]["call_id"] == config.call_id
    by_call = await env.http.get("/v1/bookings", params={"call_id": "call_nope"})
    assert by_call.json()["total"] == 0
    assert (await env.http.get(f"/v1/bookings/{booking_id}")).json()["attendee_name"] == "Dana"

    response = await env.http.get(f"/v1/bookings/{booking_id}.ics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/calendar")
    assert f'filename="{booking_id}.ics"' in response.headers["content-disposition"]
    (event,) = icalendar.Calendar.from_ical(response.content).walk("VEVENT")
    assert event.decoded("dtstart") == datetime.combine(
        _day(2), datetime.min.time().replace(hour=9), UTC
    )
    assert event.decoded("dtend") - event.decoded("dtstart") == timedelta(minutes=30)
    assert str(event["summary"]) == "Meeting with Dana"
    assert "Demo of the dialer" in str(event["description"])
    assert str(event["uid"]) == f"{booking_id}@ai-sdr"
    assert (await env.http.get("/v1/bookings/bkg_missing.ics")).status_code == 404


async def test_transfer_and_end_call_ask_the_session_to_act(env: Env) -> None:
    agent = await env.agent(
        tools=[{"type": "transfer_call"}, {"type": "end_call"}], transfer_number="+14155550123"
    )
    config = await env.call(agent)
    transfer = await env.run(config, "transfer_call", reason="wants a human")
    assert (transfer.action, transfer.transfer_to) == ("transfer", "+14155550123")
    assert transfer.say and "transfer" in transfer.say.lower()
    again = await env.run(config, "transfer_call", reason="wants a human")
    assert (again.result, again.action, again.say) == (transfer.result, "transfer", transfer.say)

    goodbye = await env.run(config, "end_call")
    assert goodbye.action == "end_call" and goodbye.say == "Thanks for calling. Goodbye!"
    own = await env.run(config, "end_call", goodbye="Bye Dana!")
    assert own.say == "Bye Dana!"
    silent = await env.run(config, "end_call", goodbye="")
    assert silent.action == "end_call" and silent.say is None

    no_number = await env.agent(tools=[{"type": "transfer_call"}])
    refused = await env.run(await env.call(no_number), "transfer_call")
    assert refused.action is None and "no transfer number" in refused.result["error"]


async def test_send_sms_goes_through_twilio_once(tmp_path: Path, twilio_emulator: Any) -> None:
    async with running_app(tmp_path, TWILIO_API_BASE_URL=twilio_emulator.url) as env:
        agent = await env.agent(tools=[{"type": "send_sms"}])
        config = await env.call(agent)
        twilio_emulator.fail_next(500, 20500, "Internal Server Error")
        failed = await env.run(config, "send_sms", message="Your link: https://acme.test")
        assert "could not be sent" in failed.result["error"]
        sent = await env.run(config, "send_sms", message="Your link: https://acme.test")
        assert sent.result["sent"] is True
        repeat = await env.run(config, "send_sms", message="Your link: https://acme.test")
        assert repeat.result == sent.result
        empty = await env.run(config, "send_sms", message=" ")
        assert "message is required" in empty.result["error"]

    (message,) = twilio_emulator.messages
    assert (message["to"], message["from"]) == (CALLER_NUMBER, AGENT_NUMBER)
    assert message["body"] == "Your link: https://acme.test"
    assert message["sid"] == sent.result["message_sid"]


async def test_http_tool_posts_signed_call_context(env: Env) -> None:
    with ToolServer(reply={"status": "shipped", "eta": "Friday"}) as server:
        tool = _http_tool(server.url + "/orders", headers={"X-Api-Key": "k-123"})
        agent = await env.agent(tools=[tool])
        config = await env.call(agent)
        first = await env.run(config, "lookup_order", order_id="42")
        repeat = await env.run(config, "lookup_order", order_id="42")
        (request,) = server.requests

    assert first.result == {"status": "shipped", "eta": "Friday"} and repeat.result == first.result
    assert request["method"] == "POST" and request["path"] == "/orders"
    assert json.loads(request["body"]) == {
        "tool": "lookup_order",
        "call_id": config.call_id,
        "agent_id": agent["id"],
        "caller_number": CALLER_NUMBER,
        "arguments": {"order_id": "42"},
    }
    headers = request["headers"]
    assert headers["content-type"] == "application/json"
    assert headers["x-api-key"] == "k-123"
    assert len(headers["x-idempotency-key"]) == 64
    _verify_signature(headers["x-webhook-signature"], request["body"])


async def test_http_tool_get_signs_its_query(env: Env) -> None:
    with ToolServer(reply="Order 42 shipped on Monday.") as server:
        agent = await env.agent(tools=[_http_tool(server.url + "/orders?v=2", method="GET")])
        config = await env.call(agent)
        outcome = await env.run(config, "lookup_order", order_id="42", express=True)
        (request,) = server.requests

    assert outcome.result == "Order 42 shipped on Monday."
    query = parse_qs(request["query"].decode())
    assert query["v"] == ["2"] and query["order_id"] == ["42"] and query["express"] == ["true"]
    assert query["call_id"] == [config.call_id] and query["caller_number"] == [CALLER_NUMBER]
    assert request["body"] == b""
    _verify_signature(request["headers"]["x-webhook-signature"], request["query"])


async def test_http_tool_failures_become_results_and_may_be_retried(env: Env) -> None:
    with ToolServer(delay_s=3.0) as slow, ToolServer(status=500, reply="boom") as broken:
        agent = await env.agent(
            tools=[
                _http_tool(slow.url, timeout_seconds=0.5),
                _http_tool(broken.url, name="create_ticket"),
            ]
        )
        config = await env.call(agent)
        timed_out = await env.run(config, "lookup_order", order_id="42")
        retried = await env.run(config, "lookup_order", order_id="42")
        failed = await env.run(config, "create_ticket", order_id="42")
        assert len(slow.requests) == 2  # a failure is not cached: the retry ran again

    assert timed_out.result == {"error": "lookup_order did not answer within 0.5 seconds"}
    assert retried.result == timed_out.result
    assert failed.result == {"error": "create_ticket answered HTTP 500", "detail": "boom"}
    unreachable_agent = await env.agent(tools=[_http_tool("http://127.0.0.1:9/x")])
    unreachable = await env.run(await env.call(unreachable_agent), "lookup_order", order_id="1")
    assert "could not be reached" in unreachable.result["error"]


def _private_hostname() -> str | None:
    """A name (not a literal address) that resolves to non-public addresses here."""
    name = socket.gethostname()
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(name, 80)}
    except OSError:
        return None
    private = addresses and not any(ipaddress.ip_address(a).is_global for a in addresses)
    return name if private else None


async def test_private_tool_urls_are_refused(tmp_path: Path) -> None:
    """Literal private hosts at agent creation; a name that resolves to one at send (the
    other forms: tests/test_ssrf.py)."""
    with ToolServer() as server:
        async with running_app(tmp_path, ALLOW_PRIVATE_URLS=False) as env:
            for url in (server.url, f"http://localhost:{server.port}/x", "http://10.0.0.5/x"):
                response = await env.http.post(
                    "/v1/agents", json={"name": "A", "tools": [_http_tool(url)]}
                )
                assert response.status_code == 422, (url, response.text)
                assert response.json()["error"]["field"] == "tools.0.url"
            if name := _private_hostname():
                agent = await env.agent(tools=[_http_tool(f"http://{name}:{server.port}/x")])
                outcome = await env.run(await env.call(agent), "lookup_order", order_id="1")
                assert "URL was refused" in outcome.result["error"], outcome.result
        assert server.requests == []


# --- whole calls ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lines() -> dict[str, bytes]:
    return {
        "book": synth_speech("I would like to book a demo for the day after tomorrow."),
        "yes": synth_speech("Yes, ten in the morning works for me."),
        "text": synth_speech("Could you text me the link please?"),
        "human": synth_speech("Can I talk to a real person?"),
        "order": synth_speech("Where is my order number forty two?"),
        "wait": synth_speech("Actually wait, I have another question for you"),
        "else": synth_speech("Okay, and what are your opening hours?"),
        "onboarding": synth_speech("How long does onboarding take?"),
        "hello": synth_speech("Hello, it is me again."),
    }


def _last(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return messages[-1] if messages else {}


def _users(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if m.get("role") == "user")


def _tool_results(messages: list[dict[str, Any]], name: str) -> list[Any]:
    return [
        json.loads(m["content"]) if m["content"].startswith(("{", "[")) else m["content"]
        for m in messages
        if m.get("role") == "tool" and m.get("tool_name") == name
    ]


def _chat_requests(stack: LiveStack) -> list[dict[str, Any]]:
    """The call's own LLM requests: post-call analysis sends a JSON-schema `format`."""
    return [body for body in stack.ollama.request_bodies if not body.get("format")]


def _answers(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in call["turns"] if t["role"] == "assistant"]


async def _bookings(stack: LiveStack, **params: str) -> list[dict[str, Any]]:
    async with stack.api() as http:
        return (await http.get("/v1/bookings", params=params)).json()["items"]


pytestmark_live = pytest.mark.slow


@pytestmark_live
async def test_caller_books_a_meeting_and_hears_the_confirmation(tmp_path: Path, lines) -> None:
    target = _day(2)
    start = _at(target, "10:00")

    def llm(messages: list[dict[str, Any]]) -> Reply:
        last = _last(messages)
        if last.get("role") == "tool" and last.get("tool_name") == "check_availability":
            return Reply("I have ten AM or two PM free that day. Which works for you?")
        if last.get("role") == "tool":
            booked = _tool_results(messages, "book_meeting")[-1]
            return Reply(booked["confirmation"] + " Anything else?")
        if _users(messages) == 1:
            return Reply(
                tool_calls=[{"name": "check_availability", "arguments": {"date": str(target)}}]
            )
        booking = {"name": "book_meeting", "arguments": {"start_time": start, "name": "Dana"}}
        return Reply(tool_calls=[booking, booking])  # the model repeats itself

    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["I'd like to book a demo.", "Ten AM works."]},
        ollama={"replies": llm},
    ) as stack:
        agent = await stack.create_agent(tools=[{"type": "book_meeting"}], calendar=CALENDAR)
        call_id, _ = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["book"], anchor="end"),
                SayAfterAgentAudio(2, 0.4, lines["yes"], anchor="end"),
                HangupAfterAgentAudio(3, 0.5, anchor="end"),
                Hangup(40.0),
            ],
            max_duration_s=45,
        )
        call = await stack.call_detail(call_id)
        bookings = await _bookings(stack, call_id=call_id)
        spoken = stack.deepgram.speak_texts
        requests = _chat_requests(stack)

    (booking,) = bookings
    assert booking["agent_id"] == agent["id"] and booking["attendee_phone"] == CALLER_NUMBER
    assert booking["start_at"].startswith(f"{target.isoformat()}T10:00")
    when = f"{target:%A}, {target:%B} {target.day} at 10 AM"
    confirmation = f"You're booked for {when}, UTC."
    assert confirmation in " ".join(spoken), spoken  # spoken in clause-sized chunks
    assert _answers(call)[-1]["text"] == confirmation + " Anything else?"
    # the schemas reached the model, and both repeats came back with the same booking
    assert {t["function"]["name"] for t in requests[0]["tools"]} == {
        "check_availability",
        "book_meeting",
    }
    results = _tool_results(requests[-1]["messages"], "book_meeting")
    assert [r["booking_id"] for r in results] == [booking["id"], booking["id"]]
    tool_turns = [t for t in _answers(call) if t["tool_calls"]]
    assert [c["function"]["name"] for t in tool_turns for c in t["tool_calls"]] == [
        "check_availability",
        "book_meeting",
        "book_meeting",
    ]


@pytestmark_live
async def test_sms_then_transfer_after_the_last_words(tmp_path: Path, lines) -> None:
    transfer_to = "+14155550123"

    def llm(messages: list[dict[str, Any]]) -> Reply:
        last = _last(messages)
        if last.get("role") == "tool":
            return Reply("Done, I just texted you the link.")
        if _users(messages) == 2:  # after the callee's "hello" (an outbound agent waits for it)
            sms = {"message": "Book a demo: https://acme.test/demo"}
            return Reply(tool_calls=[{"name": "send_sms", "arguments": sms}])
        return Reply("Of course.", tool_calls=[{"name": "transfer_call", "arguments": {}}])

    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Hello?", "Text me the link.", "Can I talk to a person?"]},
        ollama={"replies": llm},
    ) as stack:
        agent = await stack.create_agent(
            tools=[{"type": "send_sms"}, {"type": "transfer_call"}], transfer_number=transfer_to
        )
        async with stack.api() as http:
            created = await http.post(
                "/v1/calls", json={"agent_id": agent["id"], "to": CALLER_NUMBER}
            )
        assert created.status_code == 201, created.text
        call_id, call_sid = created.json()["id"], created.json()["twilio_call_sid"]
        result = await stack.caller(
            call_id,
            [
                Say(0.3, lines["hello"]),
                SayAfterAgentAudio(1, 0.4, lines["text"], anchor="end"),
                SayAfterAgentAudio(2, 0.4, lines["human"], anchor="end"),
                Hangup(40.0),
            ],
            call_sid=call_sid,
            max_duration_s=45,
        ).run()
        call = await stack.call_detail(call_id)
        messages, updates = stack.twilio.messages, stack.twilio.call_updates
        spoken = stack.deepgram.speak_texts

    (sms,) = messages
    assert (sms["to"], sms["from"], sms["body"]) == (
        CALLER_NUMBER,
        AGENT_NUMBER,
        "Book a demo: https://acme.test/demo",
    )
    assert "Done, I just texted you the link." in spoken
    (update,) = updates
    assert update["sid"] == call_sid
    twiml = update["params"]["Twiml"]
    assert "<Dial" in twiml and f"<Number>{transfer_to}</Number>" in twiml
    assert f'callerId="{AGENT_NUMBER}"' in twiml
    # the caller heard "Of course." and the transfer line to the end before the redirect
    assert "Let me transfer you now. Please hold for a moment." in spoken
    last_heard = result.started_at + result.talkspurts[-1].end
    assert update["time"] >= last_heard - 0.05, (update["time"], last_heard)
    assert _answers(call)[-1]["text"].endswith("Please hold for a moment.")
    assert call["transferred_to"] == transfer_to
    assert result.ended_by == "server"


@pytestmark_live
async def test_an_early_answer_runs_no_tool_before_the_turn_is_over(tmp_path: Path, lines) -> None:
    """The caller pauses 260 ms mid-request: the pipeline starts an early answer on the
    first half, whose reply is a tool call. The turn is not over, so the tool must not run;
    the caller going on cancels that answer, and only the whole request's tool runs."""
    from emulators.audio import silence

    def llm(messages: list[dict[str, Any]]) -> Reply:
        last = _last(messages)
        if last.get("role") == "tool":
            return Reply("Done, I just texted you the link.")
        sms = {"message": f"You asked: {last.get('content')}"}
        return Reply(tool_calls=[{"name": "send_sms", "arguments": sms}])

    with LiveStack(
        tmp_path,
        deepgram={
            "listen_script": ["Could you text me", "the link please?"],
            "finalize_continuation_ms": 0,  # each segment its own line
        },
        ollama={"replies": llm, "ttft_ms": 0},  # the tool call is in long before speech resumes
    ) as stack:
        await stack.create_agent(tools=[{"type": "send_sms"}])
        _, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["text"] + silence(0.26) + lines["human"]),
                HangupAfterAgentAudio(2, 0.5, anchor="end"),
                Hangup(25.0),
            ],
            max_duration_s=30,
        )
        requests = stack.llm_requests()
        messages = stack.twilio.messages
        metrics = await stack.metrics()

    assert [m["body"] for m in messages] == ["You asked: Could you text me the link please?"]
    # the early answer got its tool call, and was cancelled unheard and unacted
    assert requests[0] == ("completed", ["Could you text me"])
    assert [users for _, users in requests[1:]] == [["Could you text me the link please?"]] * 2
    assert 'aisdr_early_answers_total{outcome="resumed"} 1.0' in metrics
    assert result.ended_by == "hangup"


@pytestmark_live
async def test_barge_in_during_a_slow_tool_keeps_one_result(tmp_path: Path, lines) -> None:
    with ToolServer(reply={"status": "shipped", "eta": "Friday"}, delay_s=3.0) as server:

        def llm(messages: list[dict[str, Any]]) -> Reply:
            if _last(messages).get("role") == "tool":
                return Reply("Your order shipped and arrives Friday.")
            if _users(messages) == 1:
                lookup = {"name": "lookup_order", "arguments": {"order_id": "42"}}
                return Reply(tool_calls=[lookup])
            return Reply("Sure, go ahead.")

        tool = _http_tool(
            server.url + "/orders",
            timeout_seconds=10,
            filler_phrase="Let me check on that order for you, it will only take a moment.",
        )
        with LiveStack(
            tmp_path,
            deepgram={"listen_script": ["Where is order 42?", "Wait, another question."]},
            ollama={"replies": llm},
        ) as stack:
            await stack.create_agent(tools=[tool])
            call_id, _ = await stack.inbound_call(
                [
                    SayAfterAgentAudio(1, 0.4, lines["order"], anchor="end"),
                    SayAfterAgentAudio(2, 0.6, lines["wait"]),  # over the filler
                    HangupAfterAgentAudio(3, 0.5, anchor="end"),
                    Hangup(40.0),
                ],
                max_duration_s=45,
            )
            call = await stack.call_detail(call_id)
            for _ in range(100):  # the tool outlives the interrupted answer
                if await _invocations(stack, "done"):
                    break
                await asyncio.sleep(0.1)
            done = await _invocations(stack, "done")
            requests = _chat_requests(stack)

    assert len(server.requests) == 1
    assert done == 1
    filler = _answers(call)[1]
    assert filler["interrupted"] is True and filler["text"].startswith("Let me check")
    later = requests[-1]["messages"]
    assert _users(later) == 2
    results = _tool_results(later, "lookup_order")
    assert results == [{"status": "shipped", "eta": "Friday"}], later


async def _invocations(stack: LiveStack, status: str) -> int:
    async def count() -> int:
        async with stack.app.state.db.sessionmaker() as session:
            return int(
                await session.scalar(
                    select(func.count())
                    .select_from(ToolInvocation)
                    .where(ToolInvocation.status == status)
                )
            )

    assert stack.server is not None
    return stack.server.run_in_loop(count())


LOOKUP_FILLER = "Let me look that up in our order system for you, one moment."


@pytestmark_live
async def test_tool_timeout_is_reported_and_the_call_goes_on(tmp_path: Path, lines) -> None:
    with ToolServer(delay_s=6.0) as server:

        def llm(messages: list[dict[str, Any]]) -> Reply:
            last = _last(messages)
            if last.get("role") == "tool":
                if "error" in json.loads(last["content"]):
                    return Reply("Sorry, I can't reach the order system right now.")
                return Reply("Your order is on its way.")
            if _users(messages) == 1:
                lookup = {"name": "lookup_order", "arguments": {"order_id": "42"}}
                return Reply(tool_calls=[lookup])
            return Reply("We are open nine to five on weekdays.")

        with LiveStack(
            tmp_path,
            deepgram={"listen_script": ["Where is order 42?", "What are your hours?"]},
            ollama={"replies": llm},
        ) as stack:
            # The filler outlasts the timeout, so the apology follows it without a gap.
            tool = _http_tool(server.url, timeout_seconds=1.5, filler_phrase=LOOKUP_FILLER)
            await stack.create_agent(tools=[tool])
            call_id, _ = await stack.inbound_call(
                [
                    SayAfterAgentAudio(1, 0.4, lines["order"], anchor="end"),
                    SayAfterAgentAudio(2, 0.4, lines["else"], anchor="end"),
                    HangupAfterAgentAudio(3, 0.5, anchor="end"),
                    Hangup(40.0),
                ],
                max_duration_s=45,
            )
            call = await stack.call_detail(call_id)
            requests = _chat_requests(stack)

    (error,) = _tool_results(requests[1]["messages"], "lookup_order")
    assert error == {"error": "lookup_order did not answer within 1.5 seconds"}
    texts = [t["text"] for t in _answers(call)]
    assert texts[1] == LOOKUP_FILLER + " Sorry, I can't reach the order system right now."
    assert texts[2] == "We are open nine to five on weekdays."
    assert call["ended_reason"] == "customer-ended-call"


@pytestmark_live
async def test_faq_passages_reach_the_llm_and_memory_carries_to_the_next_call(
    tmp_path: Path, lines, embedding_model: None
) -> None:
    from tests.test_knowledge import FAQ

    def llm(messages: list[dict[str, Any]]) -> Reply:
        if _last(messages).get("content") == "Hello again.":
            return Reply("Welcome back!")
        return Reply("Most teams are live within two business days.")

    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["How long does onboarding take?"]},
        ollama={"replies": llm},
    ) as stack:
        agent = await stack.create_agent()
        async with stack.api() as http:
            files = {"file": (FAQ.name, FAQ.read_bytes(), "text/markdown")}
            uploaded = await http.post(f"/v1/agents/{agent['id']}/documents", files=files)
        assert uploaded.status_code == 201, uploaded.text
        first_id, _ = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["onboarding"], anchor="end"),
                HangupAfterAgentAudio(2, 0.5, anchor="end"),
                Hangup(30.0),
            ],
            max_duration_s=35,
        )
        first = await stack.call_detail(first_id)
        stack.deepgram.set_listen_script(["Hello again."])
        second_id, _ = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["hello"], anchor="end"),
                HangupAfterAgentAudio(2, 0.5, anchor="end"),
                Hangup(30.0),
            ],
            max_duration_s=35,
        )
        second = await stack.call_detail(second_id)
        requests = _chat_requests(stack)

    messages = requests[0]["messages"]
    reference = [
        m for m in messages if m["role"] == "system" and "Reference material" in m["content"]
    ]
    (passages,) = reference
    assert f"Source: {FAQ.name}" in passages["content"]
    assert "two business days" in passages["content"]
    assert messages.index(passages) == len(messages) - 2  # just before the caller's question
    assert messages[-1] == {"role": "user", "content": "How long does onboarding take?"}
    answer = _answers(first)[1]
    assert answer["text"] == "Most teams are live within two business days."
    assert answer["retrieval_ms"] is not None and answer["retrieval_ms"] >= 0
    # the next call from the same number starts with a memory of this one
    prompt = requests[-1]["messages"][0]["content"]
    memory = prompt.split("What you know from earlier calls with this caller:", 1)[1]
    assert 'caller: "How long does onboarding take?"' in memory
    assert "two business days" in memory
    assert _answers(second)[1]["text"] == "Welcome back!"


@pytestmark_live
async def test_a_failed_transfer_is_apologised_for_and_the_call_goes_on(
    tmp_path: Path, lines
) -> None:
    from voice_pipeline import TRANSFER_FAILED_LINE

    def llm(messages: list[dict[str, Any]]) -> Reply:
        if _users(messages) == 1:
            return Reply("Sure.", tool_calls=[{"name": "transfer_call", "arguments": {}}])
        return Reply("Happy to help with that myself.")

    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Can I talk to a person?", "Text me the link."]},
        ollama={"replies": llm},
    ) as stack:
        await stack.create_agent(tools=[{"type": "transfer_call"}], transfer_number="+14155550123")
        stack.twilio.fail_next(status=400, code=21220, message="Call is not in-progress")
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["human"], anchor="end"),
                SayAfterAgentAudio(3, 0.4, lines["text"], anchor="end"),
                HangupAfterAgentAudio(4, 0.4, anchor="end"),
                Hangup(40.0),
            ],
            max_duration_s=45,
        )
        call = await stack.call_detail(call_id)
        spoken = stack.deepgram.speak_texts

    assert TRANSFER_FAILED_LINE in spoken
    assert call["transferred_to"] is None
    assert call["ended_reason"] == "customer-ended-call"
    assert _answers(call)[-1]["text"] == "Happy to help with that myself."
    assert result.ended_by == "hangup"
