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
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import partial
from itertools import groupby, islice
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.netguard import UnsafeURLError, check_public_url
from adapters.signing import SIGNATURE_HEADER, signature
from adapters.telephony import TelephonyError, TwilioGateway
from config import Settings
from models import Agent, Booking, ToolInvocation
from pipeline.contracts import AgentConfig, ToolContext, ToolOutcome
from pipeline.providers import ToolCall
from schemas import BuiltinTool, CalendarSettings, HttpTool, ToolConfig
from tools import opt_out
from tools.scheduling import (
    Interval,
    Slot,
    calendar_from,
    free_slots,
    horizon_end,
    local_iso,
    parse_day,
    parse_start,
    spoken_time,
    spread,
    unavailable_reason,
    zone,
    zone_label,
)
from utils import utcnow

log = logging.getLogger("ai_sdr.tools")

TRANSFER_LINE = "Let me transfer you now. Please hold for a moment."
GOODBYE_LINE = "Thanks for calling. Goodbye!"
SMS_MAX_CHARS = 640  # four SMS segments
HTTP_RESULT_MAX_BYTES = 16 * 1024  # what the LLM context can usefully take
WAIT_FOR_RUNNING_S = 30.0
STALE_RUNNING = timedelta(minutes=5)  # a "running" claim this old died with its process
SLOTS_FOR_A_DAY = 6
DAYS_OFFERED, SLOTS_PER_DAY = 3, 2
_DROPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}

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


def _error(message: str, **extra: Any) -> ToolOutcome:
    return ToolOutcome(result={"error": message, **extra})


def _is_error(result: Any) -> bool:
    return isinstance(result, dict) and "error" in result


def _text(arguments: dict[str, Any], key: str, limit: int = 500) -> str:
    value = arguments.get(key)
    return "" if value is None else str(value).strip()[:limit]


