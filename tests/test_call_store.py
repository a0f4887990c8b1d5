"""SqlCallStore's group commit: the turns and events of many live calls share transactions,
each call's rows keep their order, and one bad row costs no other row its write."""

import asyncio

from sqlalchemy import event, select

from call_store import SqlCallStore
from db import Database
from models import Agent, Call, CallEvent, TranscriptTurn


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
