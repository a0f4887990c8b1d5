"""Webhook delivery against a real local receiver: signatures checked with stdlib hmac,
order and exactly-once (by event id) across a receiver outage and a service restart,
4xx vs retryable statuses, the retry period, redelivery, the delivery log, and refusal of
private receivers at agent validation and again at delivery (resolved DNS)."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from adapters.netguard import PublicOnlyTransport, UnsafeURLError, check_public_url
from emulators.ollama import OllamaEmulator, Reply
from tests.conftest import create_agent, make_settings, running_app
from tests.post_call_support import (
    AGENT_NUMBER,
    FAST,
    HANG,
    SECRET,
    CallDriver,
    WebhookReceiver,
    eventually,
    free_port,
    sales_conversation,
    verify_signature,
)

ANALYSIS = {
    "summary": "The caller runs ten reps and booked a demo for Tuesday.",
    "caller_sentiment": "positive",
    "outcome": "meeting_booked",
    "lead_score": 82,
    "lead_score_reasons": ["ten seats", "asked for a meeting"],
    "success": True,
    "success_reason": "A meeting was booked.",
}


async def deliveries(client: httpx.AsyncClient, **params: str) -> list[dict]:
    response = await client.get("/v1/webhook-deliveries", params={"limit": 200, **params})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


async def short_call(app, client) -> CallDriver:
    """Answered, the agent speaks, the caller never does: call.started + call.ended."""
    call = CallDriver(app, client)
    await call.ring()
    await call.answer()
    await call.turn("assistant", "Hello?", 0.1)
    await call.hang_up()
    return call


# --- the whole flow -------------------------------------------------------------------------


async def test_every_event_arrives_once_in_order_signed_after_the_receiver_comes_up(tmp_path):
    port = free_port()
    receiver = WebhookReceiver(port=port)  # down until started below
    ollama = OllamaEmulator(ttft_ms=5, tokens_per_s=5000, replies=[Reply(json=ANALYSIS)]).start()
    settings = make_settings(tmp_path, OLLAMA_HOST=ollama.url, **FAST)
    try:
        async with running_app(settings) as (app, client):
            await create_agent(
                client,
                phone_number=AGENT_NUMBER,
                webhook_url=receiver.hook_url,
                webhook_events=["call.transcript", "tool.called"],
            )
            call = CallDriver(app, client)
            await call.ring()
            await sales_conversation(call)
            rows = await eventually(
                lambda: _attempted(client, "call.started"), within_s=10
            )  # the receiver is down: the first event is retrying, the rest wait behind it
            assert rows["status"] in ("pending", "delivering") and rows["last_status_code"] is None
            receiver.start()
            await eventually(lambda: "call.ended" in receiver.types())

            # the receiver has a request a moment before the dispatcher records its outcome
            log = await eventually(lambda: _all_settled(client, 8))
    finally:
        receiver.stop()
        ollama.stop()

    assert receiver.types() == [
        "call.started",
        "call.transcript",
        "call.transcript",
        "call.transcript",
        "call.transcript",
        "tool.called",
        "call.transcript",
        "call.ended",
    ]
    ids = [r["headers"]["x-webhook-id"] for r in receiver.received]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    for request in receiver.received:
        headers = request["headers"]
        assert verify_signature(SECRET, headers["x-webhook-signature"], request["body"])
        assert headers["content-type"] == "application/json"
        event = json.loads(request["body"])
        assert headers["x-webhook-id"] == event["id"]
        assert headers["x-webhook-event"] == event["type"]
    assert {d["status"] for d in log} == {"delivered"}
    started = next(d for d in log if d["event_type"] == "call.started")
    assert started["attempts"] >= 2
    assert started["attempt_log"][-1]["status_code"] == 200
    assert started["attempt_log"][0]["status_code"] is None  # connection refused
    assert all(a["latency_ms"] is not None for a in started["attempt_log"])

    report = receiver.events()[-1]["data"]
    assert report["call"]["id"] == call.call_id
    assert report["call"]["direction"] == "inbound"
    assert report["call"]["ended_reason"] == "customer-ended-call"
    assert [t["interrupted"] for t in report["transcript"]] == [False, False, True, False, False]
    assert report["tool_calls"] == [
        {
            "turn_seq": 5,
            "name": "book_meeting",
            "arguments": {"day": "Tuesday"},
            "action": None,
            "call_time_s": 6.8,
            "status": None,
            "result": None,
        }
    ]
    assert report["latency"]["stt_final_ms"] == {"count": 4, "p50": 210.0, "p95": 237.0}
    assert report["latency"]["first_media_ms"]["count"] == 3
    assert report["analysis"] == {**ANALYSIS, "structured_data": {}}
    assert report["analysis_status"] == "completed" and report["analysis_reason"] is None


async def _attempted(client: httpx.AsyncClient, event_type: str) -> dict | None:
    rows = [d for d in await deliveries(client) if d["event_type"] == event_type]
    return rows[0] if rows and rows[0]["attempts"] >= 1 else None


async def test_no_url_means_no_outbox_rows(app, client):
    await create_agent(client, phone_number=AGENT_NUMBER)
    await short_call(app, client)
    assert await deliveries(client) == []


# --- retries --------------------------------------------------------------------------------


async def test_a_4xx_is_not_retried_and_does_not_block_later_events(tmp_path):
    with WebhookReceiver(statuses=[400]) as receiver:
        settings = make_settings(tmp_path, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST)
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER)
            await short_call(app, client)
            await eventually(lambda: "call.ended" in receiver.types())
            await eventually(lambda: _all_settled(client, 2))
            failed = await deliveries(client, status="failed")
            delivered = await deliveries(client, status="delivered")
    assert receiver.types() == ["call.started", "call.ended"]
    assert len(receiver.received) == 2
    assert [d["event_type"] for d in failed] == ["call.started"]
    assert failed[0]["attempts"] == 1 and failed[0]["last_status_code"] == 400
    assert [d["event_type"] for d in delivered] == ["call.ended"]


async def test_5xx_408_and_429_are_retried_until_delivered(tmp_path):
    with WebhookReceiver(statuses=[500, 429, 408]) as receiver:
        settings = make_settings(tmp_path, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST)
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER)
            await short_call(app, client)
            await eventually(lambda: "call.ended" in receiver.types())
            started = [d for d in await deliveries(client) if d["event_type"] == "call.started"]
    assert receiver.types() == ["call.started", "call.ended"]
    assert [r["headers"]["x-webhook-attempt"] for r in receiver.received[:4]] == list("1234")
    (row,) = started
    assert row["status"] == "delivered" and row["attempts"] == 4
    assert [a["status_code"] for a in row["attempt_log"]] == [500, 429, 408, 200]
    assert [a["error"] for a in row["attempt_log"]] == ["HTTP 500", "HTTP 429", "HTTP 408", None]


async def test_retries_stop_after_the_retry_period(tmp_path):
    with WebhookReceiver() as receiver:
        receiver.default_status = 503
        settings = make_settings(
            tmp_path,
            DEFAULT_WEBHOOK_URL=receiver.hook_url,
            **{**FAST, "WEBHOOK_RETRY_PERIOD_S": 1.0},
        )
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER)
            await short_call(app, client)
            rows = await eventually(lambda: _all_settled(client, 2))
    assert {r["status"] for r in rows} == {"failed"}
    assert all(r["last_error"] == "HTTP 503" for r in rows)
    # call.ended waited behind call.started, so its own period may be over by its first try
    started = next(r for r in rows if r["event_type"] == "call.started")
    assert started["attempts"] >= 2
    assert len(receiver.received) == sum(r["attempts"] for r in rows)


SETTLED = ("delivered", "failed")
"""Delivery statuses no attempt will change any more."""


async def _all_settled(client: httpx.AsyncClient, count: int) -> list[dict] | None:
    rows = await deliveries(client)
    settled = len(rows) == count and all(r["status"] in SETTLED for r in rows)
    return rows if settled else None


async def _settled_detail(client: httpx.AsyncClient, event_id: str) -> dict | None:
    detail = (await client.get(f"/v1/webhook-deliveries/{event_id}")).json()
    return detail if detail["status"] in SETTLED else None


# --- restarts -------------------------------------------------------------------------------


async def test_a_pending_delivery_survives_a_restart(tmp_path):
    port = free_port()
    receiver = WebhookReceiver(port=port)
    settings = make_settings(tmp_path, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST)
    async with running_app(settings) as (app, client):
        await create_agent(client, phone_number=AGENT_NUMBER)
        await short_call(app, client)
        await eventually(lambda: _attempted(client, "call.started"))
    # the service is down; the receiver comes back before the service does
    receiver.start()
    try:
        async with running_app(settings) as (app, client):
            await eventually(lambda: receiver.types() == ["call.started", "call.ended"])
            rows = await eventually(lambda: _all_settled(client, 2))
    finally:
        receiver.stop()
    assert len(receiver.received) == 2
    assert {r["status"] for r in rows} == {"delivered"}


async def test_a_delivery_cut_off_by_shutdown_is_retried_at_the_next_start(tmp_path):
    with WebhookReceiver(statuses=[HANG]) as receiver:
        settings = make_settings(tmp_path, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST)
        async with running_app(settings) as (app, client):
            app.state.post_call.dispatcher.shutdown_grace_s = 0.1
            await create_agent(client, phone_number=AGENT_NUMBER)
            await short_call(app, client)
            await eventually(lambda: len(receiver.received) == 1)
        db = sqlite3.connect(tmp_path / "test.db")
        stuck = db.execute("select event_type, status from webhook_events").fetchall()
        db.close()
        assert ("call.started", "delivering") in stuck
        async with running_app(settings) as (app, client):
            await eventually(lambda: receiver.types() == ["call.started", "call.ended"])
            await eventually(lambda: _all_settled(client, 2))
    first, retry = receiver.received[0], receiver.received[1]
    assert first["headers"]["x-webhook-id"] == retry["headers"]["x-webhook-id"]
    assert len(receiver.events()) == 2


# --- delivery log and redelivery ------------------------------------------------------------


async def test_redeliver_sends_the_same_event_again(tmp_path):
    with WebhookReceiver(statuses=[404]) as receiver:
        settings = make_settings(tmp_path, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST)
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER)
            await short_call(app, client)
            rows = await eventually(lambda: _all_settled(client, 2))
            failed = next(r for r in rows if r["status"] == "failed")
            response = await client.post(f"/v1/webhook-deliveries/{failed['id']}/redeliver")
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "pending"
            await eventually(lambda: len(receiver.received) == 3)
            # The receiver sees the POST before the service records its outcome: wait for
            # the record to settle rather than read it the moment the request lands.
            detail = await eventually(lambda: _settled_detail(client, failed["id"]))
            missing = await client.post("/v1/webhook-deliveries/evt_nope/redeliver")
    assert receiver.received[2]["headers"]["x-webhook-id"] == failed["id"]
    assert receiver.received[2]["body"] == receiver.received[0]["body"]
    assert detail["status"] == "delivered"
    assert [a["status_code"] for a in detail["attempt_log"]] == [404, 200]
    assert detail["payload"]["id"] == failed["id"]
    assert missing.status_code == 404


async def test_delivery_log_filters_and_validation(tmp_path):
    with WebhookReceiver() as receiver:
        settings = make_settings(tmp_path, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST)
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER)
            first = await short_call(app, client)
            await short_call(app, client)
            await eventually(lambda: _all_settled(client, 4))
            page = await client.get("/v1/webhook-deliveries", params={"limit": 1})
            by_call = await deliveries(client, call_id=first.call_id)
            bad = await client.get("/v1/webhook-deliveries", params={"status": "lost"})
            unauthenticated = await client.get(
                "/v1/webhook-deliveries", headers={"Authorization": ""}
            )
    assert page.json()["total"] == 4 and len(page.json()["items"]) == 1
    assert {d["call_id"] for d in by_call} == {first.call_id}
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
    assert unauthenticated.status_code == 401


# --- private receivers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://localhost:9000/hook",
        "http://2130706433/hook",
        "http://metadata.google.internal/",
    ],
)
async def test_private_webhook_urls_are_refused_at_validation(tmp_path, url):
    settings = make_settings(tmp_path, ALLOW_PRIVATE_URLS=False)
    async with running_app(settings) as (_app, client):
        created = await client.post("/v1/agents", json={"name": "A", "webhook_url": url})
        agent = await create_agent(client, webhook_url="https://hooks.example.com/ai-sdr")
        updated = await client.patch(f"/v1/agents/{agent['id']}", json={"webhook_url": url})
    for response in (created, updated):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "webhook_url"
        assert "not allowed" in response.json()["error"]["message"]


async def test_a_private_receiver_is_refused_at_delivery(tmp_path):
    with WebhookReceiver() as receiver:
        settings = make_settings(
            tmp_path, ALLOW_PRIVATE_URLS=False, DEFAULT_WEBHOOK_URL=receiver.hook_url, **FAST
        )
        async with running_app(settings) as (app, client):
            await create_agent(client, phone_number=AGENT_NUMBER)
            await short_call(app, client)
            rows = await eventually(lambda: _all_settled(client, 2))
    assert receiver.received == []
    assert {r["status"] for r in rows} == {"failed"}
    assert all(r["attempts"] == 1 and r["last_error"].startswith("refused") for r in rows)


def test_check_public_url():
    check_public_url("https://hooks.example.com/x", allow_private=False)
    check_public_url("http://127.0.0.1:5000/x", allow_private=True)
    for url in ("ftp://example.com/x", "https:///nohost", "http://0x7f.1/", "http://127.1/"):
        with pytest.raises(ValueError):
            check_public_url(url, allow_private=False)


async def test_delivery_checks_the_resolved_address_and_connects_to_it():
    """DNS rebinding: a public-looking name that resolves to a private address is refused
    at send time; an allowed one is pinned to the address that was checked."""
    seen: list[httpx.Request] = []

    def network(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    answers = {
        "rebind.example.test": ["10.0.0.7"],
        "mixed.example.test": ["93.184.216.34", "127.0.0.1"],
        "hooks.example.test": ["93.184.216.34"],
    }

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    transport = PublicOnlyTransport(httpx.MockTransport(network), resolve=resolve)
    async with httpx.AsyncClient(transport=transport) as http:
        for host in ("rebind.example.test", "mixed.example.test"):
            with pytest.raises(UnsafeURLError):
                await http.post(f"https://{host}/hook", content=b"{}")
        response = await http.post("https://hooks.example.test/hook", content=b"{}")
    assert response.status_code == 204
    (request,) = seen
    assert request.url.host == "93.184.216.34"
    assert request.headers["host"] == "hooks.example.test"
    assert request.extensions["sni_hostname"] == "hooks.example.test"
