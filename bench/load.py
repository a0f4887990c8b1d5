"""The load generator: N concurrent call slots, each placing scripted inbound calls back to
back over real sockets until the run's duration is over.

A call is what Twilio would do: a signed POST to /twilio/voice (the call id comes back in
the TwiML <Parameter>), then a Media Stream (TwilioCaller) to /twilio/media with that call
id, then the call record is read back from GET /v1/calls/{id}.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from twilio.request_validator import RequestValidator

from bench.script import TALKSPURT_GAP_S, CallScript
from bench.stack import ACCOUNT_SID, API_KEY, AUTH_TOKEN, PUBLIC_BASE, BenchStack
from emulators.twilio_caller import CallerResult, TwilioCaller, new_sid

AGENT_NUMBER = "+14155550100"
CALLER_NUMBER = "+14155550199"
_PARAMETER = re.compile(r'<Parameter name="([^"]+)" value="([^"]*)"')


@dataclass
class CallOutcome:
    """One finished call: what the caller heard and what the server recorded."""

    slot: int
    call_id: str
    caller: CallerResult
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    refused: bool = False
    """The service was at MAX_CONCURRENT_CALLS and answered with a busy signal."""


class CallRefused(RuntimeError):
    """The voice webhook answered `<Reject reason="busy">`."""


REDIAL_AFTER_S = 30.0
"""A caller who got a busy signal calls again this much later. (Each refusal costs the
service about 8 ms of CPU, docs/benchmark-history.md, seventh round: a storm of redials
every few seconds would itself load it.)"""


@dataclass
class LoadPlan:
    calls: int
    duration_s: float
    stagger_s: float
    script: CallScript
    max_call_s: float
    """A call still running after this long hangs up (a safety net, not the script)."""


def api_client(stack: BenchStack) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=50)
    return httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=30, limits=limits)


async def create_agent(http: httpx.AsyncClient, first_message: str) -> dict[str, Any]:
    body = {
        "name": "Bench agent",
        "phone_number": AGENT_NUMBER,
        "first_message": first_message,
        "silence_timeout_seconds": 60,
    }
    response = await http.post("/v1/agents", json=body)
    response.raise_for_status()
    return dict(response.json())


async def answer_inbound(http: httpx.AsyncClient, call_sid: str) -> dict[str, str]:
    """Twilio's signed voice webhook for an inbound call; returns the stream's
    `<Parameter>`s (the call id, and the stream token where the service binds streams),
    which Twilio sends back in `start.customParameters`."""
    params = {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": CALLER_NUMBER,
        "To": AGENT_NUMBER,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    signature = RequestValidator(AUTH_TOKEN).compute_signature(
        PUBLIC_BASE + "/twilio/voice", params
    )
    response = await http.post(
        "/twilio/voice", data=params, headers={"X-Twilio-Signature": signature}
    )
    response.raise_for_status()
    if "<Reject" in response.text:
        raise CallRefused(call_sid)
    parameters = dict(_PARAMETER.findall(response.text))
    if "call_id" not in parameters:
        raise RuntimeError("voice webhook answered without a call_id parameter")
    return parameters


async def settled_detail(
    http: httpx.AsyncClient, call_id: str, wait_s: float = 15.0
) -> dict[str, Any]:
    """The call record once the pipeline has recorded its end (or as it is after wait_s)."""
    deadline = time.monotonic() + wait_s
    while True:
        body = dict((await http.get(f"/v1/calls/{call_id}")).json())
        if body.get("ended_reason") or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.2)


async def place_call(
    stack: BenchStack, http: httpx.AsyncClient, plan: LoadPlan, slot: int
) -> CallOutcome:
    call_sid = new_sid("CA")
    parameters = await answer_inbound(http, call_sid)
    call_id = parameters["call_id"]
    caller = TwilioCaller(
        stack.ws_url,
        plan.script.timeline(hangup_at=plan.max_call_s),
        auth_token=AUTH_TOKEN,
        signed_url=stack.signed_media_url,
        account_sid=ACCOUNT_SID,
        call_sid=call_sid,
        custom_parameters=parameters,
        max_duration_s=plan.max_call_s + 5,
        talkspurt_gap_s=TALKSPURT_GAP_S,
        connect_timeout_s=30,
    )
    result = await caller.run()
    return CallOutcome(slot, call_id, result)


async def run_slot(
    stack: BenchStack, http: httpx.AsyncClient, plan: LoadPlan, slot: int, ends_at: float
) -> list[CallOutcome]:
    """Calls back to back while another one (as long as the last) would end no more than
    half a call after the run's end; the first one always."""
    await asyncio.sleep(slot * plan.stagger_s)
    outcomes: list[CallOutcome] = []
    last_s = 0.0
    placed = False  # a refused call does not count as the slot's first call
    while not placed or time.monotonic() + last_s / 2 <= ends_at:
        started = time.monotonic()
        try:
            outcomes.append(await place_call(stack, http, plan, slot))
        except CallRefused:
            outcomes.append(_refused(slot))
            await asyncio.sleep(REDIAL_AFTER_S)
            continue  # a busy signal says nothing of how long a call lasts
        except (httpx.HTTPError, RuntimeError) as exc:
            outcomes.append(_failed(slot, exc))
            await asyncio.sleep(1.0)
        placed = True
        last_s = time.monotonic() - started
    return outcomes


def _refused(slot: int) -> CallOutcome:
    caller = CallerResult(account_sid=ACCOUNT_SID, call_sid="", stream_sid="", ended_by="busy")
    return CallOutcome(slot, "", caller, refused=True)


def _failed(slot: int, exc: Exception) -> CallOutcome:
    caller = CallerResult(account_sid=ACCOUNT_SID, call_sid="", stream_sid="", ended_by="error")
    return CallOutcome(slot, "", caller, error=f"{type(exc).__name__}: {exc}")


async def run_load(stack: BenchStack, plan: LoadPlan) -> list[CallOutcome]:
    """All slots concurrently, until every call has ended on both sides."""
    async with api_client(stack) as http:
        ends_at = time.monotonic() + plan.duration_s
        slots = [run_slot(stack, http, plan, i, ends_at) for i in range(plan.calls)]
        outcomes = [o for batch in await asyncio.gather(*slots) for o in batch]
    await wait_idle(stack)
    return outcomes


async def wait_idle(stack: BenchStack, wait_s: float = 30.0) -> None:
    """Until the service reports no active call (its last writes are part of the load)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if (await read_metrics(stack)).get("aisdr_calls_active", 0) == 0:
            return
        await asyncio.sleep(0.2)


async def fetch_details(stack: BenchStack, outcomes: list[CallOutcome]) -> None:
    """Every call's record from GET /v1/calls/{id} (after the measured window)."""
    async with api_client(stack) as http:
        for outcome in outcomes:
            if outcome.call_id:
                outcome.detail = await settled_detail(http, outcome.call_id)


async def read_metrics(stack: BenchStack) -> dict[str, float]:
    """GET /metrics as {sample name with labels: value} (counters, gauges)."""
    async with api_client(stack) as http:
        text = (await http.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
