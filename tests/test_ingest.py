"""Document ingestion under attack, through the real server on real sockets: concurrent
identical uploads (exactly one stored), a SIGKILL mid-ingest and a restart (nothing
orphaned), and bounded parsing in the worker process (pages, inflated text, time)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import httpx
import pytest
from chromadb.config import Settings as ChromaSettings

from store.db import alembic_config, upgrade_to_head
from tests.conftest import ACCOUNT_SID, API_KEY, AUTH_TOKEN, PUBLIC_BASE, make_settings
from tests.harness import AppServer
from tests.post_call_support import free_port
from tests.test_knowledge import _pdf

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def bomb_pdf(operators: int) -> bytes:
    """A one-page PDF of a few KB whose compressed content stream inflates to `operators`
    text-show operators: each costs pypdf tens of microseconds to extract."""
    content = b"BT /F1 11 Tf 72 740 Td " + b"(AAAAAAAA) Tj " * operators + b"ET"
    packed = zlib.compress(content, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(packed), packed),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def long_text(paragraphs: int) -> bytes:
    return "\n\n".join(
        f"Paragraph {n}. The Acme dialer plan number {n} includes {n * 3} seats and support. "
        f"Customers on plan {n} call the hotline at extension {n + 100} for onboarding help."
        for n in range(paragraphs)
    ).encode()


@pytest.fixture
def server(tmp_path: Path, embedding_model: None) -> Iterator[AppServer]:
    with AppServer(make_settings(tmp_path, MAX_DOCUMENT_PAGES=3)) as running:
        yield running


def _client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=300)


async def _agent(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/agents", json={"name": "KB agent"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_concurrent_identical_uploads_store_exactly_one(server: AppServer) -> None:
    document = long_text(40)
    async with _client(server.url) as http:
        agent = await _agent(http)
        path = f"/v1/agents/{agent}/documents"
        responses = await asyncio.gather(
            *(
                http.post(path, files={"file": ("faq.txt", document, "text/plain")})
                for _ in range(5)
            )
        )
        listed = (await http.get(path)).json()["items"]
        passages = await _passages(http, agent)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 409, 409, 409, 409], [r.text for r in responses]
    (winner,) = [r.json() for r in responses if r.status_code == 201]
    assert winner["status"] == "ready"
    assert [d["id"] for d in listed] == [winner["id"]]
    assert {p["document_id"] for p in passages} == {winner["id"]}
    for loser in (r for r in responses if r.status_code == 409):
        assert winner["id"] in loser.json()["error"]["message"]


async def _passages(http: httpx.AsyncClient, agent: str) -> list[dict[str, Any]]:
    body = {"query": "Acme dialer plan seats", "top_k": 50, "min_similarity": 0}
    response = await http.post(f"/v1/agents/{agent}/knowledge/search", json=body)
    assert response.status_code == 200, response.text
    return list(response.json()["passages"])


@pytest.mark.timeout(300)
async def test_parsing_is_bounded_by_pages_text_and_time(tmp_path: Path, server: AppServer) -> None:
    async with _client(server.url) as http:
        agent = await _agent(http)
        path = f"/v1/agents/{agent}/documents"

        async def upload(name: str, data: bytes, kind: str) -> httpx.Response:
            return await http.post(path, files={"file": (name, data, kind)})

        pages = await upload("long.pdf", _pdf([["page"]] * 4), "application/pdf")
        fine = await upload("short.pdf", _pdf([["Acme support hours"]] * 3), "application/pdf")
        listed = (await http.get(path)).json()["items"]
    assert pages.status_code == 413, pages.text
    assert "4 pages; the limit is 3" in pages.json()["error"]["message"]
    assert fine.status_code == 201, fine.text
    assert [d["id"] for d in listed] == [fine.json()["id"]]

    tight = make_settings(
        tmp_path / "tight", MAX_DOCUMENT_TEXT_CHARS=100_000, DOCUMENT_PARSE_TIMEOUT_S=4.0
    )
    with AppServer(tight) as bounded:
        async with _client(bounded.url) as http:
            agent = await _agent(http)
            path = f"/v1/agents/{agent}/documents"
            inflated = await http.post(
                path, files={"file": ("bomb.pdf", bomb_pdf(20_000), "application/pdf")}
            )
            slow = await http.post(
                path, files={"file": ("slow.pdf", bomb_pdf(300_000), "application/pdf")}
            )
            after = await http.post(path, files={"file": ("ok.txt", long_text(3), "text/plain")})
            listed = (await http.get(path)).json()["items"]
    assert inflated.status_code == 413, inflated.text
    assert "more than 100000 characters" in inflated.json()["error"]["message"]
    assert slow.status_code == 422, slow.text
    assert slow.json()["error"]["code"] == "document_too_complex"
    assert after.status_code == 201, after.text  # the killed worker was replaced
    assert [d["filename"] for d in listed] == ["ok.txt"]


# --- SIGKILL mid-ingest -------------------------------------------------------------------


def _start_service(data: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "DATA_DIR": str(data),
        "DATABASE_URL": f"sqlite+aiosqlite:///{data}/service.db",
        "CHROMA_PATH": str(data / "chroma"),
        "PUBLIC_BASE_URL": PUBLIC_BASE,
        "API_KEYS": API_KEY,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "OLLAMA_HOST": "http://127.0.0.1:9",
        "DEEPGRAM_BASE_URL": "http://127.0.0.1:9",
        "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
        "KNOWLEDGE_WRITE_BATCH": "4",  # many small steps: the kill lands between two
    }
    command = [sys.executable, "-m", "uvicorn", "main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = (data / "service.log").open("ab")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, (data / "service.log").read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the service did not start")


def _chroma_chunks(path: Path) -> int:
    client = chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
    )
    return sum(c.count() for c in client.list_collections())


@pytest.mark.timeout(600)
async def test_sigkill_mid_ingest_leaves_nothing_orphaned_after_restart(tmp_path: Path) -> None:
    port = free_port()
    service = _start_service(tmp_path, port)
    try:
        async with _client(f"http://127.0.0.1:{port}") as http:
            agent = await _agent(http)
            path = f"/v1/agents/{agent}/documents"
            upload = asyncio.create_task(
                http.post(path, files={"file": ("big.txt", long_text(120), "text/plain")})
            )
            # Killed once the first batches of chunks are searchable, before the last.
            deadline = time.monotonic() + 120
            while not await _passages(http, agent):
                assert time.monotonic() < deadline and not upload.done(), "ingest not seen"
                await asyncio.sleep(0.05)
            listed = (await http.get(path)).json()["items"]
            service.send_signal(signal.SIGKILL)
            service.wait(10)
            with pytest.raises(httpx.HTTPError):
                await upload
    finally:
        service.kill()
        service.wait(10)
    assert [d["status"] for d in listed] == ["processing"]
    assert _chroma_chunks(tmp_path / "chroma") > 0  # the crash left chunks behind

    service = _start_service(tmp_path, port)
    try:
        async with _client(f"http://127.0.0.1:{port}") as http:
            after = (await http.get(path)).json()["items"]
            passages = await _passages(http, agent)
            again = await http.post(path, files={"file": ("small.txt", long_text(2), "text/plain")})
    finally:
        service.terminate()
        service.wait(30)
    assert after == [] and passages == []
    assert again.status_code == 201, again.text
    assert _chroma_chunks(tmp_path / "chroma") == again.json()["chunk_count"]


# --- the migration ------------------------------------------------------------------------


def test_the_migration_keeps_the_oldest_of_duplicate_documents(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    command.upgrade(alembic_config(url), "0002")
    db = sqlite3.connect(tmp_path / "m.db")
    db.execute(
        "INSERT INTO agents (id, name, system_prompt, first_message, first_message_mode, voice,"
        " language, temperature, max_call_seconds, silence_timeout_seconds, end_call_phrases,"
        " min_interrupt_speech_ms, min_interrupt_words, backchannel_phrases, tools, variables,"
        " calendar, analysis_schema, webhook_events, recording_enabled, created_at, updated_at)"
        " VALUES ('agt_1', 'A', '', '', 'assistant_speaks_first', 'v', 'en', 0.4, 900, 10,"
        " '[]', 60, 0, '[]', '[]', '{}', '{}', '{}', '[]', 0, '2026-01-01', '2026-01-01')"
    )
    for doc, sha, at in (
        ("d1", "x", "2026-01-02"),
        ("d2", "x", "2026-01-01"),
        ("d3", "y", "2026-01-03"),
    ):
        db.execute(
            "INSERT INTO documents (id, agent_id, filename, content_type, size_bytes, sha256,"
            " chunk_count, created_at) VALUES (?, 'agt_1', 'f', 'text/plain', 1, ?, 1, ?)",
            (doc, sha, at),
        )
    db.commit()
    db.close()
    upgrade_to_head(url)
    rows = sqlite3.connect(tmp_path / "m.db").execute(
        "SELECT id, status FROM documents ORDER BY id"
    )
    assert rows.fetchall() == [("d2", "ready"), ("d3", "ready")]


# --- retrieval's time budget --------------------------------------------------------------


async def test_retrieval_past_its_budget_answers_without_passages(
    tmp_path: Path, embedding_model: None
) -> None:
    from knowledge.chroma import KnowledgeBase
    from knowledge.documents import chunk_document, parse_document
    from knowledge.service import KnowledgeRetriever

    knowledge = KnowledgeBase(make_settings(tmp_path))
    try:
        parsed = parse_document(long_text(3), filename="faq.txt", content_type="text/plain")
        await knowledge.add_document("agt_1", "doc_1", chunk_document(parsed), source="faq.txt")
        timeouts: list[int] = []
        hurried = KnowledgeRetriever(
            knowledge, budget_s=1e-6, on_timeout=lambda: timeouts.append(1)
        )
        patient = KnowledgeRetriever(knowledge, budget_s=30.0)
        rushed = await hurried.context_for("agt_1", "Acme dialer plan seats")
        full = await patient.context_for("agt_1", "Acme dialer plan seats")
    finally:
        knowledge.close()
    assert rushed == "" and timeouts == [1]
    assert "Acme dialer plan" in full
