"""Plumbing for work that follows a call's state change: run a callback once the transaction
commits, compose several `CallHook`s into one, and own background tasks so that shutdown
cancels them (no task outlives the app).

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb, pipeline, postcall.outbox, postcall.dispatcher, postcall.analysis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from models import Call
from store.calls import CallHook

log = logging.getLogger("ai_sdr.post_call")

_PENDING = "after_commit_callbacks"


def after_commit(session: AsyncSession, callback: Callable[[], object]) -> None:
    """Call `callback` (synchronous, cheap: it should only schedule work) after the
    session's current transaction commits; a rollback discards it."""
    sync_session = session.sync_session
    if _PENDING not in sync_session.info:
        event.listen(sync_session, "after_commit", _run_pending)
        event.listen(sync_session, "after_rollback", _drop_pending)
        sync_session.info[_PENDING] = []
    sync_session.info[_PENDING].append(callback)


def _run_pending(sync_session: Session) -> None:
    callbacks, sync_session.info[_PENDING] = sync_session.info[_PENDING], []
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a follow-up must never turn a committed change into an error
            log.exception("after-commit callback failed")


def _drop_pending(sync_session: Session) -> None:
    sync_session.info[_PENDING] = []


def compose_hooks(*hooks: CallHook) -> CallHook:
    """One CallHook running `hooks` in order, inside the same transaction."""

    async def composed(session: AsyncSession, call: Call, event_name: str) -> None:
        for hook in hooks:
            await hook(session, call, event_name)

    return composed


class TaskSet:
    """Background tasks owned by one component; `aclose()` cancels and awaits them."""

    def __init__(self, name: str, on_done: Callable[[], object] | None = None) -> None:
        self.name = name
        self.on_done = on_done
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def keys(self) -> set[str]:
        """The keys of the tasks still running."""
        return set(self._tasks)

    def spawn(self, key: str, coro: Coroutine[Any, Any, Any]) -> bool:
        """Start `coro` under `key` unless a task with that key is still running."""
        if key in self._tasks:
            coro.close()
            return False
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{key}")
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        return True

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task %s failed", self.name, key, exc_info=task.exception())
        if self.on_done is not None:
            self.on_done()

    async def wait(self, grace_s: float) -> None:
        """Give running tasks up to `grace_s` seconds to finish on their own."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace_s)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
