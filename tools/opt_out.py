"""The built-in `opt_out` tool: the callee asked not to be called again ("stop calling me",
"take me off your list"). Their number goes on the do-not-call list, the call's
`ended_reason` becomes `opted-out` (the campaign outcome `opted_out`), and the agent
confirms politely and hangs up.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from models import Call
from pipeline.contracts import ToolContext, ToolOutcome
from pipeline.providers import ToolCall
from tools.dnc import OPTED_OUT, add_to_dnc

CONFIRMATION = (
    "Understood. I've taken your number off our list and you won't be called again. "
    "Sorry for the bother, goodbye."
)
SPEC: tuple[str, dict[str, Any], list[str]] = (
    "Call this when the person asks not to be called again, to be taken off the list, or "
    "to stop calling. Their number goes on the do-not-call list and the call ends.",
    {"reason": {"type": "string", "description": "What the person said, in a few words"}},
    [],
)


async def opt_out(
    sessionmaker: async_sessionmaker[AsyncSession], call: ToolCall, ctx: ToolContext
) -> ToolOutcome:
    config = ctx.config
    number = config.caller_number
    if not number:
        return ToolOutcome(result={"error": "this call has no phone number to take off"})
    reason = str(call.arguments.get("reason") or "opted out during a call").strip()[:500]
    async with sessionmaker() as session, session.begin():
        await add_to_dnc(session, number, reason, source="opt_out", call_id=config.call_id)
        await session.execute(
            update(Call)
            .where(Call.id == config.call_id, Call.ended_reason.is_(None))
            .values(ended_reason=OPTED_OUT)
        )
    return ToolOutcome(result={"opted_out": True}, action="end_call", say=CONFIRMATION)
