"""Knowledge base API on the real app: uploads of every supported type, list, search,
delete, bad input refused with the knowledge base unchanged, and a restart on the same data
directory. Real embedded Chroma and the real MiniLM model (loaded once per session)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pypdf
import pytest
from sqlalchemy import text

from main import create_app
from tests.conftest import create_agent, make_settings, running_app
from tests.test_knowledge import FAQ, PRICING, _pdf

pytestmark = pytest.mark.slow

MAX_BYTES = 20_000


def _settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path, MAX_DOCUMENT_BYTES=MAX_BYTES)


class Running:
    """A started app, its API client and its knowledge base."""

    def __init__(self, app: Any, http: httpx.AsyncClient) -> None:
        self.app, self.http = app, http

    async def chunks(self, agent_id: str) -> int:
        return int(await self.app.state.knowledge.count(agent_id))

    async def documents(self, agent_id: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"/v1/agents/{agent_id}/documents")
        assert response.status_code == 200, response.text
        return response.json()["items"]


async def _running(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_app(_settings(tmp_path)) as (app, http):
        yield Running(app, http)


@pytest.fixture
async def kb_api(tmp_path: Path, embedding_model: None) -> AsyncIterator[Running]:
    async for running in _running(tmp_path):
        yield running


def _file(name: str, data: bytes, content_type: str) -> dict[str, Any]:
    return {"file": (name, data, content_type)}


async def _upload(http: httpx.AsyncClient, agent_id: str, **kwargs: Any) -> httpx.Response:
    return await http.post(f"/v1/agents/{agent_id}/documents", **kwargs)


async def _search(http: httpx.AsyncClient, agent_id: str, query: str, **extra: Any) -> dict:
    body = {"query": query, **extra}
    response = await http.post(f"/v1/agents/{agent_id}/knowledge/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


PDF = _pdf(
    [
        ["Acme Dialer support hours", "Phone support is open from 8am to 8pm Eastern,"],
        ["Monday to Friday. Weekend support is by email only."],
    ]
)


# --- the happy path ---------------------------------------------------------------------


async def test_upload_every_type_list_search_and_delete(kb_api: Running) -> None:
    http = kb_api.http
    agent = await create_agent(http)
    faq = await _upload(http, agent["id"], files=_file(FAQ.name, FAQ.read_bytes(), "text/markdown"))
    pricing = await _upload(
        http, agent["id"], files=_file(PRICING.name, PRICING.read_bytes(), "text/html")
    )
    pdf = await _upload(
        http,
        agent["id"],
        files=_file("support.pdf", PDF, "application/pdf"),
        data={"title": "Hours"},
    )
    note = await _upload(
        http,
        agent["id"],
        json={"text": "Our office dog is called Biscuit.", "title": "Trivia"},
    )
    for response in (faq, pricing, pdf, note):
        assert response.status_code == 201, response.text
    assert faq.json()["content_type"] == "text/markdown"
    assert faq.json()["title"] == "Acme Dialer FAQ"
    assert pricing.json()["content_type"] == "text/html"
    assert pdf.json()["content_type"] == "application/pdf"
    assert pdf.json()["title"] == "Hours"
    assert note.json()["content_type"] == "text/plain"
    assert all(r.json()["chunk_count"] >= 1 for r in (faq, pricing, pdf, note))
    total_chunks = sum(r.json()["chunk_count"] for r in (faq, pricing, pdf, note))
    assert await kb_api.chunks(agent["id"]) == total_chunks

    listed = await kb_api.documents(agent["id"])
    assert {d["id"] for d in listed} == {r.json()["id"] for r in (faq, pricing, pdf, note)}

    found = await _search(http, agent["id"], "When is phone support open?")
    top = found["passages"][0]
    assert top["source"] == "support.pdf" and "8am to 8pm" in top["text"]
    assert top["similarity"] >= kb_api.app.state.settings.KNOWLEDGE_MIN_SIMILARITY
    assert "Source: support.pdf" in found["context"]

    response = await http.delete(f"/v1/agents/{agent['id']}/documents/{pdf.json()['id']}")
    assert response.status_code == 204
    assert await kb_api.chunks(agent["id"]) == total_chunks - pdf.json()["chunk_count"]
    after = await _search(http, agent["id"], "When is phone support open?")
    assert all(p["document_id"] != pdf.json()["id"] for p in after["passages"])
    missing = await http.get(f"/v1/agents/{agent['id']}/documents/{pdf.json()['id']}")
    assert missing.status_code == 404


async def test_search_limits_and_thresholds(kb_api: Running) -> None:
    http = kb_api.http
    agent = await create_agent(http)
    await _upload(http, agent["id"], files=_file(FAQ.name, FAQ.read_bytes(), "text/markdown"))
    wide = await _search(http, agent["id"], "onboarding", top_k=5, min_similarity=-1)
    assert len(wide["passages"]) == 5
    sims = [p["similarity"] for p in wide["passages"]]
    assert sims == sorted(sims, reverse=True)
    strict = await _search(http, agent["id"], "onboarding", min_similarity=0.99)
    assert strict["passages"] == [] and strict["context"] == ""
    bad = await http.post(f"/v1/agents/{agent['id']}/knowledge/search", json={"query": " "})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "query"


async def test_documents_of_another_agent_are_not_reachable(kb_api: Running) -> None:
    http = kb_api.http
    owner, other = await create_agent(http), await create_agent(http)
    doc = (await _upload(http, owner["id"], json={"text": "Secret pricing is ten dollars."})).json()
    assert (await http.get(f"/v1/agents/{other['id']}/documents/{doc['id']}")).status_code == 404
    assert (await http.delete(f"/v1/agents/{other['id']}/documents/{doc['id']}")).status_code == 404
    assert (await _search(http, other["id"], "secret pricing"))["passages"] == []


# --- bad input: a clear 4xx and the knowledge base unchanged ------------------------------


def _bad_uploads() -> list[tuple[str, dict[str, Any], int, str, str]]:
    """(case, request kwargs, status, error code, field)."""
    unreadable_pdf = b"%PDF-1.4\n" + b"\x00garbage" * 50
    encrypted = io.BytesIO()
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(PDF)))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    writer.write(encrypted)
    return [
        ("empty file", {"files": _file("a.txt", b"", "text/plain")}, 422, "empty_document", "file"),
        (
            "blank text file",
            {"files": _file("a.txt", b"  \n\n ", "text/plain")},
            422,
            "empty_document",
            "file",
        ),
        (
            "oversize file",
            {"files": _file("big.txt", b"word " * (MAX_BYTES // 5 + 10), "text/plain")},
            413,
            "too_large",
            "file",
        ),
        (
            "image",
            {"files": _file("logo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png")},
            415,
            "unsupported_media_type",
            "file",
        ),
        (
            "unknown extension",
            {"files": _file("sheet.xlsx", b"PK\x03\x04", "application/octet-stream")},
            415,
            "unsupported_media_type",
            "file",
        ),
        (
            "corrupt pdf",
            {"files": _file("broken.pdf", unreadable_pdf, "application/pdf")},
            422,
            "unreadable_document",
            "file",
        ),
        (
            "encrypted pdf",
            {"files": _file("locked.pdf", encrypted.getvalue(), "application/pdf")},
            422,
            "unreadable_document",
            "file",
        ),
        (
            "text that is not UTF-8",
            {"files": _file("latin.txt", "caf\xe9 ".encode("latin-1") * 10, "text/plain")},
            422,
            "unreadable_document",
            "file",
        ),
        (
            "no file field",
            {"files": {"upload": ("a.txt", b"hi", "text/plain")}},
            422,
            "validation_error",
            "file",
        ),
        ("json without text", {"json": {"title": "x"}}, 422, "validation_error", "text"),
        ("json empty text", {"json": {"text": ""}}, 422, "validation_error", "text"),
        (
            "json unknown field",
            {"json": {"text": "hi", "colour": "red"}},
            422,
            "validation_error",
            "colour",
        ),
        (
            "malformed json",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            422,
            "validation_error",
            "body",
        ),
        (
            "oversize json text",
            {"json": {"text": "word " * (MAX_BYTES // 5 + 10)}},
            413,
            "too_large",
            "text",
        ),
        (
            "plain body",
            {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
            "content-type",
        ),
    ]


async def test_bad_uploads_are_refused_and_change_nothing(kb_api: Running) -> None:
    http = kb_api.http
    agent = await create_agent(http)
    kept = await _upload(http, agent["id"], json={"text": "Support is open on weekdays."})
    assert kept.status_code == 201
    chunks_before = await kb_api.chunks(agent["id"])

    for case, kwargs, status, code, field in _bad_uploads():
        response = await _upload(http, agent["id"], **kwargs)
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert (error["code"], error["field"]) == (code, field), (case, error)
        assert field in error["message"], (case, error)

    assert await kb_api.chunks(agent["id"]) == chunks_before
    assert [d["id"] for d in await kb_api.documents(agent["id"])] == [kept.json()["id"]]


async def test_duplicate_upload_is_a_conflict(kb_api: Running) -> None:
    http = kb_api.http
    agent = await create_agent(http)
    first = await _upload(http, agent["id"], files=_file("faq.md", FAQ.read_bytes(), "text/plain"))
    again = await _upload(http, agent["id"], files=_file("copy.md", FAQ.read_bytes(), "text/plain"))
    assert first.status_code == 201
    assert again.status_code == 409
    assert first.json()["id"] in again.json()["error"]["message"]
    assert await kb_api.chunks(agent["id"]) == first.json()["chunk_count"]


async def test_oversize_body_is_refused_without_reading_it_all(kb_api: Running) -> None:
    http = kb_api.http
    agent = await create_agent(http)
    sent = 0
    piece = b"x" * 8192

    async def endless_multipart() -> AsyncIterator[bytes]:
        nonlocal sent
        yield (
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\n"
        )
        for _ in range(10_000):  # 80 MB if read to the end
            sent += len(piece)
            yield piece

    response = await http.post(
        f"/v1/agents/{agent['id']}/documents",
        content=endless_multipart(),
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "file"
    assert sent < MAX_BYTES + 200_000  # stopped near the limit, not at 80 MB
    assert await kb_api.chunks(agent["id"]) == 0

    declared = await http.post(
        f"/v1/agents/{agent['id']}/documents",
        content=b"x" * 100,
        headers={
            "Content-Type": "multipart/form-data; boundary=B",
            "Content-Length": str(MAX_BYTES * 10),
        },
    )
    assert declared.status_code == 413


async def test_a_failed_document_row_removes_the_stored_chunks(kb_api: Running) -> None:
    """Chroma took the chunks, then the SQL insert failed: the chunks must go again."""
    http = kb_api.http
    agent = await create_agent(http)
    async with kb_api.app.state.db.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TRIGGER refuse_documents BEFORE INSERT ON documents "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        )
    response = await _upload(http, agent["id"], json={"text": "Support is open on weekdays."})
    assert response.status_code == 503
    assert await kb_api.chunks(agent["id"]) == 0
    assert await kb_api.documents(agent["id"]) == []


async def test_unknown_agent_is_404(kb_api: Running) -> None:
    response = await _upload(kb_api.http, "agt_missing", json={"text": "hello"})
    assert response.status_code == 404


async def test_restart_on_the_same_data_dir_keeps_the_knowledge(
    tmp_path: Path, embedding_model: None
) -> None:
    async for first in _running(tmp_path):
        agent = await create_agent(first.http)
        uploaded = await _upload(
            first.http,
            agent["id"],
            files=_file(PRICING.name, PRICING.read_bytes(), "text/html"),
        )
        assert uploaded.status_code == 201
    async for second in _running(tmp_path):
        listed = await second.documents(agent["id"])
        assert [d["id"] for d in listed] == [uploaded.json()["id"]]
        found = await _search(second.http, agent["id"], "How much does the Pro plan cost?")
        assert found["passages"] and found["passages"][0]["source"] == PRICING.name
        health = (await second.http.get("/health")).json()
        assert health["checks"]["chroma"] == "ok"


def test_openapi_describes_both_upload_forms(tmp_path: Path) -> None:
    schema = create_app(_settings(tmp_path)).openapi()
    body = schema["paths"]["/v1/agents/{agent_id}/documents"]["post"]["requestBody"]
    assert set(body["content"]) == {"multipart/form-data", "application/json"}
    assert json.dumps(body)  # serialisable
