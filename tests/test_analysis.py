"""Post-call analysis through the Ollama emulator with the real ollama client: the schema in
`format`, extraction to the agent's schema, invalid and schema-invalid answers (retried,
then an analysis error), the LLM down at the end of a call (report first, `call.analyzed`
later, also across a restart), and calls with nothing to analyse."""

from __future__ import annotations

import pytest

from emulators.ollama import OllamaEmulator, Reply
from postcall.analysis import response_schema, validate_analysis
from postcall.report import percentile
from tests.conftest import create_agent, make_settings, running_app
from tests.post_call_support import (
    AGENT_NUMBER,
    FAST,
    CallDriver,
    WebhookReceiver,
    eventually,
    free_port,
    sales_conversation,
)

EXTRACTION = {
    "type": "object",
    "properties": {
        "seats": {"type": "integer", "minimum": 1},
        "timeline": {"type": "string"},
        "current_tool": {"type": "string"},
    },
    "required": ["seats", "timeline"],
}
GOOD = {
    "summary": "Ten-rep team evaluating dialers; booked a demo for Tuesday.",
    "caller_sentiment": "positive",
    "outcome": "meeting_booked",
    "lead_score": 80,
    "lead_score_reasons": ["ten seats", "asked to meet"],
    "success": True,
    "success_reason": "A meeting was booked.",
    "structured_data": {"seats": 10, "timeline": "this quarter"},
}


def fast_ollama(**config) -> OllamaEmulator:
    return OllamaEmulator(ttft_ms=5, tokens_per_s=5000, **config)


async def ended_call(app, client, receiver: WebhookReceiver, **agent_fields) -> CallDriver:
    await create_agent(
        client, phone_number=AGENT_NUMBER, webhook_url=receiver.hook_url, **agent_fields
    )
    call = CallDriver(app, client)
    await call.ring()
    await sales_conversation(call)
    return call


