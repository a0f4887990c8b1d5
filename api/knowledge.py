"""`/v1` knowledge base routes: upload, list, read and delete an agent's documents, and a
debug search that shows what retrieval would put in the LLM context.

Uploads are multipart (`file`, optional `title`) or JSON (`{"text", "filename", "title"}`).
The body is read through a counter that stops at MAX_DOCUMENT_BYTES (plus multipart
framing), so an oversize upload is refused without being read to its end. A document is
listed as `processing` until its chunks are in; an identical one for the same agent is a
409 (`knowledge.service.DocumentIngest`).

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError
from sqlalchemy import select
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.deps import AgentDep, PageDep, SessionDep, SettingsDep, paginate, require_api_key
from api.errors import APIError, not_found
from knowledge.chroma import KnowledgeBase, format_passages_for_prompt
from knowledge.documents import (
    DocumentError,
    DocumentTooComplex,
    DocumentTooLarge,
    EmptyDocument,
    UnreadableDocument,
    UnsupportedType,
)
from knowledge.service import (
    DocumentIngest,
    DuplicateDocument,
    KnowledgeStoreError,
    Upload,
    delete_document,
)
from models import Document
from schemas import (
    DocumentRead,
    DocumentText,
    KnowledgeSearch,
    KnowledgeSearchResult,
    Page,
    PassageRead,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["knowledge"])

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and a title field
JSON_EXPANSION = 6  # "\u00e9" in JSON is six bytes for a two-byte character
UPLOAD_PATH = r"/v1/agents/[^/]+/documents"
"""The one route whose body may pass MAX_REQUEST_BYTES (`api.errors.BodySizeLimit`)."""


def upload_body_limit(max_document_bytes: int) -> int:
    """The largest upload body: a JSON body of the largest document (the route checks the
    tighter limit of its content type as it reads)."""
    return max_document_bytes * JSON_EXPANSION + MULTIPART_OVERHEAD


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "title": {"type": "string"},
                    },
                    "required": ["file"],
                }
            },
            "application/json": {"schema": DocumentText.model_json_schema()},
        },
    }
}


def get_knowledge(request: Request) -> KnowledgeBase:
    knowledge: KnowledgeBase | None = getattr(request.app.state, "knowledge", None)
    if knowledge is None:
        raise APIError(503, "knowledge_unavailable", "the knowledge base is not available")
    return knowledge


KnowledgeDep = Annotated[KnowledgeBase, Depends(get_knowledge)]


def get_ingest(request: Request) -> DocumentIngest:
    ingest: DocumentIngest | None = getattr(request.app.state, "ingest", None)
    if ingest is None:
        raise APIError(503, "knowledge_unavailable", "the knowledge base is not available")
    return ingest


IngestDep = Annotated[DocumentIngest, Depends(get_ingest)]


async def get_document(agent: AgentDep, document_id: str, session: SessionDep) -> Document:
    document = await session.get(Document, document_id)
    if document is None or document.agent_id != agent.id:
        raise not_found("document", document_id)
    return document


DocumentDep = Annotated[Document, Depends(get_document)]


# --- reading the upload -----------------------------------------------------------------


class _BodyTooLarge(MultiPartException):
    """Raised from the body stream; a MultiPartException so the parser closes its files."""


async def _bounded(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for piece in request.stream():
        received += len(piece)
        if received > limit:
            raise _BodyTooLarge(f"request body is larger than {limit} bytes")
        yield piece


def _too_large(max_bytes: int, field: str) -> APIError:
    return APIError(413, "too_large", f"{field}: larger than the {max_bytes} byte limit", field)


async def read_upload(request: Request, max_bytes: int) -> tuple[Upload, str]:
    """The uploaded document and the request field it came from ("file" or "text")."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        limit, field = max_bytes + MULTIPART_OVERHEAD, "file"
    elif media_type == "application/json":
        limit, field = max_bytes * JSON_EXPANSION + MULTIPART_OVERHEAD, "text"
    else:
        message = (
            f"content-type: {media_type or 'none'} is not accepted; send multipart/form-data "
            "with a 'file' field, or JSON {\"text\": ...}"
        )
        raise APIError(415, "unsupported_media_type", message, "content-type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(max_bytes, field)
    if field == "file":
        return await _read_multipart(request, limit, max_bytes), field
    return await _read_json(request, limit), field


async def _read_multipart(request: Request, limit: int, max_bytes: int) -> Upload:
    parser = MultiPartParser(request.headers, _bounded(request, limit), max_files=1, max_fields=5)
    try:
        form = await parser.parse()
    except _BodyTooLarge:
        raise _too_large(max_bytes, "file") from None
    except MultiPartException as exc:
        raise APIError(400, "bad_request", f"malformed multipart body: {exc.message}") from None
    try:
        file, title = form.get("file"), form.get("title")
        if not isinstance(file, UploadFile):
            raise APIError(422, "validation_error", "file: a file field named 'file'", "file")
        data = await file.read()
        return Upload(
            data=data,
            filename=file.filename,
            content_type=file.content_type,
            title=(title.strip()[:300] or None) if isinstance(title, str) else None,
        )
    finally:
        await form.close()


async def _read_json(request: Request, limit: int) -> Upload:
    body = bytearray()
    try:
        async for piece in _bounded(request, limit):
            body += piece
    except _BodyTooLarge:
        raise APIError(413, "too_large", "text: the request body is too large", "text") from None
    try:
        payload = DocumentText.model_validate(json.loads(body))
    except ValueError as exc:
        raise _json_error(exc) from None
    filename = payload.filename or "text.txt"
    return Upload(payload.text.encode(), filename, None, payload.title or None)


def _json_error(exc: ValueError) -> APIError:
    if not isinstance(exc, ValidationError):
        return APIError(422, "validation_error", "body: malformed JSON", "body")
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "body"
    message = str(error["msg"]).removeprefix("Value error, ")
    return APIError(422, "validation_error", f"{field}: {message}", field)


_DOCUMENT_ERRORS: list[tuple[type[DocumentError], int, str]] = [
    (DocumentTooLarge, 413, "too_large"),
    (UnsupportedType, 415, "unsupported_media_type"),
    (EmptyDocument, 422, "empty_document"),
    (UnreadableDocument, 422, "unreadable_document"),
    (DocumentTooComplex, 422, "document_too_complex"),
]


def _document_error(exc: DocumentError, field: str) -> APIError:
    for kind, status, code in _DOCUMENT_ERRORS:
        if isinstance(exc, kind):
            return APIError(status, code, f"{field}: {exc}", field)
    return APIError(422, "invalid_document", f"{field}: {exc}", field)


# --- routes -----------------------------------------------------------------------------


@router.post(
    "/agents/{agent_id}/documents",
    status_code=201,
    response_model=DocumentRead,
    openapi_extra=_UPLOAD_BODY,
)
async def upload_document(
    agent: AgentDep, request: Request, settings: SettingsDep, ingest: IngestDep
) -> Document:
    upload, field = await read_upload(request, settings.MAX_DOCUMENT_BYTES)
    try:
        return await ingest.ingest(agent.id, upload)
    except DocumentError as exc:
        raise _document_error(exc, field) from None
    except DuplicateDocument as exc:
        message = f"{field}: already in the knowledge base as document {exc.document_id!r}"
        raise APIError(409, "conflict", message, field) from None
    except KnowledgeStoreError as exc:
        raise APIError(503, "knowledge_unavailable", str(exc)) from None


@router.get("/agents/{agent_id}/documents", response_model=Page[DocumentRead])
async def list_documents(agent: AgentDep, session: SessionDep, page: PageDep) -> dict[str, Any]:
    query = (
        select(Document)
        .where(Document.agent_id == agent.id)
        .order_by(Document.created_at.desc(), Document.id)
    )
    items, total = await paginate(session, query, page)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/agents/{agent_id}/documents/{document_id}", response_model=DocumentRead)
async def read_document(document: DocumentDep) -> Document:
    return document


@router.delete("/agents/{agent_id}/documents/{document_id}", status_code=204)
async def remove_document(
    document: DocumentDep, session: SessionDep, knowledge: KnowledgeDep
) -> Response:
    try:
        await delete_document(session, knowledge, document)
    except KnowledgeStoreError as exc:
        raise APIError(503, "knowledge_unavailable", str(exc)) from None
    return Response(status_code=204)


@router.post("/agents/{agent_id}/knowledge/search", response_model=KnowledgeSearchResult)
async def search_knowledge(
    body: KnowledgeSearch, agent: AgentDep, knowledge: KnowledgeDep
) -> dict[str, Any]:
    passages = await knowledge.search(
        agent.id, body.query, top_k=body.top_k, min_similarity=body.min_similarity
    )
    return {
        "query": body.query,
        "passages": [PassageRead.model_validate(p, from_attributes=True) for p in passages],
        "context": format_passages_for_prompt(passages),
    }
