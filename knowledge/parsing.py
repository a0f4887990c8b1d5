"""Document parsing off the service's process: `DocumentParser` runs `documents.parse_document`
and `chunk_document` in a worker process (pebble's `ProcessPool`, spawned), so a hostile
document costs a worker, never the event loop or a live call.

Bounds, all enforced in the worker:

- time: past `timeout_s` the worker is killed (SIGTERM, then SIGKILL) and replaced, and the
  upload fails with `DocumentTooComplex`;
- CPU priority: the worker runs at `nice` 10, so the calls in the main process come first on
  a busy machine;
- memory: the worker's address space is capped (`MEMORY_LIMIT_BYTES`); a document that needs
  more fails the same way;
- pages and extracted text: the limits `parse_document` takes.

Must not import FastAPI, SQLAlchemy, chromadb or anything that loads a model: the spawned
worker imports this module.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool

from knowledge.documents import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PAGES,
    DEFAULT_MAX_TEXT_CHARS,
    Chunk,
    DocumentError,
    DocumentTooComplex,
    EmptyDocument,
    ParsedDocument,
    chunk_document,
    parse_document,
)

log = logging.getLogger("ai_sdr.knowledge.parsing")

WORKER_NICE = 10
MEMORY_LIMIT_BYTES = 2 * 1024**3
"""Address space of a parse worker: Python, pypdf and bs4 need ~0.3 GB; a 10 MB document's
text and sections fit several times over in the rest."""
TASKS_PER_WORKER = 50  # then a fresh process: whatever a document left in the heap goes


@dataclass(frozen=True, slots=True)
class ParseLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pages: int = DEFAULT_MAX_PAGES
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    timeout_s: float = 20.0


def _init_worker() -> None:
    os.nice(WORKER_NICE)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):  # not every platform lets a process cap itself
        pass


def parse_and_chunk(
    data: bytes, filename: str | None, content_type: str | None, limits: ParseLimits
) -> tuple[ParsedDocument, list[Chunk]]:
    """What the worker runs: the parsed document and its chunks (at least one)."""
    try:
        parsed = parse_document(
            data,
            filename=filename,
            content_type=content_type,
            max_bytes=limits.max_bytes,
            max_pages=limits.max_pages,
            max_text_chars=limits.max_text_chars,
        )
    except MemoryError:
        raise DocumentTooComplex("document needs too much memory to read") from None
    chunks = chunk_document(parsed)
    if not chunks:
        raise EmptyDocument("document has no text to index")
    return parsed, chunks


class DocumentParser:
    """One worker process, started at the first document and kept for the next ones. Parses
    queue behind each other: uploads are rare, and a second worker would only take CPU from
    the calls."""

    def __init__(self, limits: ParseLimits, *, workers: int = 1) -> None:
        self.limits = limits
        self._workers = workers
        self._pool: ProcessPool | None = None

    def _get_pool(self) -> ProcessPool:
        if self._pool is None:
            self._pool = ProcessPool(
                max_workers=self._workers,
                max_tasks=TASKS_PER_WORKER,
                initializer=_init_worker,
                context=multiprocessing.get_context("spawn"),
            )
        return self._pool

    async def parse(
        self, data: bytes, filename: str | None, content_type: str | None
    ) -> tuple[ParsedDocument, list[Chunk]]:
        """Raises `DocumentError` (a subclass) for a document that is bad or too costly.
        Cancelling the caller kills the worker's run."""
        future = self._get_pool().schedule(
            parse_and_chunk,
            args=(data, filename, content_type, self.limits),
            timeout=self.limits.timeout_s,
        )
        try:
            return await asyncio.wrap_future(future)
        except DocumentError:
            raise
        except TimeoutError:
            raise DocumentTooComplex(
                f"document took longer than {self.limits.timeout_s:g} s to read"
            ) from None
        except (ProcessExpired, MemoryError) as exc:
            log.warning("a document parse worker died (%s)", type(exc).__name__)
            raise DocumentTooComplex("document could not be read within the limits") from None

    def close(self) -> None:
        """Stop the worker, killing a parse still running. Blocking: briefly."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # type: ignore[no-untyped-call]  # pebble 5.2.3 is unannotated
            pool.join(timeout=5)