async def call_json(client, call_id: str) -> dict:
    response = await client.get(f"/v1/calls/{call_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def events_of(receiver: WebhookReceiver, event_type: str) -> list[dict]:
    return [e for e in receiver.events() if e["type"] == event_type]


async def test_schema_constrained_extraction_is_in_the_report(tmp_path):
    with fast_ollama(replies=[Reply(json=GOOD)]) as ollama, WebhookReceiver() as receiver:
        settings = make_settings(tmp_path, OLLAMA_HOST=ollama.url, **FAST)
        async with running_app(settings) as (app, client):
            call = await ended_call(
                app, client, receiver, analysis_schema=EXTRACTION, llm_model="llama3.2"
            )
            await eventually(lambda: events_of(receiver, "call.ended"))
            stored = await call_json(client, call.call_id)
    (request,) = ollama.request_bodies
    assert request["stream"] is False
    assert request["format"] == response_schema(EXTRACTION)
    assert request["format"]["properties"]["structured_data"] == EXTRACTION
    assert "structured_data" in request["format"]["required"]
    assert request["options"]["temperature"] == 0
    prompt = request["messages"][1]["content"]
    assert "Caller: Can we meet Tuesday at ten?" in prompt
    assert "Agent: Great, our plan for ten (cut off by the caller)" in prompt
    (report,) = events_of(receiver, "call.ended")
    assert report["data"]["analysis"] == GOOD
    assert report["data"]["analysis_status"] == "completed"
    assert events_of(receiver, "call.analyzed") == []
    assert stored["analysis"] == GOOD and stored["analysis_status"] == "completed"


async def test_invalid_json_is_retried_then_reported_as_an_analysis_error(tmp_path):
    not_json = Reply(text="Sure! The caller was nice.")
    with fast_ollama(replies=[not_json]) as ollama, WebhookReceiver() as receiver:
        settings = make_settings(tmp_path, OLLAMA_HOST=ollama.url, **FAST)
        async with running_app(settings) as (app, client):
            call = await ended_call(app, client, receiver)
            await eventually(lambda: events_of(receiver, "call.ended"))
            stored = await call_json(client, call.call_id)
    assert len(ollama.request_bodies) == 3
    retry = ollama.request_bodies[1]["messages"][-1]["content"]
    assert "previous answer was rejected" in retry
    (report,) = events_of(receiver, "call.ended")
    assert report["data"]["analysis"] is None
    assert report["data"]["analysis_status"] == "failed"
    assert report["data"]["analysis_reason"] == "failed"
    assert "invalid" in report["data"]["analysis_error"]
    assert stored["analysis_status"] == "failed" and stored["analysis"] is None
    assert events_of(receiver, "call.analyzed") == []


async def test_schema_invalid_output_is_retried_with_the_error_fed_back(tmp_path):
    wrong = {**GOOD, "lead_score": 150, "structured_data": {"timeline": "soon"}}
    replies = [Reply(json=wrong), Reply(json=GOOD)]  # indexed by the number of user messages
    with fast_ollama(replies=replies) as ollama, WebhookReceiver() as receiver:
        settings = make_settings(tmp_path, OLLAMA_HOST=ollama.url, **FAST)
        async with running_app(settings) as (app, client):
            call = await ended_call(app, client, receiver, analysis_schema=EXTRACTION)
            await eventually(lambda: events_of(receiver, "call.ended"))
            stored = await call_json(client, call.call_id)
    assert len(ollama.request_bodies) == 2
    feedback = ollama.request_bodies[1]["messages"][-1]["content"]
    assert "lead_score" in feedback and "150" not in feedback  # names the field, not the value
    (report,) = events_of(receiver, "call.ended")
    assert report["data"]["analysis"] == GOOD
    assert stored["analysis_status"] == "completed"


async def test_llm_down_report_goes_out_first_then_call_analyzed(tmp_path):
    with fast_ollama(replies=[Reply(json=GOOD)]) as ollama, WebhookReceiver() as receiver:
        ollama.set_fault("http500")  # until cleared
        settings = make_settings(
            tmp_path,
            OLLAMA_HOST=ollama.url,
            **{**FAST, "ANALYSIS_WAIT_S": 60.0, "ANALYSIS_MAX_ATTEMPTS": 100},
        )
        async with running_app(settings) as (app, client):
            call = await ended_call(app, client, receiver, analysis_schema=EXTRACTION)
            # released early: not held for ANALYSIS_WAIT_S once the LLM is known to be down
            await eventually(lambda: events_of(receiver, "call.ended"), within_s=20)
            assert events_of(receiver, "call.analyzed") == []
            ollama.clear_faults()
            await eventually(lambda: events_of(receiver, "call.analyzed"))
            stored = await call_json(client, call.call_id)
    (report,) = events_of(receiver, "call.ended")
    assert report["data"]["analysis"] is None
    assert report["data"]["analysis_status"] == "pending"
    assert report["data"]["analysis_reason"] == "llm_unavailable"
    assert report["data"]["transcript"]  # the report itself is complete
    (analyzed,) = events_of(receiver, "call.analyzed")
    assert receiver.types()[-2:] == ["call.ended", "call.analyzed"]
    assert analyzed["data"]["analysis"] == GOOD
    assert analyzed["data"]["analysis_status"] == "completed"
    assert analyzed["data"]["call"]["id"] == call.call_id
    assert stored["analysis"] == GOOD
    assert len(ollama.request_bodies) >= 2


async def test_analysis_pending_at_shutdown_finishes_after_a_restart(tmp_path):
    ollama_port = free_port()  # nothing listens here until the emulator starts
    with WebhookReceiver() as receiver:
        settings = make_settings(
            tmp_path,
            OLLAMA_HOST=f"http://127.0.0.1:{ollama_port}",
            **{**FAST, "ANALYSIS_RETRY_BASE_S": 30.0, "ANALYSIS_MAX_ATTEMPTS": 100},
        )
        async with running_app(settings) as (app, client):
            call = await ended_call(app, client, receiver)
            await eventually(lambda: events_of(receiver, "call.ended"))
        with fast_ollama(port=ollama_port, replies=[Reply(json={**GOOD, "structured_data": {}})]):
            async with running_app(settings) as (app, client):
                await eventually(lambda: events_of(receiver, "call.analyzed"))
                stored = await call_json(client, call.call_id)
    (report,) = events_of(receiver, "call.ended")
    assert report["data"]["analysis_reason"] == "llm_unavailable"
    assert stored["analysis_status"] == "completed"
    assert receiver.types()[-1] == "call.analyzed"


async def test_calls_without_conversation_skip_analysis(tmp_path):
    with fast_ollama(replies=[Reply(json=GOOD)]) as ollama, WebhookReceiver() as receiver:
        settings = make_settings(tmp_path, OLLAMA_HOST=ollama.url, **FAST)
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER, webhook_url=receiver.hook_url)
            busy = CallDriver(app, client)
            await busy.ring()
            await busy.status("busy")
            silent = CallDriver(app, client)
            await silent.ring()
            await silent.answer()
            await silent.turn("assistant", "Hello, anyone there?", 0.1)
            await silent.hang_up("silence-timed-out")
            await eventually(lambda: len(events_of(receiver, "call.ended")) == 2)
            stored = await call_json(client, busy.call_id)
    assert ollama.request_bodies == []
    for report in events_of(receiver, "call.ended"):
        assert report["data"]["analysis"] is None
        assert report["data"]["analysis_status"] == "skipped"
        assert report["data"]["analysis_reason"] == "no_conversation"
    busy_report = next(
        e for e in events_of(receiver, "call.ended") if e["data"]["call"]["id"] == busy.call_id
    )
    assert busy_report["data"]["call"]["status"] == "busy"
    assert busy_report["data"]["transcript"] == []
    assert stored["analysis_status"] == "skipped"


# --- units ----------------------------------------------------------------------------------


def test_validation_names_fields_not_values():
    assert validate_analysis(GOOD, EXTRACTION) == GOOD
    with pytest.raises(ValueError, match="outcome") as bad_outcome:
        validate_analysis({**GOOD, "outcome": "sold-a-yacht"}, EXTRACTION)
    assert "yacht" not in str(bad_outcome.value)
    with pytest.raises(ValueError, match=r"structured_data.seats"):
        validate_analysis({**GOOD, "structured_data": {"seats": 0, "timeline": "x"}}, EXTRACTION)
    with pytest.raises(ValueError, match="mood: Extra inputs"):
        validate_analysis({**GOOD, "mood": "great"}, {})


def test_response_schema_without_an_extraction_schema():
    schema = response_schema({})
    assert "structured_data" not in schema["properties"]
    assert set(schema["required"]) == set(schema["properties"])
    assert schema["properties"]["lead_score"]["maximum"] == 100


def test_percentile_interpolates():
    assert percentile([100.0], 0.95) == 100.0
    assert percentile([100.0, 200.0], 0.5) == 150.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
