"""`python -m bench.console_queries`: the console's read endpoints at scale.

Seeds a fresh SQLite database (migrated to head, indexes included) with `--calls` calls
spread over `--days` days, each with its turns (voice-to-voice latencies), events
(barge-ins), webhook deliveries and, for some, an analysis and a booking; then times the
calls list (with each filter) and the analytics endpoint through the real app in process
(httpx's ASGI transport: server time, no network), and prints p50/p95 per request and
the process CPU time per request (the figure a busy shared host does not inflate).

    .venv/bin/python -m bench.console_queries --calls 10000

Target (issue 22): p95 <= 100 ms at 10,000 calls for the calls list and the analytics.
Not a test: tests never assert on wall-clock speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Table, insert

from config import Settings
from main import create_app
from models import Agent, Booking, Call, CallEvent, TranscriptTurn, WebhookEvent
from store.db import Database

API_KEY = "bench-key"
OUTCOMES = ["meeting_booked", "qualified", "not_interested", "callback_requested", "voicemail"]
STATUSES = ["completed"] * 8 + ["no-answer", "busy", "failed", "in-progress"]


def _rows(calls: int, days: int, agents: list[str], seed: int) -> dict[Any, list[dict[str, Any]]]:
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(tzinfo=None)
    tables: dict[Any, list[dict[str, Any]]] = {
        Call: [],
        TranscriptTurn: [],
        CallEvent: [],
        WebhookEvent: [],
        Booking: [],
    }
    for n in range(calls):
        call_id = f"call_bench{n:08d}"
        created = now - timedelta(seconds=rng.uniform(0, days * 86400))
        status = rng.choice(STATUSES)
        connected = status in ("completed", "in-progress")
        outcome = rng.choice(OUTCOMES) if connected else None
        agent_id = agents[n % len(agents)]
        score = rng.randint(0, 100) if outcome else None
        tables[Call].append(
            {
                "id": call_id,
                "agent_id": agent_id,
                "direction": rng.choice(["inbound", "outbound", "outbound", "web"]),
                "from_number": "+14155550100",
                "to_number": f"+1415555{n % 10000:04d}",
                "status": status,
                "created_at": created,
                "started_at": created + timedelta(seconds=3) if connected else None,
                "ended_at": created + timedelta(seconds=90),
                "duration_seconds": 87.0 if connected else None,
                "variables": {},
                "analysis": {"outcome": outcome, "lead_score": score} if outcome else None,
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
            tables[TranscriptTurn].append(
                {
                    "call_id": call_id,
                    "seq": seq,
                    "role": "assistant" if assistant else "user",
                    "text": "Sure, we open at nine." if assistant else "When do you open?",
                    "start_s": seq * 5.0,
                    "end_s": seq * 5.0 + 3,
                    "interrupted": False,
                    "first_media_ms": rng.gauss(650, 120) if assistant else None,
                    "tool_calls": [],
                    "created_at": created,
                }
            )
        for _ in range(rng.choice([0, 0, 1, 2])):
            tables[CallEvent].append(
                {"call_id": call_id, "type": "barge_in", "at": created, "data": {}}
            )
        for event in ("call.started", "call.ended"):
            tables[WebhookEvent].append(
                {
                    "id": f"evt_{event[5:]}{n:08d}",
                    "call_id": call_id,
                    "agent_id": agent_id,
                    "event_type": event,
                    "url": "https://crm.example/hook",
                    "payload": {},
                    "status": "failed" if rng.random() < 0.03 else "delivered",
                    "attempts": 1,
                    "next_attempt_at": created,
                    "created_at": created,
                }
            )
        if outcome == "meeting_booked":
            tables[Booking].append(
                {
                    "id": f"bkg_bench{n:08d}",
                    "agent_id": agent_id,
                    "call_id": call_id,
                    "start_at": created + timedelta(days=2),
                    "end_at": created + timedelta(days=2, minutes=30),
                    "created_at": created,
                }
            )
    return tables


async def seed(database: Database, agents: list[str], calls: int, days: int, seed: int) -> None:
    async with database.sessionmaker() as session, session.begin():
        connection = await session.connection()  # Core executemany: no ORM unit of work
        names = [{"id": a, "name": f"Bench agent {a[-1]}"} for a in agents]
        await connection.execute(insert(Agent), names)
        for model, rows in _rows(calls, days, agents, seed).items():
            table: Table = model.__table__
            await connection.execute(insert(table), rows)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


async def time_requests(
    app: Any, paths: list[str], repeat: int
) -> list[tuple[str, float, float, float]]:
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    results = []
    async with httpx.AsyncClient(transport=transport, base_url="http://b", headers=headers) as c:
        for path in paths:
            samples, cpu = [], []
            for _ in range(repeat):
                began, began_cpu = time.perf_counter(), time.process_time()
                response = await c.get(path)
                samples.append((time.perf_counter() - began) * 1000)
                cpu.append((time.process_time() - began_cpu) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
            p50, p95 = statistics.median(samples), _percentile(samples, 95)
            results.append((path, p50, p95, statistics.median(cpu)))
    return results


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "bench.db"
        reuse = path.exists()
        url = f"sqlite+aiosqlite:///{path}"
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            ENVIRONMENT="test",
            DATA_DIR=Path(tmp),
            DATABASE_URL=url,
            API_KEYS=[API_KEY],
        )
        database = Database(url)
        await database.migrate()
        agents = [f"agt_bench{n}" for n in range(5)]
        if not reuse:
            began = time.perf_counter()
            await seed(database, agents, args.calls, args.days, args.seed)
            took = time.perf_counter() - began
            print(f"seeded {args.calls} calls over {args.days} days in {took:.1f} s")
        app = create_app(settings)
        app.state.db = database  # the read endpoints need only the database
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
            await time_requests(app, paths, 1)
        results = await time_requests(app, paths, args.repeat)
        await database.aclose()
    width = max(len(path) for path, *_ in results)
    print(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'request':<{width}}  p50 ms  p95 ms  CPU ms (p50)")
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
    asyncio.run(main(parse_args()))
