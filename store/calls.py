"""Call records: the status lifecycle and the persistence the live pipeline uses.

The lifecycle only moves forward (`queued → ringing → in-progress → terminal`), so duplicate
or out-of-order Twilio callbacks never move a call backwards. `SqlCallStore` implements the
pipeline's `CallStore` protocol on SQLAlchemy; its writes are group-committed: one
transaction for whatever all live calls queued meanwhile.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from models import TERMINAL_STATUSES, Agent, Call, CallEvent, TranscriptTurn
from pipeline.contracts import AgentConfig, ToolLimits
from store.memory import caller_memory
from utils import render_template, utcnow

_RANK = {"queued": 0, "initiated": 0, "ringing": 1, "in-progress": 2, "answered": 2}
_TERMINAL_REASON = {"busy": "busy", "no-answer": "no-answer", "failed": "failed"}

CallHook = Callable[[AsyncSession, Call, str], Awaitable[None]]
"""Called inside the transaction that changes a call (`event` is e.g. "call.started"), so
webhook outbox rows commit atomically with the change."""

LIVE_EVENTS = ("call.transcript", "tool.called")
"""Hook events of the writes a live call makes many of (turns, tool calls)."""

LiveEventFilter = Callable[[Agent], Collection[str]]
"""Which of LIVE_EVENTS the hook acts on for an agent's calls: the others skip the hook,
and with it the batch's read of their call and agent."""


def _rank(status: str) -> int:
    return 3 if status in TERMINAL_STATUSES else _RANK.get(status, -1)


def normalize_status(status: str) -> str:
    return {"initiated": "queued", "answered": "in-progress"}.get(status, status)


def apply_status(call: Call, status: str, *, duration: float | None = None) -> bool:
    """Move `call` to `status` if that is forward; return whether anything changed."""
    if _rank(status) < 0 or _rank(status) <= _rank(call.status):
        return False
    status = normalize_status(status)
    call.status = status
    now = utcnow()
    if status == "in-progress" and call.started_at is None:
        call.started_at = now
    if status in TERMINAL_STATUSES:
        call.ended_at = call.ended_at or now
        if duration is not None:
            call.duration_seconds = duration
        elif call.started_at is not None and call.duration_seconds is None:
            call.duration_seconds = (call.ended_at - call.started_at).total_seconds()
        # A call with a media stream gets its reason from the pipeline (`finish`).
        if call.ended_reason is None and call.stream_sid is None:
            call.ended_reason = _TERMINAL_REASON.get(status) or (
                "no-answer"
                if status == "canceled" and call.direction == "outbound"
                else "customer-ended-call"
            )
    return True


async def next_turn_seq(session: AsyncSession, call_id: str) -> int:
    current = await session.scalar(
        select(func.max(TranscriptTurn.seq)).where(TranscriptTurn.call_id == call_id)
    )
    return (current or 0) + 1


PREFETCH_TTL_S = 60.0
MAX_BATCH = 200
"""Writes per group-commit transaction."""
_CALL_CHANGES = frozenset({"stream_started", "finish", "fields"})


