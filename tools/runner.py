"""Tools the agent's LLM can call during a live call: the pipeline's `ToolRunner`.

Built-in tools, enabled per agent in `Agent.tools`::

    book_meeting    two LLM functions: check_availability (read-only) and book_meeting
    send_sms        text the caller from the agent's number (Twilio Messages API)
    transfer_call   hand the caller to the agent's transfer_number once the last words played
    end_call        hang up after a goodbye
    opt_out         put the callee on the do-not-call list and hang up (tools/opt_out.py)

plus custom HTTP tools (`HttpTool`): a signed request to the customer's URL whose answer
goes back to the LLM.

Idempotency: a side-effecting call first claims sha256(ctx.idempotency_key) in
`tool_invocations` (unique column). A repeat of a finished call returns the stored outcome,
a repeat of a failed one runs again, and a repeat while the first still runs waits for it.
Bookings are also serialised per agent, so two calls never take the same slot.

Errors never leave `run`: a failure, refusal or timeout becomes a result such as
{"error": "..."} for the LLM to talk about, and the call goes on.

Arguments and phone numbers are never logged.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.telephony import TelephonyError, TwilioGateway
from config import Settings
from models import ToolInvocation
from pipeline.contracts import AgentConfig, ToolContext, ToolOutcome
from pipeline.providers import ToolCall
from schemas import BuiltinTool, HttpTool, ToolConfig
from tools import opt_out
from tools.booking import Bookings
from tools.common import error, is_error, key_hash, refused, text_arg
from tools.http_tool import HttpTools
from utils import utcnow

log = logging.getLogger("ai_sdr.tools")

TRANSFER_LINE = "Let me transfer you now. Please hold for a moment."
GOODBYE_LINE = "Thanks for calling. Goodbye!"
SMS_MAX_CHARS = 640  # four SMS segments
WAIT_FOR_RUNNING_S = 30.0
STALE_RUNNING = timedelta(minutes=5)  # a "running" claim this old died with its process
SMS_DAY = timedelta(days=1)

_SMS_TO = {
    "type": "string",
    "description": "Another number to text, if the caller asks for one of the allowed "
    "numbers; leave it out to text the caller",
}
_TOOL_CONFIG: TypeAdapter[BuiltinTool | HttpTool] = TypeAdapter(ToolConfig)

Handler = Callable[[ToolCall, ToolContext], Awaitable[ToolOutcome]]


def _function(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def _string(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


# The schemas stay flat and short: small local models follow them best.
_SPECS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "check_availability": (
        "Find free meeting times. Call it before book_meeting, then offer the caller two or "
        "three of the free times. The result also gives today's date.",
        {
            "date": _string(
                "The day the caller wants: 2026-05-04, 'tomorrow' or 'friday'. Leave "
                "it out to get the next free times."
            )
        },
        [],
    ),
    "book_meeting": (
        "Book a meeting at a free time the caller accepted, then read the returned "
        "confirmation to the caller.",
        {
            "start_time": _string("The 'start' of the chosen free time, e.g. 2026-05-04T10:00"),
            "name": _string("The caller's name"),
            "email": _string("The caller's email address, if they gave one"),
            "notes": _string("What the meeting is about"),
        },
        ["start_time"],
    ),
    "send_sms": (
        "Send a text message to the caller's phone, for example a link or details they asked for.",
        {"message": _string("The text to send")},
        ["message"],
    ),
    "transfer_call": (
        "Transfer the caller to a human colleague when they ask for a person or you cannot "
        "help them.",
        {"reason": _string("Why the caller is being transferred")},
        [],
    ),
    "end_call": (
        "Hang up when the conversation is over.",
        {"goodbye": _string("Your last words before hanging up, e.g. 'Thanks, goodbye!'")},
        [],
    ),
}


_SPECS["opt_out"] = opt_out.SPEC


@dataclass(frozen=True, slots=True)
class _Tool:
    schema: dict[str, Any]
    handler: Handler
    once: bool  # has side effects: claim the idempotency key first
    filler: str | None


class AgentTools:
    """`ToolRunner` over the database, the Twilio gateway and an httpx client whose transport
    refuses private addresses (netguard.PublicOnlyTransport)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        twilio: TwilioGateway,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.twilio = twilio
        self.settings = settings
        self.http = http
        self.clock = clock
        self.bookings = Bookings(sessionmaker, clock)
        self.http_tools = HttpTools(http, settings)

    # --- the ToolRunner protocol ------------------------------------------------------------

    def schemas(self, config: AgentConfig) -> list[dict[str, Any]]:
        return [tool.schema for tool in self._tools_for(config).values()]

    def filler_for(self, config: AgentConfig, name: str) -> str | None:
        tool = self._tools_for(config).get(name)
        return tool.filler if tool else None

    async def run(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        tool = self._tools_for(ctx.config).get(call.name)
        if tool is None:
            return error(f"there is no tool named {call.name!r}")
        if not isinstance(call.arguments, dict):
            return error("tool arguments must be a JSON object")
        if not tool.once:
            return await self._guarded(tool, call, ctx)
        return await self._once(tool, call, ctx)

    # --- the agent's tools ------------------------------------------------------------------

    def _tools_for(self, config: AgentConfig) -> dict[str, _Tool]:
        builtins: dict[str, _Tool] = {}
        custom: dict[str, _Tool] = {}
        for raw in config.tools:
            try:
                tool = _TOOL_CONFIG.validate_python(raw)
            except ValidationError:
                log.warning("agent %s: ignoring an invalid tool configuration", config.agent_id)
                continue
            if isinstance(tool, HttpTool):
                custom[tool.name] = self._http_tool(tool)
            else:
                builtins.update(self._builtin(tool, config))
        return {**custom, **builtins}  # a built-in name wins over a custom one

    def _builtin(self, tool: BuiltinTool, config: AgentConfig) -> dict[str, _Tool]:
        handlers: dict[str, tuple[Handler, bool]] = {
            "check_availability": (self.bookings.check_availability, False),
            "book_meeting": (self.bookings.book_meeting, True),
            "send_sms": (self._send_sms, True),
            "transfer_call": (self._transfer_call, True),
            "end_call": (self._end_call, True),
            "opt_out": (partial(opt_out.opt_out, self.sessionmaker), True),
        }
        names = ["check_availability", "book_meeting"] if tool.type == "book_meeting" else []
        tools = {}
        for name in names or [tool.type]:
            description, properties, required = _SPECS[name]
            if name == tool.type and tool.description:
                description = tool.description
            handler, once = handlers[name]
            if name == "send_sms" and config.tool_limits.sms_destinations:
                properties = {**properties, "to": _SMS_TO}
            schema = _function(name, description, properties, required)
            tools[name] = _Tool(schema, handler, once, tool.filler_phrase)
        return tools

    def _http_tool(self, tool: HttpTool) -> _Tool:
        schema = {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        return _Tool(schema, partial(self.http_tools.run, tool), True, tool.filler_phrase)

    # --- running and idempotency ------------------------------------------------------------

    async def _guarded(self, tool: _Tool, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        try:
            outcome = await tool.handler(call, ctx)
        except Exception:
            log.exception("call %s: tool %s failed", ctx.config.call_id, call.name)
            outcome = error(f"the {call.name} tool failed unexpectedly")
        status = "error" if is_error(outcome.result) else "ok"
        log.info("call %s: tool %s -> %s", ctx.config.call_id, call.name, status)
        return outcome

    async def _once(self, tool: _Tool, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        key = key_hash(ctx.idempotency_key)
        existing = await self._claim(key, call, ctx)
        if existing is not None:
            return await self._replay(key, existing)
        outcome: ToolOutcome | None = None
        try:
            outcome = await self._guarded(tool, call, ctx)
        finally:
            # Recorded even when cancelled (None: failed, so a retry may run it again).
            await asyncio.shield(self._settle(key, outcome))
        return outcome

    async def _claim(self, key: str, call: ToolCall, ctx: ToolContext) -> ToolInvocation | None:
        """None when this run now owns `key`; otherwise the invocation that holds it."""
        async with self.sessionmaker() as session:
            session.add(
                ToolInvocation(
                    call_id=ctx.config.call_id,
                    tool_name=call.name,
                    idempotency_key=key,
                    arguments=json.loads(json.dumps(call.arguments, default=str)),
                )
            )
            try:
                await session.commit()
                return None
            except IntegrityError:
                await session.rollback()
            if await self._reclaim(session, key):
                return None
            return await session.scalar(
                select(ToolInvocation).where(ToolInvocation.idempotency_key == key)
            )

    async def _reclaim(self, session: AsyncSession, key: str) -> bool:
        """Take over a failed or abandoned invocation of `key`."""
        now = self.clock()
        retryable = or_(
            ToolInvocation.status == "failed",
            and_(
                ToolInvocation.status == "running", ToolInvocation.started_at < now - STALE_RUNNING
            ),
        )
        result = await session.execute(
            update(ToolInvocation)
            .where(ToolInvocation.idempotency_key == key, retryable)
            .values(status="running", started_at=now, finished_at=None, result=None)
        )
        await session.commit()
        return bool(getattr(result, "rowcount", 0))

    async def _replay(self, key: str, invocation: ToolInvocation) -> ToolOutcome:
        """The first run's outcome, waiting for it if it is still running."""
        deadline = asyncio.get_running_loop().time() + WAIT_FOR_RUNNING_S
        while invocation.status == "running" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            async with self.sessionmaker() as session:
                fresh = await session.scalar(
                    select(ToolInvocation).where(ToolInvocation.idempotency_key == key)
                )
            if fresh is None:
                return error("the earlier identical request disappeared; try again")
            invocation = fresh
        if invocation.status != "done" or invocation.result is None:
            return error("the same request is still being processed; try again shortly")
        stored = invocation.result
        return ToolOutcome(
            result=stored.get("result"),
            action=stored.get("action"),
            transfer_to=stored.get("transfer_to"),
            say=stored.get("say"),
        )

    async def _settle(self, key: str, outcome: ToolOutcome | None) -> None:
        failed = outcome is None or is_error(outcome.result)
        stored = None
        if outcome is not None:
            stored = json.loads(
                json.dumps(
                    {
                        "result": outcome.result,
                        "action": outcome.action,
                        "transfer_to": outcome.transfer_to,
                        "say": outcome.say,
                    },
                    default=str,
                )
            )
        try:
            async with self.sessionmaker() as session, session.begin():
                await session.execute(
                    update(ToolInvocation)
                    .where(ToolInvocation.idempotency_key == key)
                    .values(
                        status="failed" if failed else "done",
                        result=stored,
                        finished_at=self.clock(),
                    )
                )
        except Exception:
            log.exception("could not record a tool invocation's outcome")

    # --- telephony --------------------------------------------------------------------------

    async def _send_sms(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        message = text_arg(call.arguments, "message", SMS_MAX_CHARS)
        if not message:
            return error("message is required: the text to send")
        config = ctx.config
        sender = config.agent_number or self.settings.TWILIO_DEFAULT_FROM
        to = text_arg(call.arguments, "to", 20) or config.caller_number
        if not to or not sender:
            return error("this call has no phone number to text")
        if to != config.caller_number and to not in config.tool_limits.sms_destinations:
            return refused("sms_destination", "texts can only go to the caller's own phone")
        if why := await self._sms_budget(ctx, to):
            return why
        try:
            sid = await self.twilio.send_sms(to=to, from_=sender, body=message)
        except TelephonyError as exc:
            return error(f"the text message could not be sent ({exc.message})")
        whom = "the caller's phone" if to == config.caller_number else "the requested number"
        return ToolOutcome({"sent": True, "message_sid": sid, "to": whom})

    async def _sms_budget(self, ctx: ToolContext, to: str) -> ToolOutcome | None:
        """A refusal once this call, or this destination today, has had its texts. Counts
        the claims of texts sent or being sent, this one's included (its claim row is
        marked with the destination first)."""
        limits = ctx.config.tool_limits
        key = key_hash(ctx.idempotency_key)
        texts = select(func.count()).where(
            ToolInvocation.tool_name == "send_sms",
            ToolInvocation.status.in_(("running", "done")),
        )
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(ToolInvocation)
                .where(ToolInvocation.idempotency_key == key)
                .values(destination=to[:20])
            )
            this_call = await session.scalar(
                texts.where(ToolInvocation.call_id == ctx.config.call_id)
            )
            today = await session.scalar(
                texts.where(
                    ToolInvocation.destination == to[:20],
                    ToolInvocation.started_at >= self.clock() - SMS_DAY,
                )
            )
        if (this_call or 0) > limits.sms_per_call:
            return refused(
                "sms_per_call", f"no more texts on this call (at most {limits.sms_per_call})"
            )
        if (today or 0) > limits.sms_per_destination_per_day:
            return refused("sms_per_destination", "that number has had enough texts for today")
        return None

    async def _transfer_call(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        number = ctx.config.transfer_number
        if not number:
            return error("no transfer number is set up; offer to take a message instead")
        return ToolOutcome(
            result={"transferring": True},
            action="transfer",
            transfer_to=number,
            say=TRANSFER_LINE,
        )

    async def _end_call(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        goodbye = call.arguments.get("goodbye")
        say = str(goodbye).strip()[:300] if isinstance(goodbye, str) else GOODBYE_LINE
        return ToolOutcome(result={"ending_call": True}, action="end_call", say=say or None)
