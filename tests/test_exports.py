"""Exports and recordings: one call's transcript as JSON, text and CSV with interruptions
marked; calls as streamed CSV with filters (and `/v1/calls/export` not read as a call id);
inbound recording started through the Twilio REST emulator and its URL in the report."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from api.webhooks import call_batches
from tests.conftest import PUBLIC_BASE, create_agent, make_settings, post_signed, running_app
from tests.post_call_support import (
    AGENT_NUMBER,
    CALLER_NUMBER,
    FAST,
    CallDriver,
    WebhookReceiver,
    eventually,
    sales_conversation,
)


async def finished_call(app, client) -> str:
    call = CallDriver(app, client)
    await call.ring()
    await sales_conversation(call)
    return call.call_id


async def test_transcript_export_in_three_formats(app, client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    call_id = await finished_call(app, client)

    as_json = await client.get(f"/v1/calls/{call_id}/transcript")
    as_text = await client.get(f"/v1/calls/{call_id}/transcript", params={"format": "txt"})
    as_csv = await client.get(f"/v1/calls/{call_id}/transcript", params={"format": "csv"})

    turns = as_json.json()["turns"]
    assert [t["role"] for t in turns] == ["assistant", "user", "assistant", "user", "assistant"]
    assert [t["interrupted"] for t in turns] == [False, False, True, False, False]
    lines = as_text.text.splitlines()
    assert as_text.headers["content-type"].startswith("text/plain")
    assert lines[1] == "[00:02.0] Caller: Sure, we are looking at dialers for ten reps."
    assert lines[2] == "[00:04.0] Agent: Great, our plan for ten [interrupted]"
    assert "attachment" in as_text.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert [r["interrupted"] for r in rows] == ["false", "false", "true", "false", "false"]
    assert rows[3] == {
        "seq": "4",
        "speaker": "Caller",
        "role": "user",
        "start_s": "5.5",
        "end_s": "6.5",
        "interrupted": "false",
        "text": "Can we meet Tuesday at ten?",
    }


async def test_transcript_export_errors_name_the_problem(app, client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    call_id = await finished_call(app, client)
    missing = await client.get("/v1/calls/call_nope/transcript")
    bad = await client.get(f"/v1/calls/{call_id}/transcript", params={"format": "pdf"})
    assert missing.status_code == 404
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "format"


async def test_formula_like_speech_is_neutralised_in_csv(app, client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    call = CallDriver(app, client)
    await call.ring()
    await call.answer()
    await call.turn("user", '=HYPERLINK("http://x")', 1.0)
    await call.hang_up()
    exported = await client.get(f"/v1/calls/{call.call_id}/transcript", params={"format": "csv"})
    (row,) = csv.DictReader(io.StringIO(exported.text))
    assert row["text"] == '\'=HYPERLINK("http://x")'


async def test_calls_export_is_csv_with_filters_and_not_shadowed_by_call_id(app, client):
    agent = await create_agent(client, phone_number=AGENT_NUMBER)
    other = await create_agent(client, name="Other", phone_number="+14155550111")
    first = await finished_call(app, client)
    busy = CallDriver(app, client)
    await busy.ring()
    await busy.status("busy")
    elsewhere = CallDriver(app, client)
    await elsewhere.ring(to=other["phone_number"])

    everything = await client.get("/v1/calls/export")
    by_agent = await client.get("/v1/calls/export", params={"agent_id": agent["id"]})
    completed = await client.get(
        "/v1/calls/export", params={"status": "completed", "direction": "inbound"}
    )
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    none = await client.get("/v1/calls/export", params={"created_after": future})
    bad = await client.get("/v1/calls/export", params={"format": "xlsx"})

    assert everything.status_code == 200, everything.text
    assert everything.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(everything.text)))
    assert [r["call_id"] for r in rows] == [first, busy.call_id, elsewhere.call_id]
    assert rows[0]["from"] == CALLER_NUMBER and rows[0]["to"] == AGENT_NUMBER
    assert rows[0]["agent_name"] == "Test agent" and rows[2]["agent_name"] == "Other"
    assert rows[1]["status"] == "busy" and rows[1]["analysis_status"] == "skipped"
    ids = [r["call_id"] for r in csv.DictReader(io.StringIO(by_agent.text))]
    assert ids == [first, busy.call_id]
    assert [r["call_id"] for r in csv.DictReader(io.StringIO(completed.text))] == [first]
    assert none.text.strip().split(",")[0] == "call_id"  # the header only
    assert len(none.text.strip().splitlines()) == 1
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "format"


async def test_calls_export_reads_in_keyset_batches(app, client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    created = []
    for _ in range(5):
        call = CallDriver(app, client)
        created.append(await call.ring())
    batches = [
        [call.id for call, _name in rows]
        async for rows in call_batches(app.state.db.sessionmaker, [], batch=2)
    ]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [i for batch in batches for i in batch] == created


async def test_inbound_recording_is_started_and_its_url_reaches_the_report(
    tmp_path, twilio_emulator
):
    with WebhookReceiver() as receiver:
        settings = make_settings(tmp_path, TWILIO_API_BASE_URL=twilio_emulator.url, **FAST)
        async with running_app(settings) as (app, client):
            await create_agent(
                client,
                phone_number=AGENT_NUMBER,
                recording_enabled=True,
                webhook_url=receiver.hook_url,
            )
            call = CallDriver(app, client)
            await call.ring()
            await call.answer()
            (recording,) = await eventually(lambda: twilio_emulator.recordings)
            recording_url = f"https://api.twilio.com/Recordings/{recording['sid']}"
            callback = await post_signed(
                client,
                "/twilio/recording",
                {
                    "CallSid": call.call_sid,
                    "RecordingSid": recording["sid"],
                    "RecordingUrl": recording_url,
                    "RecordingStatus": "completed",
                },
            )
            assert callback.status_code == 204
            await call.turn("assistant", "Hello?", 0.1)
            await call.hang_up()
            await eventually(lambda: "call.ended" in receiver.types())
            exported = await client.get("/v1/calls/export")
    assert recording["call_sid"] == call.call_sid
    assert recording["params"]["RecordingStatusCallback"] == PUBLIC_BASE + "/twilio/recording"
    report = receiver.events()[-1]["data"]
    assert report["call"]["recording_url"] == recording_url
    (row,) = csv.DictReader(io.StringIO(exported.text))
    assert row["recording_url"] == recording_url


async def test_no_recording_unless_the_agent_records(tmp_path, twilio_emulator):
    settings = make_settings(tmp_path, TWILIO_API_BASE_URL=twilio_emulator.url, **FAST)
    async with running_app(settings) as (app, client):
        await create_agent(client, phone_number=AGENT_NUMBER)
        call = CallDriver(app, client)
        await call.ring()
        await call.answer()
        await call.hang_up()
    assert twilio_emulator.recordings == []