class _Rows:
    """Turns and events of one write batch, inserted together: one Core executemany per
    table instead of the unit of work's statement and bookkeeping per object (the batch's
    rows are never read back as objects). `flush()` before anything that reads them."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.pending: dict[type[TranscriptTurn] | type[CallEvent], list[dict[str, Any]]] = {}

    def add(self, model: type[TranscriptTurn] | type[CallEvent], fields: dict[str, Any]) -> None:
        self.pending.setdefault(model, []).append(fields)

    async def flush(self) -> None:
        pending, self.pending = self.pending, {}
        if not pending:
            return
        connection = await self.session.connection()  # Core: no ORM bulk layer either
        for model, rows in pending.items():
            # An executemany takes its columns from the first row and silently drops any
            # other row's extra keys (a user turn then an answer: the answer's latency and
            # `interrupted` were lost), so each run of rows with the same keys is its own.
            for _keys, run in itertools.groupby(rows, key=lambda row: row.keys()):
                await connection.execute(insert(model), list(run))


@dataclass(slots=True)
class _Write:
    kind: str  # "turn", "event", or one of _CALL_CHANGES
    call_id: str
    fields: dict[str, Any]
    done: asyncio.Future[None] | None = None


def _settle(future: asyncio.Future[None] | None, exc: Exception | None) -> None:
    if future is None or future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


async def _noop_hook(session: AsyncSession, call: Call, event: str) -> None:
    return None


class SqlCallStore:
    """What the pipeline persists; its writes are group-committed across live calls."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        hook: CallHook | None = None,
        *,
        default_model: str = "llama3.2",
        fallback_line: str = "Sorry, could you say that again?",
        live_events: LiveEventFilter | None = None,
        commit_window_s: float = 0.0,
    ):
        """`live_events`: without it, every turn and tool call runs the hook; with it, a
        call's filter is read when its configuration loads (an agent's webhook settings
        changed mid-call apply from its next call). `commit_window_s`: how long a batch's
        first write waits for more before its transaction starts (see `_drain`)."""
        self.sessionmaker = sessionmaker
        self.hook = hook or _noop_hook
        self.live_events = live_events
        self._hooked: dict[str, frozenset[str]] = {}  # by call id, from `live_events`
        self.default_model = default_model
        self.fallback_line = fallback_line
        self._prefetched: dict[str, asyncio.Task[AgentConfig | None]] = {}
        self._queue: list[_Write] = []
        self._drainer: asyncio.Task[None] | None = None
        self.commit_window_s = commit_window_s

    def prefetch_config(self, call_id: str) -> None:
        """Start loading a call's configuration now (the voice webhook has just answered), so
        that the media stream, connecting a moment later, finds it ready: the greeting then
        waits for no database read. Unclaimed prefetches are dropped after a minute."""
        if call_id in self._prefetched:
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._load_config(call_id), name="call-config-prefetch")
        # a prefetch nobody claims may have failed: its error is read again by load_config
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._prefetched[call_id] = task
        loop.call_later(PREFETCH_TTL_S, self._drop_prefetch, call_id)

    def _drop_prefetch(self, call_id: str) -> None:
        if self._prefetched.pop(call_id, None) is not None:  # never claimed: no stream
            self._hooked.pop(call_id, None)

    async def load_config(self, call_id: str) -> AgentConfig | None:
        prefetched = self._prefetched.pop(call_id, None)
        if prefetched is not None:
            try:
                return await prefetched
            except Exception:  # read again below; a real fault will repeat and raise there
                pass
        return await self._load_config(call_id)

    async def _load_config(self, call_id: str) -> AgentConfig | None:
        """Call, agent and caller memory in one session (one pooled connection)."""
        async with self.sessionmaker() as session:
            row = (
                await session.execute(
                    select(Call, Agent)
                    .outerjoin(Agent, Agent.id == Call.agent_id)
                    .where(Call.id == call_id)
                )
            ).first()
            if row is None or row[1] is None:
                return None
            call, agent = row[0], row[1]
            if self.live_events is not None:
                self._hooked[call.id] = frozenset(self.live_events(agent))
            caller = call.from_number if call.direction == "inbound" else call.to_number
            memory = ""
            if caller:
                memory = await caller_memory(session, agent.id, caller, exclude_call=call.id)
        ours = call.to_number if call.direction == "inbound" else call.from_number
        variables = {
            **agent.variables,
            **call.variables,
            "call_id": call.id,
            "caller_number": caller,
            "agent_number": ours,
        }
        return AgentConfig(
            call_id=call.id,
            agent_id=agent.id,
            system_prompt=render_template(agent.system_prompt, variables),
            first_message=_with_disclosure(agent, variables),
            first_message_mode=agent.first_message_mode,
            voice=agent.voice,
            language=agent.language,
            llm_model=agent.llm_model or self.default_model,
            temperature=agent.temperature,
            max_call_seconds=agent.max_call_seconds,
            silence_timeout_s=agent.silence_timeout_seconds,
            end_call_phrases=list(agent.end_call_phrases),
            min_interrupt_speech_ms=agent.min_interrupt_speech_ms,
            min_interrupt_words=agent.min_interrupt_words,
            backchannel_phrases=list(agent.backchannel_phrases),
            fallback_line=agent.fallback_line or self.fallback_line,
            tools=list(agent.tools),
            direction=call.direction,
            caller_number=caller,
            agent_number=ours,
            transfer_number=agent.transfer_number or "",
            caller_memory=memory,
            variables=variables,
            tool_limits=tool_limits_of(agent.tool_limits),
            call_sid=call.twilio_call_sid or "",
            **_voicemail_fields(call, agent, variables),
        )

    async def stream_started(self, call_id: str, *, stream_sid: str, call_sid: str) -> None:
        fields = {"stream_sid": stream_sid, "call_sid": call_sid}
        await self._group_commit(_Write("stream_started", call_id, fields))

    async def add_turn(self, call_id: str, *, seq: int | None = None, **fields: Any) -> None:
        """`seq` comes from the call's session (the only writer of its turns), so the write
        transaction does no read before its first write: SQLite's single write lock is held
        for as few awaits as possible."""
        await self._group_commit(_Write("turn", call_id, {"seq": seq, **fields}))

    async def add_event(
        self, call_id: str, type_: str, data: dict[str, Any], call_time_s: float | None = None
    ) -> None:
        fields = {"type": type_, "data": data, "call_time_s": call_time_s}
        await self._group_commit(_Write("event", call_id, fields))

    # --- group commit: what every live call writes, one transaction per batch ------------

    async def _group_commit(self, write: _Write) -> None:
        """Queue `write` and wait until it is committed (or failed). One drain task writes
        whatever all calls queued meanwhile in one transaction, so under load the number of
        transactions stays flat while calls grow; alone, a write is its own transaction."""
        loop = asyncio.get_running_loop()
        write.done = loop.create_future()
        self._queue.append(write)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain(), name="call-store-writes")
        await asyncio.shield(write.done)

    async def _drain(self) -> None:
        """Write the queue, a batch per transaction. With a commit window each batch first
        waits that long: live calls write a few rows a minute each, so without it nearly
        every write is a transaction of its own, and on SQLite through aiosqlite a
        transaction costs about 1.2 ms of CPU however few its rows (a batch of 4 turns:
        1.3 ms against 2.8 ms as 4 unit-of-work flushes). Nobody on the audio path waits.
        A queue already holding a whole batch does not wait."""
        while self._queue:
            if self.commit_window_s > 0 and len(self._queue) < MAX_BATCH:
                await asyncio.sleep(self.commit_window_s)
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                await self._write_batch(batch)
            except Exception:  # one bad row must not cost the others theirs: one by one
                for write in batch:
                    await self._write_alone(write)
                continue
            for write in batch:
                _settle(write.done, None)

    async def _write_alone(self, write: _Write) -> None:
        try:
            try:
                await self._write_batch([write])
            except IntegrityError:
                if write.kind != "turn":
                    raise
                # a second stream for one call: number after what is stored
                renumbered = {**write.fields, "seq": None}
                await self._write_batch([_Write("turn", write.call_id, renumbered)])
        except Exception as exc:
            _settle(write.done, exc)
        else:
            _settle(write.done, None)

    async def _write_batch(self, batch: list[_Write]) -> None:
        async with self.sessionmaker() as session, session.begin():
            hooked = [self._live_event(write) for write in batch]
            ids = {
                write.call_id
                for write, event_name in zip(batch, hooked, strict=True)
                if event_name or write.kind in _CALL_CHANGES
            }
            calls: dict[str, Call] = {}
            if ids:
                rows = await session.scalars(select(Call).where(Call.id.in_(ids)))
                calls = {call.id: call for call in rows}
            # Agents into the identity map, held for the batch (the map's references are
            # weak): the hooks' `session.get(Agent, ...)` then runs no query of its own.
            agent_ids = {call.agent_id for call in calls.values() if call.agent_id}
            if agent_ids:
                query = select(Agent).where(Agent.id.in_(agent_ids))
                session.info["batch_agents"] = list(await session.scalars(query))
            inserts = _Rows(session)
            for write, event_name in zip(batch, hooked, strict=True):
                call = calls.get(write.call_id)
                if write.kind in _CALL_CHANGES:
                    if call is not None:
                        await inserts.flush()  # its hook reads the call's turns and events
                        await self._change_call(session, call, write)
                elif write.kind == "turn":
                    fields = {"call_id": write.call_id, **write.fields}
                    if fields["seq"] is None:
                        await inserts.flush()
                        fields["seq"] = await next_turn_seq(session, write.call_id)
                    inserts.add(TranscriptTurn, fields)
                else:
                    inserts.add(CallEvent, {"call_id": write.call_id, **write.fields})
                if call is not None and event_name:
                    await inserts.flush()  # the live event carries this very row
                    await self.hook(session, call, event_name)
            await inserts.flush()

    def _live_event(self, write: _Write) -> str | None:
        """The live event (`LIVE_EVENTS`) a turn or tool call raises, if the hook acts on it
        for this call; None otherwise, and for call changes (they raise their own)."""
        if write.kind in _CALL_CHANGES:
            return None
        if write.kind == "turn":
            event_name = "call.transcript"
        elif write.fields["type"] == "tool_called":
            event_name = "tool.called"
        else:
            return None
        hooked = self._hooked.get(write.call_id)
        return event_name if hooked is None or event_name in hooked else None

    async def _change_call(self, session: AsyncSession, call: Call, write: _Write) -> None:
        fields = write.fields
        if write.kind == "stream_started":
            call.stream_sid = fields["stream_sid"]
            call.twilio_call_sid = call.twilio_call_sid or fields["call_sid"] or None
            apply_status(call, "in-progress")
            await self.hook(session, call, "call.started")
        elif write.kind == "finish":
            call.ended_reason = call.ended_reason or fields["ended_reason"]
            apply_status(call, "completed")
            call.ended_at = fields["ended_at"] or call.ended_at or utcnow()
            if call.duration_seconds is None and call.started_at is not None:
                call.duration_seconds = (call.ended_at - call.started_at).total_seconds()
            await self.hook(session, call, "call.ended")
        else:
            for key, value in fields.items():
                setattr(call, key, value)

    async def set_fields(self, call_id: str, **fields: Any) -> None:
        await self._group_commit(_Write("fields", call_id, fields))

    async def finish(
        self, call_id: str, *, ended_reason: str, ended_at: datetime | None = None
    ) -> None:
        """The media stream ended (once per call): record why and emit `call.ended`. Calls
        that never had a stream emit it from the terminal status callback instead."""
        fields = {"ended_reason": ended_reason, "ended_at": ended_at}
        try:
            await self._group_commit(_Write("finish", call_id, fields))
        finally:
            self._hooked.pop(call_id, None)


def _voicemail_fields(call: Call, agent: Agent, variables: dict[str, Any]) -> dict[str, Any]:
    settings = agent.voicemail or {}
    return {
        "wait_for_human": call.direction == "outbound",
        "voicemail_action": settings.get("action", "hang_up"),
        "voicemail_message": render_template(settings.get("message", ""), variables).strip(),
    }


def _with_disclosure(agent: Agent, variables: dict[str, Any]) -> str:
    """The agent's first message, its disclosure line ("this call is recorded") first."""
    first = render_template(agent.first_message, variables)
    disclosure = render_template(agent.disclosure or "", variables).strip()
    return f"{disclosure} {first}".strip() if disclosure else first


def tool_limits_of(stored: dict[str, Any] | None) -> ToolLimits:
    """The agent's stored `tool_limits` over the safe defaults; unknown keys are ignored."""
    known = {name: value for name, value in (stored or {}).items() if name in _LIMIT_FIELDS}
    if "sms_destinations" in known:
        known["sms_destinations"] = tuple(str(n) for n in known["sms_destinations"] or ())
    return ToolLimits(**known)


_LIMIT_FIELDS = frozenset(ToolLimits.__dataclass_fields__)
