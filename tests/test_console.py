"""The console at `/console` through the real app: sign-in, pages, the session cookie and
CSRF, and what is refused to anyone without a session."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi.routing import APIWebSocketRoute
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import insert

from api.console_session import SESSION_COOKIE
from console.routes import ROUTERS
from models import Call, CallEvent, TranscriptTurn, WebhookEvent
from tests.conftest import API_KEY, create_agent


def _browser(app: Any) -> httpx.AsyncClient:
    """A client with no API key, keeping cookies, as a browser would."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def _form_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def sign_in(browser: httpx.AsyncClient, key: str = API_KEY) -> httpx.Response:
    form = await browser.get("/console/sign-in")
    token = _form_token(form.text)
    return await browser.post("/console/sign-in", data={"api_key": key, "csrf_token": token})


def _csrf(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert match, html
    return match.group(1)


async def test_sign_in_sets_a_signed_httponly_strict_cookie_without_the_key(app):
    async with _browser(app) as browser:
        response = await sign_in(browser)
        assert response.status_code == 303 and response.headers["location"] == "/console/calls"
        cookie = next(
            v
            for k, v in response.headers.multi_items()
            if k == "set-cookie" and SESSION_COOKIE in v
        )
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert API_KEY not in cookie
        page = await browser.get("/console/calls")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in page.text and " style=" not in page.text


async def test_wrong_key_and_missing_or_forged_sign_in_token_are_refused(app):
    async with _browser(app) as browser:
        wrong = await sign_in(browser, key="not-a-key")
        assert wrong.status_code == 401 and "not valid" in wrong.text
        assert SESSION_COOKIE not in browser.cookies
        await browser.get("/console/sign-in")
        forged = await browser.post(
            "/console/sign-in", data={"api_key": API_KEY, "csrf_token": "forged"}
        )
        assert forged.status_code == 403
        missing = await browser.post("/console/sign-in", data={"api_key": API_KEY})
        assert missing.status_code == 403
        assert SESSION_COOKIE not in browser.cookies


def _console_paths() -> list[tuple[str, str]]:
    paths = []
    for route in (route for router in ROUTERS for route in router.routes):
        path = getattr(route, "path", "")
        if isinstance(route, APIWebSocketRoute):
            continue  # the browser call's socket: refused over a real socket, below
        for method in getattr(route, "methods", None) or {"GET"}:
            if path in ("/console/sign-in", "/console") or method == "HEAD":
                continue
            paths.append((method, re.sub(r"\{[^}]+\}", "x", path)))
    return paths


@pytest.mark.parametrize(("method", "path"), _console_paths())
async def test_every_console_route_refuses_without_a_session(app, method, path):
    async with _browser(app) as browser:
        response = await browser.request(method, path)
    assert response.status_code in (303, 401, 403), (method, path, response.status_code)
    if response.status_code == 303:
        assert response.headers["location"] == "/console/sign-in"


async def test_a_cookie_signed_with_another_secret_is_refused(app):
    forged = URLSafeTimedSerializer("another-secret", salt="ai-sdr-console-session").dumps(
        {"k": "0" * 32, "c": "token"}
    )
    async with _browser(app) as browser:
        browser.cookies.set(SESSION_COOKIE, forged)
        page = await browser.get("/console/calls")
        assert page.status_code == 303
        api = await browser.get("/v1/agents")
        assert api.status_code == 401


async def test_the_api_takes_the_session_but_unsafe_requests_need_the_csrf_header(app):
    async with _browser(app) as browser:
        await sign_in(browser)
        token = _csrf((await browser.get("/console/agents")).text)
        assert (await browser.get("/v1/agents")).status_code == 200
        refused = await browser.post("/v1/agents", json={"name": "No token"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
        forged = await browser.post(
            "/v1/agents", json={"name": "Forged"}, headers={"X-CSRF-Token": "forged"}
        )
        assert forged.status_code == 403
        created = await browser.post(
            "/v1/agents", json={"name": "With token"}, headers={"X-CSRF-Token": token}
        )
        assert created.status_code == 201
        out = await browser.post("/console/sign-out", data={"csrf_token": "forged"})
        assert out.status_code == 403
        out = await browser.post("/console/sign-out", data={"csrf_token": token})
        assert out.status_code == 303
        assert (await browser.get("/console/calls")).status_code == 303


async def test_removing_the_api_key_signs_its_sessions_out(app):
    async with _browser(app) as browser:
        await sign_in(browser)
        assert (await browser.get("/console/agents")).status_code == 200
        app.state.settings.API_KEYS = ["a-new-key"]
        assert (await browser.get("/console/agents")).status_code == 303


async def test_pages_render_calls_detail_analytics_and_webhooks(app, client):
    agent = await create_agent(client, name="Console agent")
    async with app.state.db.sessionmaker() as session, session.begin():
        await session.execute(
            insert(Call),
            [
                {
                    "id": "call_console1",
                    "agent_id": agent["id"],
                    "direction": "web",
                    "from_number": "browser",
                    "to_number": "",
                    "status": "completed",
                    "variables": {},
                    "analysis": {"outcome": "qualified", "lead_score": 70, "summary": "Fine."},
                    "outcome": "qualified",
                    "lead_score": 70,
                }
            ],
        )
        turns = [
            {"seq": 1, "role": "assistant", "text": "Hi!", "start_s": 0.2, "end_s": 1.0},
            {
                "seq": 2,
                "role": "user",
                "text": "What are your hours?",
                "start_s": 1.5,
                "end_s": 2.5,
            },
            {
                "seq": 3,
                "role": "assistant",
                "text": "We open at",
                "start_s": 3.1,
                "end_s": 4.0,
                "interrupted": True,
                "stt_final_ms": 120.0,
                "llm_first_token_ms": 300.0,
                "tts_first_audio_ms": 450.0,
                "first_media_ms": 520.0,
            },
        ]
        await session.execute(
            insert(TranscriptTurn), [{"call_id": "call_console1", **t} for t in turns]
        )
        await session.execute(
            insert(CallEvent),
            [
                {"call_id": "call_console1", "type": "barge_in", "call_time_s": 3.9, "data": {}},
                {
                    "call_id": "call_console1",
                    "type": "interrupted",
                    "call_time_s": 4.0,
                    "data": {"reason": "barge-in", "unheard": "nine every weekday."},
                },
            ],
        )
        await session.execute(
            insert(WebhookEvent),
            [{"id": "evt_c1", "call_id": "call_console1", "event_type": "call.ended", "url": "u"}],
        )
    async with _browser(app) as browser:
        await sign_in(browser)
        listing = await browser.get("/console/calls?direction=web")
        assert "call_console1" in listing.text
        detail = await browser.get("/console/calls/call_console1")
        assert detail.status_code == 200
        assert "nine every weekday." in detail.text  # the unheard part of the cut answer
        assert 'class="stage first_media"' in detail.text  # the latency bar
        assert 'class="marker barge_in"' in detail.text
        assert 'data-redeliver="evt_c1"' in detail.text
        analytics = await browser.get("/console/analytics")
        assert analytics.status_code == 200 and "Voice-to-voice p95" in analytics.text
        hooks = await browser.get("/console/webhooks?status=pending")
        assert "evt_c1" in hooks.text
        assert (await browser.get("/console/webhooks/evt_c1")).status_code == 200
        assert (await browser.get(f"/console/agents/{agent['id']}")).status_code == 200
        assert (await browser.get("/console/agents/new")).status_code == 200
        assert (await browser.get("/console/calls/nope")).status_code == 404
        bad = await browser.get("/console/calls?start=yesterday")
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "start"
