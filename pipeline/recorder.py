"""A call's record: the single writer from a live call to its `CallStore`.

Turns, events and fields are queued without waiting and written by one task, in order,
never on the audio path. Must not import FastAPI, SQLAlchemy, a vendor SDK, `api/` or
`store/`: it knows the store only by its protocol.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pipeline.contracts import CallStore

log = logging.getLogger("ai_sdr.pipeline")


class Recorder:
    """Queues a call's writes and hands them to the store in order (`start()`, then
    `finish()` once, which waits for everything queued)."""

    def __init__(self, store: CallStore, call_id: str, call_time: Callable[[], float]) -> None:
        self._store = store
        self._call_id = call_id
        self._call_time = call_time
        self._writes: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._turn_seq = 0

    def start(self) -> None:
        self._writer = asyncio.create_task(self._writer_loop(), name=f"writes-{self._call_id}")

    async def finish(self, ended_reason: str) -> None:
        """The call's last write; returns once all of them are done (even if cancelled)."""
        self._write("finish", {"ended_reason": ended_reason})
        self._writes.put_nowait(None)
        assert self._writer is not None
        await asyncio.shield(self._writer)

    def stream_started(self, *, stream_sid: str, call_sid: str) -> None:
        self._write("stream_started", {"stream_sid": stream_sid, "call_sid": call_sid})

    def turn(self, **fields: Any) -> None:
        """A turn of the transcript, numbered in the order turns are recorded."""
        self._turn_seq += 1
        self._write("turn", {"seq": self._turn_seq, **fields})

    def event(self, type_: str, **data: Any) -> None:
        self._write("event", (type_, data, self._call_time()))

    def fields(self, **fields: Any) -> None:
        self._write("fields", fields)

    def _write(self, kind: str, payload: Any) -> None:
        self._writes.put_nowait((kind, payload))

    async def _writer_loop(self) -> None:
        """Hand the store everything queued at once, in order, and wait for all of it: a
        burst (a turn and its events) then shares one group commit instead of one each."""
        ended = False
        while not ended:
            queued = [await self._writes.get()]
            while not self._writes.empty():
                queued.append(self._writes.get_nowait())
            ended = None in queued  # the last item: nothing is queued after it
            items = [item for item in queued if item is not None]
            # tasks start in creation order, and each queues its write in its first step
            results = await asyncio.gather(
                *(self._persist(*item) for item in items), return_exceptions=True
            )
            for (kind, _), result in zip(items, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("call %s: could not persist %s", self._call_id, kind, exc_info=result)

    async def _persist(self, kind: str, payload: Any) -> None:
        store, call_id = self._store, self._call_id
        if kind == "turn":
            await store.add_turn(call_id, **payload)
        elif kind == "event":
            await store.add_event(call_id, payload[0], payload[1], payload[2])
        elif kind == "stream_started":
            await store.stream_started(call_id, **payload)
        elif kind == "fields":
            await store.set_fields(call_id, **payload)
        elif kind == "finish":
            await store.finish(call_id, **payload)
