"""Knowledge base use cases over `knowledge.chroma` and the `documents` table: start the
store, ingest a document all or nothing, delete one, sweep what a crash left half-ingested,
and the pipeline's `Retriever` with its time budget.

Ingest order (`DocumentIngest.ingest`):

1. claim: insert the row as `processing`; the unique (agent, sha256) index makes exactly one
   of several identical uploads win, the others get `DuplicateDocument`;
2. parse and chunk in the parse worker process (`knowledge.parsing`);
3. store the chunks in Chroma (all or nothing by itself);
4. mark the row `ready`.

Any failure or cancellation after 1 removes the chunks and the row again. A crash (SIGKILL)
leaves a `processing` row and maybe chunks: `recover()` at startup removes both, and any
chunks whose document or agent no longer exists.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config import Settings
from knowledge.chroma import KnowledgeBase, format_passages_for_prompt
from knowledge.parsing import DocumentParser, ParseLimits
from models import Agent, Document
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
    knowledge = KnowledgeBase(settings, write_batch_size=settings.KNOWLEDGE_WRITE_BATCH)
    try:
        await asyncio.to_thread(knowledge.warm_up)
    except Exception:
        log.exception("knowledge base unavailable at startup; retrieval will fail until fixed")
    return knowledge


class KnowledgeRetriever:
    """The pipeline's `Retriever`: per caller turn, the agent's best passages above
    KNOWLEDGE_MIN_SIMILARITY, formatted as reference material with their sources.

    A search that takes longer than `budget_s` is given up (its thread finishes on its own):
    the answer goes on without passages, and `on_timeout` counts it."""

    def __init__(
        self,
        knowledge: KnowledgeBase,
        *,
        budget_s: float | None = None,
        on_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self.knowledge = knowledge
        self.budget_s = budget_s
        self.on_timeout = on_timeout

    async def context_for(self, agent_id: str, query: str) -> str:
        try:
            async with asyncio.timeout(self.budget_s):
                passages = await self.knowledge.search(agent_id, query)
        except TimeoutError:
            self.on_timeout()
            log.warning(
                "agent %s: retrieval passed its %.0f ms budget",
                agent_id,
                (self.budget_s or 0) * 1000,
            )
            return ""
        return format_passages_for_prompt(passages)


def clean_filename(name: str | None, default: str) -> str:
    """The last path component, without control characters, at most 300 characters."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = _UNSAFE_FILENAME.sub("", base).strip()
    return (base or default)[:300]


def parse_limits(settings: Settings) -> ParseLimits:
    return ParseLimits(
        max_bytes=settings.MAX_DOCUMENT_BYTES,
        max_pages=settings.MAX_DOCUMENT_PAGES,
        max_text_chars=settings.MAX_DOCUMENT_TEXT_CHARS,
        timeout_s=settings.DOCUMENT_PARSE_TIMEOUT_S,
    )


