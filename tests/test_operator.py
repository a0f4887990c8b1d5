"""Operator endpoints (/metrics, /docs, /redoc, /openapi.json): open by default, behind the
API key by setting, and a warning at startup when production leaves them open."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from main import create_app
from tests.conftest import make_settings, running_app

OPERATOR_PATHS = ["/metrics", "/openapi.json", "/docs", "/redoc"]


async def test_open_by_default(tmp_path: Path) -> None:
    async with running_app(make_settings(tmp_path)) as (_app, http):
        answers = {
            p: (await http.get(p, headers={"Authorization": ""})).status_code
            for p in OPERATOR_PATHS
        }
    assert answers == dict.fromkeys(OPERATOR_PATHS, 200)


async def test_behind_the_api_key_by_setting(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, OPERATOR_ENDPOINTS="api_key")
    async with running_app(settings) as (_app, http):
        anonymous = {p: await http.get(p, headers={"Authorization": ""}) for p in OPERATOR_PATHS}
        wrong = {
            p: await http.get(p, headers={"Authorization": "Bearer nope"}) for p in OPERATOR_PATHS
        }
        keyed = {p: await http.get(p) for p in OPERATOR_PATHS}
    assert {p: r.status_code for p, r in anonymous.items()} == dict.fromkeys(OPERATOR_PATHS, 401)
    assert {p: r.status_code for p, r in wrong.items()} == dict.fromkeys(OPERATOR_PATHS, 401)
    assert {p: r.status_code for p, r in keyed.items()} == dict.fromkeys(OPERATOR_PATHS, 200)
    assert "aisdr_calls_started_total" in keyed["/metrics"].text
    assert "/v1/agents" in keyed["/openapi.json"].json()["paths"]
    assert "/openapi.json" in keyed["/docs"].text


@pytest.mark.parametrize(("mode", "warned"), [("open", True), ("api_key", False)])
def test_production_warns_while_they_are_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_sdr.operator")
    production = {
        "ENVIRONMENT": "production",
        "API_KEYS": ["a-real-key"],
        "WEBHOOK_SIGNING_SECRET": "a-real-signing-secret",
        "CONSOLE_SECRET": "a-real-console-secret",
        "OPERATOR_ENDPOINTS": mode,
    }
    create_app(make_settings(tmp_path, **production))
    assert ("/metrics, /docs, /redoc and /openapi.json are open" in caplog.text) is warned
