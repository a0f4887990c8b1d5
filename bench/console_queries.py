"""`python -m bench.console_queries`: the console's read endpoints at scale.

The service runs as a subprocess (`bench.stack`, as `python -m bench` runs it) and migrates
its fresh SQLite database to head itself, indexes included. Five agents are created through
`/v1/agents`; then `--calls` calls spread over `--days` days, each with its turns
(voice-to-voice latencies), events (barge-ins), webhook deliveries and, for some, an
analysis and a booking, are written straight into the database file with the standard
library's `sqlite3` (the service only reads them; no API writes calls in bulk). The calls
list (with each filter) and the analytics endpoint are then timed over loopback HTTP, and
each request's p50/p95 printed beside the service process's CPU time per request (from
/proc: the figure a busy shared host does not inflate).

    .venv/bin/python -m bench.console_queries --calls 10000

Target (issue 22): p95 <= 100 ms at 10,000 calls for the calls list and the analytics. The
wall-clock figure is taken at the client, so it is the server's time plus a loopback round
trip. Not a test: tests never assert on wall-clock speed.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
Of ours, imports only: bench.stack.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.stack import API_KEY, BenchStack

OUTCOMES = ["meeting_booked", "qualified", "not_interested", "callback_requested", "voicemail"]
STATUSES = ["completed"] * 8 + ["no-answer", "busy", "failed", "in-progress"]
Rows = dict[str, list[dict[str, Any]]]


def _stamp(moment: datetime) -> str:
    """How the service's UTC datetime columns are stored in SQLite (naive UTC, with
    microseconds): the calls list's keyset and the range filters compare these strings."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _rows(calls: int, days: int, agents: list[str], seed: int) -> Rows:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    tables: Rows = {
        "calls": [],
        "transcript_turns": [],
        "call_events": [],
        "webhook_events": [],
        "bookings": [],
    }
    for n in range(calls):
        call_id = f"call_bench{n:08d}"
        created = now - timedelta(seconds=rng.uniform(0, days * 86400))
        status = rng.choice(STATUSES)
        connected = status in ("completed", "in-progress")
        outcome = rng.choice(OUTCOMES) if connected else None
        agent_id = agents[n % len(agents)]
        score = rng.randint(0, 100) if outcome else None
        analysis = {"outcome": outcome, "lead_score": score} if outcome else None
        tables["calls"].append(
            {
                "id": call_id,
                "agent_id": agent_id,
                "direction": rng.choice(["inbound", "outbound", "outbound", "web"]),
                "from_number": "+14155550100",
                "to_number": f"+1415555{n % 10000:04d}",
                "status": status,
                "created_at": _stamp(created),
                "started_at": _stamp(created + timedelta(seconds=3)) if connected else None,
                "ended_at": _stamp(created + timedelta(seconds=90)),
                "duration_seconds": 87.0 if connected else None,
                "variables": "{}",
                "analysis": json.dumps(analysis) if analysis else None,
                "outcome": outcome,
                "lead_score": score,
                "analysis_status": "completed" if outcome else "skipped",
                "analysis_attempts": 1,
            }
        )
        if not connected:
            continue
        for seq in range(1, 9):
            assistant = seq % 2 == 0
            tables["transcript_turns"].append(
                {
                    "call_id": call_id,
                    "seq": seq,
                    "role": "assistant" if assistant else "user",
                    "text": "Sure, we open at nine." if assistant else "When do you open?",
                    "start_s": seq * 5.0,
                    "end_s": seq * 5.0 + 3,
                    "interrupted": 0,
                    "first_media_ms": rng.gauss(650, 120) if assistant else None,
                    "tool_calls": "[]",
                    "created_at": _stamp(created),
                }
            )
        for _ in range(rng.choice([0, 0, 1, 2])):
            tables["call_events"].append(
                {"call_id": call_id, "type": "barge_in", "at": _stamp(created), "data": "{}"}
            )
        for event in ("call.started", "call.ended"):
            tables["webhook_events"].append(
                {
                    "id": f"evt_{event[5:]}{n:08d}",
                    "call_id": call_id,
                    "agent_id": agent_id,
                    "event_type": event,
                    "url": "https://crm.example/hook",
                    "payload": "{}",
                    "status": "failed" if rng.random() < 0.03 else "delivered",
                    "attempts": 1,
                    "next_attempt_at": _stamp(created),
                    "created_at": _stamp(created),
                }
            )
        if outcome == "meeting_booked":
            tables["bookings"].append(
                {
                    "id": f"bkg_bench{n:08d}",
                    "agent_id": agent_id,
                    "call_id": call_id,
                    "start_at": _stamp(created + timedelta(days=2)),
                    "end_at": _stamp(created + timedelta(days=2, minutes=30)),
                    "timezone": "UTC",
                    "status": "confirmed",
                    "created_at": _stamp(created),
                }
            )
    return tables


