"""Knowledge base use cases over `knowledge_chroma` and the `documents` table: start the
store, ingest a document all or nothing, delete one, and the pipeline's `Retriever`.

Ingest order: parse and chunk (off the loop), store the chunks in Chroma (all or nothing by
itself), then commit the `documents` row; if that commit fails or is cancelled, the chunks
are removed again, so no document is ever half in the knowledge base.

Errors: `documents.DocumentError` subclasses for bad input, `DuplicateDocument`, and
`KnowledgeStoreError` when Chroma fails.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from knowledge.chroma import KnowledgeBase, format_passages_for_prompt
from knowledge.documents import Chunk, EmptyDocument, ParsedDocument, chunk_document, parse_document
from models import Document
from utils import new_id

log = logging.getLogger("ai_sdr.knowledge")

MEDIA_TYPES = {
    "text": "text/plain",
    "markdown": "text/markdown",
    "pdf": "application/pdf",
    "html": "text/html",
}
_UNSAFE_FILENAME = re.compile(r"[\x00-\x1f\x7f]")


class DuplicateDocument(Exception):
    def __init__(self, document_id: str) -> None:
        super().__init__(document_id)
        self.document_id = document_id


class KnowledgeStoreError(Exception):
    """Chroma could not store or remove chunks; the knowledge base is unchanged."""


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes
    filename: str | None
    content_type: str | None
    title: str | None = None


async def start_knowledge(settings: Settings) -> KnowledgeBase:
    """The knowledge base with its embedding model loaded (seconds, in a thread). A missing
    model or unreachable Chroma is logged, not fatal: calls still work without retrieval."""
    knowledge = KnowledgeBase(settings)
    try:
        await asyncio.to_thread(knowledge.warm_up)
    except Exception:
        log.exception("knowledge base unavailable at startup; retrieval will fail until fixed")
    return knowledge


class KnowledgeRetriever:
    """The pipeline's `Retriever`: per caller turn, the agent's best passages above
    KNOWLEDGE_MIN_SIMILARITY, formatted as reference material with their sources."""

    def __init__(self, knowledge: KnowledgeBase) -> None:
        self.knowledge = knowledge

    async def context_for(self, agent_id: str, query: str) -> str:
        return format_passages_for_prompt(await self.knowledge.search(agent_id, query))


def clean_filename(name: str | None, default: str) -> str:
    """The last path component, without control characters, at most 300 characters."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = _UNSAFE_FILENAME.sub("", base).strip()
    return (base or default)[:300]


def _parse(upload: Upload, max_bytes: int) -> tuple[ParsedDocument, list[Chunk]]:
    parsed = parse_document(
        upload.data,
        filename=upload.filename,
        content_type=upload.content_type,
        max_bytes=max_bytes,
    )
    chunks = chunk_document(parsed)
    if not chunks:
        raise EmptyDocument("document has no text to index")
    return parsed, chunks


async def ingest_document(
    session: AsyncSession,
    knowledge: KnowledgeBase,
    agent_id: str,
    upload: Upload,
    *,
    max_bytes: int,
) -> Document:
    parsed, chunks = await asyncio.to_thread(_parse, upload, max_bytes)
    digest = hashlib.sha256(upload.data).hexdigest()
    duplicate = await session.scalar(
        select(Document.id).where(Document.agent_id == agent_id, Document.sha256 == digest)
    )
    if duplicate is not None:
        raise DuplicateDocument(duplicate)
    document = Document(
        id=new_id("doc"),
        agent_id=agent_id,
        filename=clean_filename(upload.filename, f"document.{parsed.kind}"),
        content_type=MEDIA_TYPES[parsed.kind],
        size_bytes=len(upload.data),
        sha256=digest,
        chunk_count=len(chunks),
        title=(upload.title or parsed.title or None),
    )
    try:
        await knowledge.add_document(agent_id, document.id, chunks, source=document.filename)
    except Exception as exc:
        log.exception("agent %s: could not store document chunks", agent_id)
        raise KnowledgeStoreError("the knowledge base could not store the document") from exc
    try:
        session.add(document)
        await session.commit()
    except BaseException as exc:
        await asyncio.shield(_remove_chunks(knowledge, agent_id, document.id))
        if isinstance(exc, SQLAlchemyError):
            log.exception("agent %s: could not save a document row", agent_id)
            await session.rollback()
            raise KnowledgeStoreError("the document could not be saved; try again") from exc
        raise
    return document


async def _remove_chunks(knowledge: KnowledgeBase, agent_id: str, document_id: str) -> None:
    try:
        await knowledge.delete_document(agent_id, document_id)
    except Exception:
        log.exception("could not remove the chunks of unsaved document %s", document_id)


async def delete_document(
    session: AsyncSession, knowledge: KnowledgeBase, document: Document
) -> None:
    """Chunks first: if Chroma fails the row stays, so the delete can be retried."""
    try:
        await knowledge.delete_document(document.agent_id, document.id)
    except Exception as exc:
        log.exception("could not remove the chunks of document %s", document.id)
        raise KnowledgeStoreError("the knowledge base could not remove the document") from exc
    await session.delete(document)
    await session.commit()
