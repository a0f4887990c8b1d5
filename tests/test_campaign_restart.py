"""Kill the service with SIGKILL in the middle of a campaign and start it again on the same
database: the dialer picks up where the database says it was. Nothing is dialed twice
(no number has two calls, no answered contact is called again) and nothing is lost (every
contact ends in a final state). Calls whose callbacks died with the process are
reconciled from the Twilio emulator (`calls(sid).fetch()`)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from emulators.deepgram import DeepgramEmulator
from emulators.ollama import OllamaEmulator
from emulators.twilio_caller import Hangup
from emulators.twilio_dialplan import Answer, DialPlan
from emulators.twilio_rest import TwilioRestEmulator
from tests.conftest import ACCOUNT_SID, API_KEY, AUTH_TOKEN, PUBLIC_BASE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _noon_zone() -> str:
    """An `Etc/GMT` zone where it is about midday now: the window test-proof all day."""
    offset = (12 - datetime.now(UTC).hour) % 24
    offset = offset - 24 if offset > 14 else offset
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"


def _start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "uvicorn", "main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port),
        "--ws", "api.media_ws:MediaStreamProtocol", "--ws-per-message-deflate", "false",
    ]  # fmt: skip
    out = log.open("ab")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)


async def _wait_healthy(base: str, proc: subprocess.Popen[bytes], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(base_url=base, timeout=2) as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the service exited during start-up"
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the service did not start")


async def test_sigkill_mid_campaign_then_restart(tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        DeepgramEmulator(api_key="dg-test-key") as deepgram,
        OllamaEmulator() as ollama,
        TwilioRestEmulator(ACCOUNT_SID, AUTH_TOKEN) as twilio,
    ):
        env = {
            **os.environ,
            "ENVIRONMENT": "test",
            "LOG_LEVEL": "WARNING",
            "DATA_DIR": str(tmp_path),
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/kill.db",
            "CHROMA_PATH": str(tmp_path / "chroma"),
            "PUBLIC_BASE_URL": PUBLIC_BASE,
            "API_KEYS": API_KEY,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_API_BASE_URL": twilio.url,
            "DEEPGRAM_API_KEY": "dg-test-key",
            "DEEPGRAM_BASE_URL": deepgram.url,
            "OLLAMA_HOST": ollama.url,
            "ALLOW_PRIVATE_URLS": "true",
            "CAMPAIGN_TICK_MS": "50",
            "CAMPAIGN_LEASE_S": "3",
        }
        plan = DialPlan(
            app_base=base,
            public_base=PUBLIC_BASE,
            media_url=f"ws://127.0.0.1:{port}/twilio/media",
            default=Answer("human", [Hangup(2.5)], ring_s=0.4, amd_after_s=0.5),
        )
        twilio.dial_plan = plan
        log = tmp_path / "service.log"
        proc = _start(env, port, log)
        try:
            await _wait_healthy(base, proc, 120)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as http:
                agent = (
                    await http.post("/v1/agents", json={"name": "A", "first_message": "Hi."})
                ).json()
                body = {
                    "name": "Restart",
                    "agent_id": agent["id"],
                    "from": "+14155550100",
                    "max_concurrent_calls": 6,
                    "calls_per_second": 10,
                    "calling_window": {
                        "days": [0, 1, 2, 3, 4, 5, 6],
                        "start": "00:00",
                        "end": "23:59",
                    },
                    "retry_policy": {"no_answer": {"max_attempts": 3, "delay_seconds": 0.5}},
                }
                campaign = (await http.post("/v1/campaigns", json=body)).json()
                zone = _noon_zone()
                phones = [f"+1415555{i:04d}" for i in range(30)]
                csv_body = "phone,timezone\n" + "".join(f"{p},{zone}\n" for p in phones)
                files = {"file": ("c.csv", csv_body.encode(), "text/csv")}
                url = f"/v1/campaigns/{campaign['id']}/contacts"
                assert (await http.post(url, files=files)).json()["imported"] == 30
                await http.post(f"/v1/campaigns/{campaign['id']}/start")
                async with asyncio.timeout(60):
                    while len(plan.records) < 10:  # noqa: ASYNC110 - another thread's dict
                        await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed_at = time.monotonic()
            in_flight = sum(1 for r in plan.records.values() if r.ended is None)
            await asyncio.sleep(1.0)
            proc = _start(env, port, log)
            await _wait_healthy(base, proc, 120)
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as http:
                async with asyncio.timeout(120):
                    while True:
                        state = (await http.get(f"/v1/campaigns/{campaign['id']}")).json()
                        if state["status"] == "completed":
                            break
                        await asyncio.sleep(0.3)
                results = (await http.get(f"/v1/campaigns/{campaign['id']}/results")).text
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        records = list(plan.records.values())

    rows = {row["phone"]: row for row in csv.DictReader(io.StringIO(results))}
    assert set(rows) == set(phones)  # nothing lost
    assert all(r["state"] == "answered" for r in rows.values()), rows
    dials: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        dials.setdefault(record.to, []).append((record.created, record.ended or killed_at))
    # every number answered on its first dial, so none was dialed twice
    assert {to: len(v) for to, v in dials.items() if len(v) != 1} == {}
    assert all(int(r["attempts"]) >= 1 for r in rows.values())
    print(f"\nSIGKILL with {in_flight} calls in flight; {len(records)} dials for 30 contacts")