def seed(database: Path, agents: list[str], calls: int, days: int, seed: int) -> None:
    """Write the rows in one transaction (the service's busy_timeout covers its reads)."""
    connection = sqlite3.connect(database, timeout=60)
    try:
        with connection:
            for table, rows in _rows(calls, days, agents, seed).items():
                if not rows:
                    continue
                columns = list(rows[0])
                statement = (
                    f"INSERT INTO {table} ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})"
                )
                connection.executemany(statement, [[row[c] for c in columns] for row in rows])
    finally:
        connection.close()


def create_agents(http: httpx.Client, count: int) -> list[str]:
    ids = []
    for n in range(count):
        response = http.post("/v1/agents", json={"name": f"Bench agent {n}"})
        if response.status_code != 201:
            raise SystemExit(f"creating an agent: {response.status_code} {response.text[:300]}")
        ids.append(str(response.json()["id"]))
    return ids


def check_seeded(http: httpx.Client, calls: int, days: int) -> None:
    """The service reads every seeded call, through the list and through the analytics
    over the whole range (a stored datetime it could not compare would drop rows)."""
    today = datetime.now(UTC).date()
    listed = http.get("/v1/calls?limit=1").json()["total"]
    start, end = today - timedelta(days=days + 1), today
    counted = http.get(f"/v1/analytics?start={start}&end={end}").json()["totals"]["calls"]
    if listed < calls or counted < calls:
        raise SystemExit(f"seeded {calls} calls, the service sees {listed} / {counted}")


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


def time_requests(
    stack: BenchStack, http: httpx.Client, paths: list[str], repeat: int
) -> list[tuple[str, float, float, float]]:
    """Per path: p50 and p95 wall-clock ms at the client, and the service's CPU ms per
    request (its process CPU over the path's requests, divided by their number)."""
    results = []
    for path in paths:
        samples = []
        cpu_before = stack.server_sample().cpu_s
        for _ in range(repeat):
            began = time.perf_counter()
            response = http.get(path)
            samples.append((time.perf_counter() - began) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
        cpu_ms = (stack.server_sample().cpu_s - cpu_before) * 1000 / repeat
        results.append((path, statistics.median(samples), _percentile(samples, 95), cpu_ms))
    return results


class ConsoleStack(BenchStack):
    """The service (and the emulators it is configured with, idle here) on `database`."""

    def __init__(self, workdir: Path, database: Path) -> None:
        super().__init__({}, workdir)
        self.database = database

    def server_env(self) -> dict[str, str]:
        return {**super().server_env(), "DATABASE_URL": f"sqlite+aiosqlite:///{self.database}"}


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database = args.db or Path(tmp) / "bench.db"
        reuse = database.exists()
        database.parent.mkdir(parents=True, exist_ok=True)
        with (
            ConsoleStack(Path(tmp), database.resolve()) as stack,
            httpx.Client(
                base_url=stack.base_url,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            ) as http,
        ):
            if reuse:
                agents = [a["id"] for a in http.get("/v1/agents").json()["items"]][:5]
            else:
                agents = create_agents(http, 5)
                began = time.perf_counter()
                seed(database, agents, args.calls, args.days, args.seed)
                took = time.perf_counter() - began
                print(f"seeded {args.calls} calls over {args.days} days in {took:.1f} s")
                check_seeded(http, args.calls, args.days)
            today = datetime.now(UTC).date()
            week_ago = (today - timedelta(days=7)).isoformat()
            paths = [
                "/v1/calls?limit=50",
                "/v1/calls?limit=50&offset=5000",
                f"/v1/calls?limit=50&agent_id={agents[1]}",
                "/v1/calls?limit=50&status=completed",
                "/v1/calls?limit=50&direction=web",
                "/v1/calls?limit=50&outcome=meeting_booked",
                f"/v1/calls?limit=50&created_after={week_ago}T00:00:00Z",
                "/v1/analytics",
                "/v1/analytics?group_by=agent",
                f"/v1/analytics?agent_id={agents[2]}",
                f"/v1/analytics?start={today - timedelta(days=args.days)}&end={today}",
            ]
            for _ in range(3):  # warm the page cache and the statement caches
                time_requests(stack, http, paths, 1)
            results = time_requests(stack, http, paths, args.repeat)
    width = max(len(path) for path, *_ in results)
    print(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'request':<{width}}  p50 ms  p95 ms  service CPU ms/request")
    for path, p50, p95, cpu in results:
        flag = "" if p95 <= 100 else "  over 100 ms"
        print(f"{path:<{width}}  {p50:6.1f}  {p95:6.1f}  {cpu:6.1f}{flag}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.console_queries", description=__doc__)
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--days", type=int, default=30, help="the calls are spread over these days")
    p.add_argument("--repeat", type=int, default=40, help="timed requests per path")
    p.add_argument("--seed", type=int, default=22)
    p.add_argument("--db", type=Path, help="a database file: seeded if missing, else reused")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
