"""`/v1/campaigns` and `/v1/dnc` through the real app (ASGI): create, import contacts from
JSON and CSV (bad rows reported, duplicates merged, DNC numbers suppressed), lifecycle
moves, idempotency, and the DNC rules on `POST /v1/calls`."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from tests.conftest import create_agent


async def _campaign(client, **fields):
    agent = await create_agent(client, phone_number="+14155550100")
    body = {"name": "Spring promo", "agent_id": agent["id"], **fields}
    response = await client.post("/v1/campaigns", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_defaults_and_idempotency(client):
    numberless = await create_agent(client)
    refused = await client.post("/v1/campaigns", json={"name": "Q0", "agent_id": numberless["id"]})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "from"
    agent = await create_agent(client, phone_number="+14155550100")
    body = {"name": "Q1", "agent_id": agent["id"], "calls_per_second": 2}
    first = await client.post("/v1/campaigns", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    campaign = first.json()
    assert campaign["status"] == "draft"
    assert campaign["calling_window"]["days"] == [0, 1, 2, 3, 4]
    assert (campaign["calling_window"]["start"], campaign["calling_window"]["end"]) == (
        "09:00",
        "20:00",
    )
    again = await client.post("/v1/campaigns", json=body, headers={"Idempotency-Key": "k1"})
    assert again.json()["id"] == campaign["id"]
    other = await client.post(
        "/v1/campaigns", json={**body, "name": "Q2"}, headers={"Idempotency-Key": "k1"}
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    listed = (await client.get("/v1/campaigns")).json()
    assert listed["total"] == 1


async def test_create_refuses_bad_fields(client):
    agent = await create_agent(client)
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"calling_window": {"start": "20:00", "end": "09:00"}}, "calling_window.end"),
        ({"calling_window": {"timezone": "Mars/Olympus"}}, "calling_window.timezone"),
        ({"calls_per_second": 0}, "calls_per_second"),
        ({"retry_policy": {"busy": {"max_attempts": 0, "delay_seconds": 5}}}, None),
        ({"start_at": "2027-01-01T00:00:00"}, "start_at"),
    ]
    for extra, field in cases:
        body = {"name": "x", "agent_id": agent["id"], **extra}
        response = await client.post("/v1/campaigns", json=body)
        assert response.status_code == 422, (extra, response.text)
        if field:
            assert response.json()["error"]["field"] == field
    missing = await client.post("/v1/campaigns", json={"name": "x", "agent_id": "agt_nope"})
    assert missing.status_code == 404


async def test_csv_import_reports_bad_rows_merges_and_suppresses(client):
    campaign = await _campaign(client)
    dnc = await client.post("/v1/dnc", json={"phone": "(415) 555-0103", "reason": "asked"})
    assert dnc.status_code == 201 and dnc.json()["phone"] == "+14155550103"
    csv_text = (
        "phone,first_name,timezone,metadata.crm_id\n"
        "+14155550101,Ann,,c1\n"
        "415-555-0102,Bob,America/Chicago,c2\n"
        "not a number,Cy,,c3\n"
        "+14155550101,Ann B,,c1b\n"
        "+14155550103,Dee,,c4\n"
        "+14155550104,Eve,Nowhere/Town,c5\n"
        "\n"
        "+442079460000,Fay,,c6\n"
    )
    files = {"file": ("leads.csv", csv_text.encode(), "text/csv")}
    response = await client.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files)
    assert response.status_code == 201, response.text
    report = response.json()
    assert (report["received"], report["imported"], report["merged"], report["suppressed"]) == (
        7,
        4,
        1,
        1,
    )
    assert [(e["line"], e["reason"].split(":")[0]) for e in report["errors"]] == [
        (4, "phone"),
        (7, "timezone"),
    ]
    contacts = (await client.get(f"/v1/campaigns/{campaign['id']}/contacts")).json()["items"]
    by_phone = {c["phone"]: c for c in contacts}
    assert by_phone["+14155550101"]["variables"]["first_name"] == "Ann B"
    assert by_phone["+14155550101"]["metadata"] == {"crm_id": "c1b"}
    assert by_phone["+14155550101"]["timezone"] == "America/Los_Angeles"
    assert by_phone["+14155550102"]["timezone"] == "America/Chicago"
    assert by_phone["+442079460000"]["timezone"] == "Europe/London"
    assert by_phone["+14155550103"]["state"] == "suppressed"
    pending = await client.get(f"/v1/campaigns/{campaign['id']}/contacts?state=pending")
    assert pending.json()["total"] == 3
    bad = await client.get(f"/v1/campaigns/{campaign['id']}/contacts?state=nonsense")
    assert bad.status_code == 422


async def test_contacts_json_and_refusals(client):
    campaign = await _campaign(client)
    url = f"/v1/campaigns/{campaign['id']}/contacts"
    body = {"contacts": [{"phone": "+14155550111", "metadata": {"lead": 7}}, {"phone": ""}]}
    report = (await client.post(url, json=body)).json()
    assert report["imported"] == 1 and report["errors"][0]["line"] == 2
    assert (await client.post(url, json={"contacts": []})).status_code == 422
    assert (
        await client.post(url, content=b"{", headers={"content-type": "application/json"})
    ).status_code == 422
    assert (
        await client.post(url, content=b"x", headers={"content-type": "text/plain"})
    ).status_code == 415
    no_phone = {"file": ("a.csv", b"name\nAnn\n", "text/csv")}
    refused = await client.post(url, files=no_phone)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_csv"
    binary = {"file": ("a.csv", b"\xff\xfe\x00", "text/csv")}
    assert (await client.post(url, files=binary)).status_code == 422


async def test_ten_thousand_rows_in_one_request(client):
    campaign = await _campaign(client)
    lines = ["phone,name"] + [f"+1415{5550000 + i:07d},N{i}" for i in range(10_000)]
    files = {"file": ("big.csv", "\n".join(lines).encode(), "text/csv")}
    started = time.perf_counter()
    response = await client.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files)
    elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.text
    assert response.json()["imported"] == 10_000
    print(f"10,000-row CSV imported in {elapsed:.2f} s")
    stats = (await client.get(f"/v1/campaigns/{campaign['id']}")).json()["stats"]
    assert stats["contacts"] == {"pending": 10_000}


async def test_lifecycle_moves_and_refusals(client):
    campaign = await _campaign(client)
    cid = campaign["id"]
    assert (await client.post(f"/v1/campaigns/{cid}/pause")).status_code == 409
    await client.post(
        f"/v1/campaigns/{cid}/contacts", json={"contacts": [{"phone": "+14155550121"}]}
    )
    started = await client.post(f"/v1/campaigns/{cid}/start")
    assert started.json()["status"] == "running"
    assert (await client.post(f"/v1/campaigns/{cid}/start")).status_code == 409
    assert (await client.post(f"/v1/campaigns/{cid}/pause")).json()["status"] == "paused"
    assert (await client.post(f"/v1/campaigns/{cid}/resume")).json()["status"] == "running"
    cancelled = (await client.post(f"/v1/campaigns/{cid}/cancel")).json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["stats"]["contacts"].get("pending", 0) == 0
    late = await client.post(
        f"/v1/campaigns/{cid}/contacts", json={"contacts": [{"phone": "+14155550122"}]}
    )
    assert late.status_code == 409


async def test_dnc_list_remove_csv_and_calls_refused(client):
    agent = await create_agent(client, phone_number="+14155550100")
    assert (await client.post("/v1/dnc", json={"phone": "abc"})).status_code == 422
    csv_body = b"phone,reason\n+14155550131,lawyer\nxx,bad\n4155550132,\n"
    imported = await client.post(
        "/v1/dnc/import", content=csv_body, headers={"content-type": "text/csv"}
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["added"] == 2 and imported.json()["errors"][0]["line"] == 3
    listed = (await client.get("/v1/dnc")).json()
    assert {i["phone"]: i["reason"] for i in listed["items"]} == {
        "+14155550131": "lawyer",
        "+14155550132": None,
    }
    refused = await client.post("/v1/calls", json={"agent_id": agent["id"], "to": "+14155550131"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dnc"
    assert (await client.delete("/v1/dnc/+14155550131")).status_code == 204
    assert (await client.delete("/v1/dnc/+14155550131")).status_code == 404


async def test_contacts_not_reached_by_end_at_expire_and_the_campaign_completes(app, client):
    # Saturday: the default Monday-Friday window never opens before end_at
    now = [datetime(2027, 1, 9, 15, 0, tzinfo=UTC)]
    app.state.campaign_events.clock = lambda: now[0]
    campaign = await _campaign(client, end_at="2027-01-10T12:00:00Z")
    url = f"/v1/campaigns/{campaign['id']}/contacts"
    await client.post(
        url, json={"contacts": [{"phone": "+14155550141"}, {"phone": "+14155550142"}]}
    )
    await client.post(f"/v1/campaigns/{campaign['id']}/start")
    await asyncio.sleep(0.6)
    running = (await client.get(f"/v1/campaigns/{campaign['id']}")).json()
    assert running["status"] == "completed"  # nothing could ever be dialed in time
    assert running["stats"]["contacts"] == {"expired": 2}
    assert running["stats"]["attempts"] == 0