class DocumentIngest:
    """Ingest, delete and the startup sweep, over the database, the knowledge base and the
    parse worker. `aclose()` stops the worker."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        knowledge: KnowledgeBase,
        parser: DocumentParser,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.knowledge = knowledge
        self.parser = parser

    async def ingest(self, agent_id: str, upload: Upload) -> Document:
        document = await self._claim(agent_id, upload)
        try:
            return await self._fill(document, upload)
        except BaseException:
            await asyncio.shield(self._discard(document))
            raise

    async def _claim(self, agent_id: str, upload: Upload) -> Document:
        digest = hashlib.sha256(upload.data).hexdigest()
        document = Document(
            id=new_id("doc"),
            agent_id=agent_id,
            filename=clean_filename(upload.filename, "document"),
            content_type="application/octet-stream",  # until parsed
            size_bytes=len(upload.data),
            sha256=digest,
            chunk_count=0,
            title=upload.title or None,
            status="processing",
        )
        async with self.sessionmaker() as session:
            session.add(document)
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                existing = await session.scalar(
                    select(Document.id).where(
                        Document.agent_id == agent_id, Document.sha256 == digest
                    )
                )
                if existing is None:  # not a duplicate: the agent went, or the insert failed
                    raise KnowledgeStoreError(
                        "the document could not be saved; try again"
                    ) from None
                raise DuplicateDocument(existing) from None
        return document

    async def _fill(self, document: Document, upload: Upload) -> Document:
        parsed, chunks = await self.parser.parse(upload.data, upload.filename, upload.content_type)
        if not upload.filename:
            document.filename = f"document.{parsed.kind}"
        document.content_type = MEDIA_TYPES[parsed.kind]
        document.chunk_count = len(chunks)
        document.title = upload.title or parsed.title or None
        try:
            await self.knowledge.add_document(
                document.agent_id, document.id, chunks, source=document.filename
            )
        except Exception as exc:
            log.exception("agent %s: could not store document chunks", document.agent_id)
            raise KnowledgeStoreError("the knowledge base could not store the document") from exc
        document.status = "ready"
        try:
            async with self.sessionmaker() as session, session.begin():
                await session.execute(
                    update(Document)
                    .where(Document.id == document.id)
                    .values(
                        filename=document.filename,
                        content_type=document.content_type,
                        chunk_count=document.chunk_count,
                        title=document.title,
                        status="ready",
                    )
                )
        except SQLAlchemyError as exc:
            log.exception("agent %s: could not save a document row", document.agent_id)
            raise KnowledgeStoreError("the document could not be saved; try again") from exc
        return document

    async def _discard(self, document: Document) -> None:
        """Chunks first, then the row: a row left behind by a failure here is still
        `processing`, so the next start sweeps it."""
        try:
            await self.knowledge.delete_document(document.agent_id, document.id)
            async with self.sessionmaker() as session, session.begin():
                await session.execute(delete(Document).where(Document.id == document.id))
        except Exception:
            log.exception("could not remove unfinished document %s", document.id)

    async def recover(self) -> None:
        """At startup, before any upload: remove `processing` rows and their chunks. With
        the embedded Chroma, which no other service shares, also every chunk without a ready
        document (a crash mid-delete, duplicates removed by a migration, a deleted agent).
        Logged, not raised: the service starts either way."""
        try:
            async with self.sessionmaker() as session:
                rows = await session.execute(
                    select(Document.agent_id, Document.id, Document.status)
                )
                documents = {(agent, doc): status for agent, doc, status in rows}
                agents = set(await session.scalars(select(Agent.id)))
            removed = await asyncio.to_thread(self._sweep_chunks, documents, agents)
            async with self.sessionmaker() as session, session.begin():
                await session.execute(delete(Document).where(Document.status == "processing"))
        except Exception:
            log.exception("could not sweep half-ingested documents at startup")
            return
        unfinished = sum(1 for status in documents.values() if status == "processing")
        if removed or unfinished:
            log.warning(
                "startup sweep: removed %d unfinished documents and the chunks of %d",
                unfinished,
                removed,
            )

    def _sweep_chunks(self, documents: dict[tuple[str, str], str], agents: set[str]) -> int:
        if not self.knowledge.embedded:
            unfinished = [key for key, status in documents.items() if status == "processing"]
            for agent_id, document_id in unfinished:
                self.knowledge.delete_document_sync(agent_id, document_id)
            return len(unfinished)
        removed = 0
        for agent_id, document_ids in self.knowledge.stored_documents().items():
            if agent_id not in agents:
                self.knowledge.delete_agent_sync(agent_id)
                removed += len(document_ids)
                continue
            for document_id in document_ids:
                if documents.get((agent_id, document_id)) != "ready":
                    self.knowledge.delete_document_sync(agent_id, document_id)
                    removed += 1
        return removed

    async def aclose(self) -> None:
        await asyncio.to_thread(self.parser.close)


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
