"""SqlCallStore's group commit: the turns and events of many live calls share transactions,
each call's rows keep their order, and one bad row costs no other row its write."""

import asyncio
import re

from sqlalchemy import event, select

from models import Agent, Call, CallEvent, TranscriptTurn
from postcall.report import load_agent
from store.calls import SqlCallStore
from store.db import Database
from tests.conftest import create_agent, post_signed


async def _database(tmp_path) -> Database:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/calls.db")
    await database.migrate()
    return database


async def _calls(database: Database, count: int) -> list[str]:
    async with database.sessionmaker() as session, session.begin():
        agent = Agent(name="Store test")
        session.add(agent)
        await session.flush()
        calls = [
            Call(agent_id=agent.id, direction="inbound", from_number="+15550100", to_number="+1555")
            for _ in range(count)
        ]
        session.add_all(calls)
    return [call.id for call in calls]


def _count_commits(database: Database) -> list[int]:
    commits: list[int] = []
    event.listen(database.engine.sync_engine, "commit", lambda conn: commits.append(1))
    return commits


async def test_concurrent_calls_share_transactions_and_keep_their_order(tmp_path):
    database = await _database(tmp_path)
    try:
        call_ids = await _calls(database, 20)
        hooked: list[tuple[str, str]] = []

        async def hook(session, call, name):
            hooked.append((call.id, name))

        store = SqlCallStore(database.sessionmaker, hook)
        commits = _count_commits(database)

        async def one_call(call_id: str) -> None:  # like CallSession's writer: one at a time
            for seq in range(1, 6):
                await store.add_turn(call_id, seq=seq, role="user", text=f"turn {seq}", start_s=0)
                await store.add_event(call_id, "barge_in", {"n": seq}, float(seq))

        await asyncio.gather(*(one_call(call_id) for call_id in call_ids))

        async with database.sessionmaker() as session:
            turns = (await session.scalars(select(TranscriptTurn))).all()
            events = (await session.scalars(select(CallEvent))).all()
        assert len(turns) == 100 and len(events) == 100
        for call_id in call_ids:
            mine = sorted((t.seq, t.text) for t in turns if t.call_id == call_id)
            assert mine == [(n, f"turn {n}") for n in range(1, 6)]
        # every turn reached the hook, inside its transaction
        assert sorted(hooked) == sorted((c, "call.transcript") for c in call_ids for _ in range(5))
        # 200 writes from 20 concurrent calls: batched, not one transaction each
        assert len(commits) < 100
    finally:
        await database.aclose()


async def test_a_commit_window_gathers_writes_that_arrive_within_it(tmp_path):
    database = await _database(tmp_path)
    try:
        call_ids = await _calls(database, 10)
        commits = _count_commits(database)

        async def staggered(store: SqlCallStore, seq: int) -> None:  # 10 ms apart
            async def one(i: int, call_id: str) -> None:
                await asyncio.sleep(0.01 * i)
                await store.add_turn(call_id, seq=seq, role="user", text="hi", start_s=0)

            await asyncio.gather(*(one(i, call_id) for i, call_id in enumerate(call_ids)))

        await staggered(SqlCallStore(database.sessionmaker, commit_window_s=0.5), seq=1)
        windowed, commits[:] = len(commits), []
        await staggered(SqlCallStore(database.sessionmaker), seq=2)
        async with database.sessionmaker() as session:
            stored = (await session.scalars(select(TranscriptTurn.seq))).all()
        assert sorted(stored) == [1] * 10 + [2] * 10
        assert windowed == 1  # all ten inside the half second: one transaction
        assert len(commits) > 1  # without the window, writes 10 ms apart do not meet
    finally:
        await database.aclose()


async def test_turns_of_different_shapes_in_one_batch_keep_every_field(tmp_path):
    """A batch of rows goes in by executemany, which takes its columns from the first row:
    a user turn (few fields) ahead of an answer (latency, `interrupted`, tool calls) must
    not cost the answer its fields, nor the reverse order give the user turn the answer's."""
    database = await _database(tmp_path)
    try:
        first, second = await _calls(database, 2)
        # agents that want no live events: the batch's turns are not flushed one by one
        store = SqlCallStore(
            database.sessionmaker, commit_window_s=0.2, live_events=lambda agent: set()
        )
        for call_id in (first, second):
            assert (await store.load_config(call_id)) is not None
        user = {"role": "user", "text": "How much is pro?", "start_s": 1.0, "stt_final_ms": 240.0}
        answer = {
            "role": "assistant",
            "text": "The pro plan is",
            "start_s": 2.0,
            "interrupted": True,
            "tool_calls": [{"name": "lookup"}],
            "stt_final_ms": 240.0,
            "llm_request_ms": 241.5,
            "first_media_ms": 705.0,
        }
        commits = _count_commits(database)
        await asyncio.gather(
            store.add_turn(first, seq=1, **user),
            store.add_turn(second, seq=1, **answer),
            store.add_turn(first, seq=2, **answer),
            store.add_turn(second, seq=2, **user),
        )
        assert len(commits) == 1  # one batch, both orders inside it
        async with database.sessionmaker() as session:
            stored = (await session.scalars(select(TranscriptTurn))).all()
        assert len(stored) == 4
        for turn in stored:
            expected = answer if turn.role == "assistant" else user
            got = {key: getattr(turn, key) for key in expected}
            assert got == expected, (turn.call_id, turn.seq)
            if turn.role == "user":  # untouched columns keep their defaults
                assert turn.interrupted is False and turn.tool_calls == []
                assert turn.first_media_ms is None
    finally:
        await database.aclose()