def key_hash(idempotency_key: str) -> str:
    """What tool_invocations and bookings store: fixed length, no raw arguments."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()


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
        self._booking_locks: dict[str, asyncio.Lock] = {}

    # --- the ToolRunner protocol ------------------------------------------------------------

    def schemas(self, config: AgentConfig) -> list[dict[str, Any]]:
        return [tool.schema for tool in self._tools_for(config).values()]

    def filler_for(self, config: AgentConfig, name: str) -> str | None:
        tool = self._tools_for(config).get(name)
        return tool.filler if tool else None

    async def run(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        tool = self._tools_for(ctx.config).get(call.name)
        if tool is None:
            return _error(f"there is no tool named {call.name!r}")
        if not isinstance(call.arguments, dict):
            return _error("tool arguments must be a JSON object")
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
                builtins.update(self._builtin(tool))
        return {**custom, **builtins}  # a built-in name wins over a custom one

    def _builtin(self, tool: BuiltinTool) -> dict[str, _Tool]:
        handlers: dict[str, tuple[Handler, bool]] = {
            "check_availability": (self._check_availability, False),
            "book_meeting": (self._book_meeting, True),
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
        return _Tool(schema, partial(self._http, tool), True, tool.filler_phrase)

    # --- running and idempotency ------------------------------------------------------------

    async def _guarded(self, tool: _Tool, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        try:
            outcome = await tool.handler(call, ctx)
        except Exception:
            log.exception("call %s: tool %s failed", ctx.config.call_id, call.name)
            outcome = _error(f"the {call.name} tool failed unexpectedly")
        status = "error" if _is_error(outcome.result) else "ok"
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
                return _error("the earlier identical request disappeared; try again")
            invocation = fresh
        if invocation.status != "done" or invocation.result is None:
            return _error("the same request is still being processed; try again shortly")
        stored = invocation.result
        return ToolOutcome(
            result=stored.get("result"),
            action=stored.get("action"),
            transfer_to=stored.get("transfer_to"),
            say=stored.get("say"),
        )

    async def _settle(self, key: str, outcome: ToolOutcome | None) -> None:
        failed = outcome is None or _is_error(outcome.result)
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

    # --- calendar ---------------------------------------------------------------------------

    async def _calendar(self, agent_id: str) -> CalendarSettings:
        async with self.sessionmaker() as session:
            agent = await session.get(Agent, agent_id)
        return calendar_from(agent.calendar if agent else None)

    async def _busy(self, agent_id: str, start: datetime, end: datetime) -> list[Interval]:
        async with self.sessionmaker() as session:
            rows = await session.execute(
                select(Booking.start_at, Booking.end_at).where(
                    Booking.agent_id == agent_id,
                    Booking.status != "cancelled",
                    Booking.start_at < end,
                    Booking.end_at > start,
                )
            )
            return [(row.start_at, row.end_at) for row in rows]

    async def _availability(
        self, agent_id: str, calendar: CalendarSettings, day: date | None
    ) -> dict[str, Any]:
        now = self.clock()
        today = now.astimezone(zone(calendar)).date()
        last = horizon_end(calendar, now)
        busy = await self._busy(agent_id, now - timedelta(days=1), now + timedelta(days=400))
        chosen: list[Slot] = []
        if day is not None:
            chosen = spread(free_slots(calendar, busy, now, day, day), SLOTS_FOR_A_DAY)
        result: dict[str, Any] = {
            "today": f"{today:%A} {today.isoformat()}",
            "timezone": calendar.timezone,
        }
        if not chosen:
            after = today if day is None else max(day + timedelta(days=1), today)
            if day is not None:
                result["note"] = "no free times that day; here are the next free times"
            chosen = _first_days(free_slots(calendar, busy, now, after, last))
        result["free_slots"] = [
            {"start": local_iso(slot.start, calendar), "spoken": spoken_time(slot.start, calendar)}
            for slot in chosen
        ]
        if not chosen:
            result["note"] = "no free times in the booking window"
        return result

    async def _check_availability(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        calendar = await self._calendar(ctx.config.agent_id)
        day = None
        if day_text := _text(call.arguments, "date", 40):
            today = self.clock().astimezone(zone(calendar)).date()
            try:
                day = parse_day(day_text, today)
            except ValueError as exc:
                return _error(str(exc))
        return ToolOutcome(await self._availability(ctx.config.agent_id, calendar, day))

    async def _book_meeting(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        start_text = _text(call.arguments, "start_time", 40)
        if not start_text:
            return _error("start_time is required: pass the 'start' of a free time")
        calendar = await self._calendar(ctx.config.agent_id)
        try:
            start = parse_start(start_text, calendar)
        except ValueError as exc:
            return _error(str(exc))
        lock = self._booking_locks.setdefault(ctx.config.agent_id, asyncio.Lock())
        async with lock:
            booking, reason, already = await self._insert_booking(call, ctx, calendar, start)
        if booking is None:
            alternatives = await self._availability(ctx.config.agent_id, calendar, start.date())
            return _error(reason or "that time is not available", **alternatives)
        return ToolOutcome(_confirmation(booking, calendar, already=already))

    async def _insert_booking(
        self, call: ToolCall, ctx: ToolContext, calendar: CalendarSettings, start: datetime
    ) -> tuple[Booking | None, str | None, bool]:
        """(booking, why not, whether it existed). Callers hold the agent's booking lock, so
        the conflict check and the insert cannot interleave with another booking."""
        end = start + timedelta(minutes=calendar.slot_minutes)
        buffer = timedelta(minutes=calendar.buffer_minutes)
        key = key_hash(ctx.idempotency_key)
        async with self.sessionmaker() as session, session.begin():
            nearby = list(
                await session.scalars(
                    select(Booking).where(
                        Booking.agent_id == ctx.config.agent_id,
                        Booking.status != "cancelled",
                        Booking.start_at < end + buffer,
                        Booking.end_at > start - buffer,
                    )
                )
            )
            for booking in nearby:
                same_call = booking.call_id == ctx.config.call_id and booking.start_at == start
                if same_call or booking.idempotency_key == key:
                    return booking, None, True
            busy = [(b.start_at, b.end_at) for b in nearby]
            reason = unavailable_reason(calendar, start, busy, self.clock())
            if reason:
                return None, reason, False
            booking = Booking(
                agent_id=ctx.config.agent_id,
                call_id=ctx.config.call_id,
                start_at=start,
                end_at=end,
                timezone=calendar.timezone,
                attendee_name=_text(call.arguments, "name", 200) or None,
                attendee_phone=ctx.config.caller_number[:20] or None,
                attendee_email=_text(call.arguments, "email", 320) or None,
                notes=_text(call.arguments, "notes", 2000) or None,
                idempotency_key=key,
            )
            session.add(booking)
        return booking, None, False

    # --- telephony --------------------------------------------------------------------------

    async def _send_sms(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        message = _text(call.arguments, "message", SMS_MAX_CHARS)
        if not message:
            return _error("message is required: the text to send")
        config = ctx.config
        sender = config.agent_number or self.settings.TWILIO_DEFAULT_FROM
        if not config.caller_number or not sender:
            return _error("this call has no phone number to text")
        try:
            sid = await self.twilio.send_sms(to=config.caller_number, from_=sender, body=message)
        except TelephonyError as exc:
            return _error(f"the text message could not be sent ({exc.message})")
        return ToolOutcome({"sent": True, "message_sid": sid, "to": "the caller's phone"})

    async def _transfer_call(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        number = ctx.config.transfer_number
        if not number:
            return _error("no transfer number is set up; offer to take a message instead")
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

    # --- custom HTTP tools ------------------------------------------------------------------

    async def _http(self, tool: HttpTool, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        try:
            check_public_url(str(tool.url), self.settings.ALLOW_PRIVATE_URLS)
            request = self._http_request(tool, call, ctx)
            async with asyncio.timeout(tool.timeout_seconds):
                response = await self.http.send(request, stream=True)
                try:
                    body, truncated = await _read_capped(response, HTTP_RESULT_MAX_BYTES)
                finally:
                    await response.aclose()
        except UnsafeURLError as exc:
            return _error(f"the {tool.name} tool's URL was refused: {exc}")
        except TimeoutError:
            return _error(f"{tool.name} did not answer within {tool.timeout_seconds:g} seconds")
        except httpx.HTTPError as exc:
            return _error(f"{tool.name} could not be reached ({type(exc).__name__})")
        return ToolOutcome(_http_result(tool, response, body, truncated))

    def _http_request(self, tool: HttpTool, call: ToolCall, ctx: ToolContext) -> httpx.Request:
        """The request carries the call context; the signature covers the exact bytes sent:
        the JSON body, or for GET and DELETE the query string."""
        config = ctx.config
        context = {
            "tool": tool.name,
            "call_id": config.call_id,
            "agent_id": config.agent_id,
            "caller_number": config.caller_number,
        }
        headers = {k: v for k, v in tool.headers.items() if k.lower() not in _DROPPED_HEADERS}
        headers["X-Idempotency-Key"] = key_hash(ctx.idempotency_key)
        if tool.method in ("GET", "DELETE"):
            params = {**context, **{k: _param(v) for k, v in call.arguments.items()}}
            request = self.http.build_request(
                tool.method,
                httpx.URL(str(tool.url)).copy_merge_params(params),
                headers=headers,
                timeout=tool.timeout_seconds,
            )
            signed = request.url.query
        else:
            body = json.dumps({**context, "arguments": call.arguments}, separators=(",", ":"))
            headers["Content-Type"] = "application/json"
            request = self.http.build_request(
                tool.method,
                str(tool.url),
                content=body.encode(),
                headers=headers,
                timeout=tool.timeout_seconds,
            )
            signed = request.content
        secret = self.settings.WEBHOOK_SIGNING_SECRET
        request.headers[SIGNATURE_HEADER] = signature(secret, signed, int(time.time()))
        return request


def _param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


def _http_result(tool: HttpTool, response: httpx.Response, body: bytes, truncated: bool) -> Any:
    text = body.decode(response.encoding or "utf-8", errors="replace")
    if response.status_code >= 400:
        return {"error": f"{tool.name} answered HTTP {response.status_code}", "detail": text[:300]}
    if not truncated:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text + (" [truncated]" if truncated else "")


def _first_days(slots: list[Slot]) -> list[Slot]:
    """A couple of slots from each of the first few days that have any."""
    days = groupby(slots, key=lambda slot: slot.start.date())
    chosen: list[Slot] = []
    for _, day in islice(days, DAYS_OFFERED):
        chosen += spread(list(day), SLOTS_PER_DAY)
    return chosen


def _confirmation(booking: Booking, calendar: CalendarSettings, *, already: bool) -> dict[str, Any]:
    when = spoken_time(booking.start_at, calendar)
    label = zone_label(calendar)
    sentence = (
        f"That meeting is already booked for {when}, {label}."
        if already
        else f"You're booked for {when}, {label}."
    )
    return {
        "booked": True,
        "booking_id": booking.id,
        "start": local_iso(booking.start_at, calendar),
        "when": when,
        "timezone": calendar.timezone,
        "confirmation": sentence,
    }
