"""`python -m bench.campaign`: one outbound campaign end to end, measured.

    .venv/bin/python -m bench.campaign            # 1,000 contacts, 50 at once, ~20 s calls
    .venv/bin/python -m bench.campaign --contacts 100 --concurrency 20 --call-s 5

The service runs in its own subprocess (as in production: uvicorn, uvloop); this process
holds the wire emulators, with the Twilio emulator's dial plan answering each number:
humans who stay on for `--call-s` seconds, a share of voicemails (AMD says
`machine_end_beep` after a 3 s greeting; the agent hangs up) and a share of no-answers the
first time (answered on the retry). Reports:

- pacing: the dial rate while the dialer was not held back by concurrency, against the
  configured `calls_per_second`;
- time to finish against the ideal: the seconds every dial held a line, over the
  concurrency (and the issue's contacts x call length / concurrency);
- dialer cost: a second, media-free campaign (every number busy) gives the service's CPU
  per contact with nothing but dialing and callbacks running; database statements per
  contact come from the dialer's own count (`aisdr_dialer_db_statements`);
- the peak of calls in flight at the emulator.

Writes the report as JSON to bench/results/campaign-<UTC timestamp>.json.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.stack import ACCOUNT_SID, API_KEY, AUTH_TOKEN, PUBLIC_BASE, ROOT, free_port, proc_sample
from emulators.deepgram import DeepgramEmulator
from emulators.ollama import OllamaEmulator
from emulators.twilio_caller import Hangup
from emulators.twilio_dialplan import Answer, DialPlan
from emulators.twilio_rest import TwilioRestEmulator

RESULTS = Path(__file__).resolve().parent / "results"
DEEPGRAM_KEY = "bench-deepgram-key"


def _server(
    workdir: Path, port: int, urls: dict[str, str], max_calls: int
) -> subprocess.Popen[bytes]:
    data = workdir / "data"
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "LOG_LEVEL": "WARNING",
        "DATA_DIR": str(data),
        "DATABASE_URL": f"sqlite+aiosqlite:///{data}/campaign.db",
        "CHROMA_PATH": str(data / "chroma"),
        "PUBLIC_BASE_URL": PUBLIC_BASE,
        "API_KEYS": API_KEY,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": urls["twilio"],
        "DEEPGRAM_API_KEY": DEEPGRAM_KEY,
        "DEEPGRAM_BASE_URL": urls["deepgram"],
        "OLLAMA_HOST": urls["ollama"],
        "ALLOW_PRIVATE_URLS": "true",
        "MAX_CONCURRENT_CALLS": str(max_calls),
        "CAMPAIGN_INBOUND_RESERVE": "0",
    }
    command = [
        sys.executable, "-m", "uvicorn", "main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        "--ws-per-message-deflate", "false", "--ws", "api.media_ws:MediaStreamProtocol",
        "--loop", "uvloop", "--http", "httptools",
    ]  # fmt: skip
    log = (workdir / "service.log").open("ab")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited early (code {proc.returncode})")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("service did not become healthy")


def _metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _window() -> dict[str, Any]:
    """Every day, all day, in UTC: the benchmark never waits for a window."""
    return {"days": [0, 1, 2, 3, 4, 5, 6], "start": "00:00", "end": "23:59", "timezone": "UTC"}


def _run_campaign(
    http: httpx.Client,
    plan: DialPlan,
    agent_id: str,
    phones: list[str],
    *,
    concurrency: int,
    cps: float,
    retry_delay_s: float,
    server_pid: int,
    deadline_s: float,
) -> dict[str, Any]:
    body = {
        "name": f"bench {len(phones)}",
        "agent_id": agent_id,
        "from": "+14155550100",
        "max_concurrent_calls": concurrency,
        "calls_per_second": cps,
        "calling_window": _window(),
        "retry_policy": {
            "no_answer": {"max_attempts": 2, "delay_seconds": retry_delay_s},
            "busy": {"max_attempts": 1, "delay_seconds": retry_delay_s},
            "voicemail": {"max_attempts": 1, "delay_seconds": retry_delay_s},
        },
    }
    campaign = http.post("/v1/campaigns", json=body).json()
    csv_body = "phone,timezone\n" + "".join(f"{p},UTC\n" for p in phones)
    files = {"file": ("bench.csv", csv_body.encode(), "text/csv")}
    report = http.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files).json()
    assert report["imported"] == len(phones), report
    statements0 = _metric(http, "aisdr_dialer_db_statements")
    cpu0 = proc_sample(server_pid).cpu_s
    started = time.monotonic()
    http.post(f"/v1/campaigns/{campaign['id']}/start")
    peak_in_flight = 0
    state: dict[str, Any] = {}
    while time.monotonic() - started < deadline_s:
        peak_in_flight = max(
            peak_in_flight, sum(1 for r in list(plan.records.values()) if r.ended is None)
        )
        state = http.get(f"/v1/campaigns/{campaign['id']}").json()
        if state["status"] == "completed":
            break
        time.sleep(0.2)
    took = time.monotonic() - started
    cpu = proc_sample(server_pid).cpu_s - cpu0
    statements = _metric(http, "aisdr_dialer_db_statements") - statements0
    return {
        "campaign_id": campaign["id"],
        "completed": state.get("status") == "completed",
        "seconds": round(took, 1),
        "service_cpu_s": round(cpu, 2),
        "dialer_db_statements": int(statements),
        "peak_in_flight_sampled": peak_in_flight,
        "stats": state.get("stats", {}),
        "started_at_monotonic": started,
    }


def _pacing(created: list[float], concurrency: int) -> float | None:
    """Dials per second over the ramp: the first `concurrency` dials, before the cap binds."""
    ramp = sorted(created)[: max(concurrency, 2)]
    if len(ramp) < 2 or ramp[-1] <= ramp[0]:
        return None
    return (len(ramp) - 1) / (ramp[-1] - ramp[0])


def _overlap_peak(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__)
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--cps", type=float, default=10.0, help="calls_per_second")
    parser.add_argument("--call-s", type=float, default=20.0, help="length of an answered call")
    parser.add_argument("--ring-s", type=float, default=2.0)
    parser.add_argument("--voicemail", type=float, default=0.15, help="share of voicemails")
    parser.add_argument("--no-answer", type=float, default=0.15, help="share unanswered at first")
    parser.add_argument("--retry-delay-s", type=float, default=5.0)
    parser.add_argument("--dial-only", type=int, default=200, help="contacts of the busy-only run")
    args = parser.parse_args(argv)

    human = Answer("human", [Hangup(args.call_s)], ring_s=args.ring_s, amd_after_s=0.5,
                   max_duration_s=args.call_s + 30)  # fmt: skip
    machine = Answer("machine", [Hangup(60)], ring_s=args.ring_s, amd_after_s=3.0)
    unanswered = Answer("no-answer", ring_s=args.ring_s * 3)
    busy = Answer("busy", ring_s=0.2)
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
        workdir = Path(tmp)
        deepgram = DeepgramEmulator(api_key=DEEPGRAM_KEY).start()
        ollama = OllamaEmulator().start()
        twilio = TwilioRestEmulator(ACCOUNT_SID, AUTH_TOKEN).start()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        urls = {"twilio": twilio.url, "deepgram": deepgram.url, "ollama": ollama.url}
        server = _server(workdir, port, urls, max_calls=args.concurrency + 10)
        try:
            _wait_healthy(base, server)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                agent = http.post(
                    "/v1/agents",
                    json={
                        "name": "Bench SDR",
                        "first_message": "Hi, this is Acme calling about your demo request.",
                        "silence_timeout_seconds": 300,
                        "voicemail": {"action": "hang_up"},
                    },
                ).json()
                # 1. dialing alone: every number busy, no media
                dial_plan = DialPlan(app_base=base, public_base=PUBLIC_BASE,
                                     media_url=base.replace("http", "ws") + "/twilio/media",
                                     default=busy)  # fmt: skip
                twilio.dial_plan = dial_plan
                dial_phones = [f"+1212555{i:04d}" for i in range(args.dial_only)]
                dial_run = _run_campaign(
                    http, dial_plan, agent["id"], dial_phones, concurrency=args.concurrency,
                    cps=50, retry_delay_s=args.retry_delay_s, server_pid=server.pid,
                    deadline_s=600,
                )  # fmt: skip
                # 2. the campaign
                plan = DialPlan(app_base=base, public_base=PUBLIC_BASE,
                                media_url=base.replace("http", "ws") + "/twilio/media",
                                default=human)  # fmt: skip
                phones = [f"+1415555{i:04d}" for i in range(args.contacts)]
                n_vm = round(args.contacts * args.voicemail)
                n_na = round(args.contacts * args.no_answer)
                for phone in phones[:n_vm]:
                    plan.script(phone, machine)
                for phone in phones[n_vm : n_vm + n_na]:
                    plan.script(phone, unanswered, human)
                twilio.dial_plan = plan
                run = _run_campaign(
                    http, plan, agent["id"], phones, concurrency=args.concurrency,
                    cps=args.cps, retry_delay_s=args.retry_delay_s, server_pid=server.pid,
                    deadline_s=3600,
                )  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            for emulator in (twilio, ollama, deepgram):
                emulator.stop()
    records = list(plan.records.values())
    created = [r.created for r in records]
    held = [(r.created, r.ended or r.created) for r in records]
    line_seconds = sum(b - a for a, b in held)
    pacing = _pacing(created, args.concurrency)
    retries = len(records) - args.contacts
    report = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "campaign": {k: v for k, v in run.items() if k != "started_at_monotonic"},
        "dials": len(records),
        "retries": retries,
        "pacing_dials_per_s": None if pacing is None else round(pacing, 2),
        "pacing_configured": args.cps,
        "ideal_s_line_time": round(line_seconds / args.concurrency, 1),
        "ideal_s_formula": round(
            args.contacts * args.call_s / args.concurrency
            + retries * args.ring_s * 3 / args.concurrency,
            1,
        ),
        "peak_in_flight": _overlap_peak(held),
        "dial_only": {
            "contacts": args.dial_only,
            "seconds": dial_run["seconds"],
            "service_cpu_ms_per_contact": round(
                dial_run["service_cpu_s"] * 1000 / args.dial_only, 2
            ),
            "dialer_db_statements_per_contact": round(
                dial_run["dialer_db_statements"] / args.dial_only, 1
            ),
        },
        "service_cpu_ms_per_contact": round(run["service_cpu_s"] * 1000 / args.contacts, 1),
        "dialer_db_statements_per_contact": round(run["dialer_db_statements"] / args.contacts, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"campaign-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2))
    c = report["campaign"]
    print(f"campaign: {args.contacts} contacts, {len(records)} dials ({retries} retries), "
          f"completed={c['completed']} in {c['seconds']} s")  # fmt: skip
    print(f"pacing: {report['pacing_dials_per_s']} dials/s against {args.cps} configured")
    print(f"ideal: {report['ideal_s_line_time']} s (line time / concurrency); "
          f"{report['ideal_s_formula']} s (contacts x call / concurrency + retries)")  # fmt: skip
    print(f"peak in flight: {report['peak_in_flight']} (cap {args.concurrency})")
    d = report["dial_only"]
    print(f"dialer alone ({d['contacts']} busy numbers): "
          f"{d['service_cpu_ms_per_contact']} ms service CPU and "
          f"{d['dialer_db_statements_per_contact']} dialer statements per contact")  # fmt: skip
    print(f"whole campaign: {report['service_cpu_ms_per_contact']} ms service CPU and "
          f"{report['dialer_db_statements_per_contact']} dialer statements "
          "per contact")  # fmt: skip
    print(f"report: {out.relative_to(ROOT)}")
    return 0 if c["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