async def test_hooks_read_the_batch_agents_without_a_query_per_write(tmp_path):
    database = await _database(tmp_path)
    try:
        call_ids = await _calls(database, 10)
        agent_names: list[str] = []

        async def hook(session, call, name):  # what the webhook outbox does for each turn
            agent_names.append((await load_agent(session, call)).name)

        store = SqlCallStore(database.sessionmaker, hook)
        agent_selects: list[str] = []

        def count(conn, cursor, statement, *args):
            if re.search(r"FROM agents\b", statement):
                agent_selects.append(statement)

        event.listen(database.engine.sync_engine, "before_cursor_execute", count)
        await asyncio.gather(
            *(
                store.add_turn(call_id, seq=seq, role="user", text="hi", start_s=0)
                for call_id in call_ids
                for seq in (1, 2, 3)
            )
        )
        assert agent_names == ["Store test"] * 30
        # one read of the agents per batch, however many of its turns the hook sees
        assert 1 <= len(agent_selects) < 10
    finally:
        await database.aclose()


async def test_live_writes_no_hook_wants_read_no_call(tmp_path):
    """With a live-event filter, a call whose agent wants no `call.transcript` writes its
    turns without reading its call or agent; another call's turns still reach the hook."""
    database = await _database(tmp_path)
    try:
        quiet, loud = await _calls(database, 2)
        hooked: list[tuple[str, str]] = []

        async def hook(session, call, name):
            hooked.append((call.id, name))

        def live_events(agent):
            return set() if agent.id == quiet_agent else {"call.transcript"}

        async with database.sessionmaker() as session:
            quiet_agent = (await session.get(Call, quiet)).agent_id
            other = Agent(name="Wants transcripts")
            session.add(other)
            await session.flush()
            (await session.get(Call, loud)).agent_id = other.id
            await session.commit()
        store = SqlCallStore(database.sessionmaker, hook, live_events=live_events)
        assert (await store.load_config(quiet)) is not None
        assert (await store.load_config(loud)) is not None
        reads: list[str] = []

        def count(conn, cursor, statement, *args):
            if re.search(r"FROM (calls|agents)\b", statement):
                reads.append(statement)

        event.listen(database.engine.sync_engine, "before_cursor_execute", count)
        for seq in (1, 2, 3):
            await store.add_turn(quiet, seq=seq, role="user", text="hi", start_s=0)
        assert reads == [] and hooked == []
        await store.add_turn(loud, seq=1, role="user", text="hi", start_s=0)
        assert hooked == [(loud, "call.transcript")] and len(reads) == 2
        await store.finish(quiet, ended_reason="customer-ended-call")  # call changes: hooked
        assert hooked[-1] == (quiet, "call.ended")
        async with database.sessionmaker() as session:
            turns = (await session.scalars(select(TranscriptTurn))).all()
        assert sorted(t.call_id for t in turns) == sorted([quiet] * 3 + [loud])
    finally:
        await database.aclose()


async def test_a_failing_row_is_retried_alone_and_the_rest_of_its_batch_lands(tmp_path):
    database = await _database(tmp_path)
    try:
        first, second = await _calls(database, 2)
        store = SqlCallStore(database.sessionmaker)
        await store.add_turn(first, seq=1, role="assistant", text="Hello", start_s=0)
        results = await asyncio.gather(
            # a second stream for the same call reuses seq 1: renumbered after what is stored
            store.add_turn(first, seq=1, role="user", text="again", start_s=1),
            store.add_turn(second, seq=1, role="user", text="other call", start_s=0),
            store.add_event("call_missing", "barge_in", {}, 0.0),  # no such call: FK fails
            store.add_event(second, "backchannel", {"paused": True}, 1.0),
            return_exceptions=True,
        )
        assert results[0] is None and results[1] is None and results[3] is None
        assert isinstance(results[2], Exception)
        async with database.sessionmaker() as session:
            rows = (
                await session.execute(
                    select(TranscriptTurn.call_id, TranscriptTurn.seq, TranscriptTurn.text)
                )
            ).all()
            kinds = (await session.scalars(select(CallEvent.type))).all()
        assert sorted(rows) == sorted(
            [(first, 1, "Hello"), (first, 2, "again"), (second, 1, "other call")]
        )
        assert kinds == ["backchannel"]
    finally:
        await database.aclose()


async def test_the_voice_webhook_prefetches_the_config_the_media_stream_then_reads(app, client):
    """Between Twilio's webhook and its media stream, the call's configuration is loaded in
    the background: the stream's `load_config` then costs no database read."""
    await create_agent(client, phone_number="+14155550100", first_message="Hi {{call_id}}")
    params = {"CallSid": "CA" + "9" * 32, "From": "+14155550199", "To": "+14155550100"}
    response = await post_signed(client, "/twilio/voice", params)
    assert response.status_code == 200, response.text
    call_id = re.search(r'name="call_id" value="([^"]+)"', response.text).group(1)
    store = app.state.call_store
    await asyncio.wait_for(asyncio.shield(store._prefetched[call_id]), 10)

    statements: list[str] = []
    engine = app.state.db.engine.sync_engine
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        config = await store.load_config(call_id)
        assert config is not None and config.first_message == f"Hi {call_id}"
        assert statements == []  # served by the prefetch
        again = await store.load_config(call_id)  # a prefetch is used once
        assert again is not None and again.first_message == config.first_message
        assert statements  # read from the database this time
    finally:
        event.remove(engine, "before_cursor_execute", listener)
