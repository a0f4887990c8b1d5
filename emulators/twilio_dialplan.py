"""Who answers an outbound call placed on the Twilio REST emulator, and what Twilio then
does: ring, answer (a human, a machine with a greeting and a beep, a fax) or not (no
answer, busy, failed; an invalid number is refused when the call is created), post the
signed status callbacks and the async AMD callback, and for an answered call open the
Media Stream its TwiML asks for with a scripted `TwilioCaller`. A call redirected or hung
up through the REST API ends its stream, as Twilio's does. So a whole campaign runs end to
end with no account.

    emu.dial_plan = DialPlan(app_base=server.url, public_base=PUBLIC_BASE,
                             media_url=server.ws_url + "/twilio/media")
    emu.dial_plan.script("+14155550101", Answer("no-answer"), Answer("human", timeline))

Of ours, imports only: emulators, utils.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

from emulators.twilio_caller import Action, Hangup, TwilioCaller


class TwilioRestEmulator(Protocol):
    """What a call's life needs of the REST emulator (`emulators.twilio_rest`)."""

    account_sid: str
    auth_token: str

    def get_call(self, call_sid: str) -> dict[str, Any] | None: ...
    def set_call_status(self, call_sid: str, status: str) -> None: ...
    def set_answered_by(self, call_sid: str, answered_by: str) -> None: ...
    def end_call(self, call_sid: str, status: str, duration: int) -> None: ...
    def sign(self, url: str, params: dict[str, Any] | None = None) -> str: ...
    def call_status_params(self, call_sid: str, status: str, **extra: str) -> dict[str, str]: ...


AnswerKind = Literal["human", "machine", "fax", "no-answer", "busy", "failed", "invalid"]
_ANSWERED = ("human", "machine", "fax")
_AMD_RESULT = {"human": "human", "machine": "machine_end_beep", "fax": "fax"}


@dataclass(frozen=True)
class Answer:
    """What happens to one dial of a number."""

    kind: AnswerKind
    timeline: Sequence[Action] = ()
    """The callee's side of the Media Stream (a machine's greeting and beep, a human's
    lines), relative to the stream's start."""
    ring_s: float = 0.2
    amd_after_s: float = 1.0
    """Seconds after the answer when the AMD result is posted (a machine: once its
    greeting and beep are over)."""
    answered_by: str | None = None
    """The AMD result; by default `human`, `machine_end_beep` or `fax` for the kind."""
    max_duration_s: float = 30.0


@dataclass
class DialRecord:
    """What the emulator did with one call (read from any thread)."""

    sid: str
    to: str
    kind: str
    created: float
    answered: float | None = None
    ended: float | None = None
    status: str = "queued"
    amd: str | None = None
    said: list[str] = field(default_factory=list)
    """Text of `<Say>` verbs the call was redirected to (a voicemail left)."""


class DialPlan:
    """Scripts per number (consumed in order; the last repeats). Numbers with no script
    get `default`."""

    def __init__(
        self,
        *,
        app_base: str,
        public_base: str,
        media_url: str,
        default: Answer | None = None,
        http_timeout_s: float = 10.0,
    ) -> None:
        self.app_base = app_base.rstrip("/")
        self.public_base = public_base.rstrip("/")
        self.media_url = media_url
        self.default = default or Answer("no-answer")
        self.http_timeout_s = http_timeout_s
        self._scripts: dict[str, list[Answer]] = {}
        self._next: dict[str, int] = {}
        self.records: dict[str, DialRecord] = {}
        self.on_dial: Callable[[DialRecord], None] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DialPlan:
        """From JSON (`python -m emulators --dial-plan`): `app_base`, `public_base`,
        `media_url`, `default` and `numbers` ({number: [answer, ...]}); an answer is
        {"kind", "ring_s", "amd_after_s", "hangup_s"} (the callee hangs up at `hangup_s`)."""
        plan = cls(
            app_base=data["app_base"],
            public_base=data.get("public_base", data["app_base"]),
            media_url=data["media_url"],
            default=_answer(data["default"]) if data.get("default") else None,
        )
        for number, answers in (data.get("numbers") or {}).items():
            plan.script(number, *(_answer(a) for a in answers))
        return plan

    def script(self, number: str, *answers: Answer) -> None:
        self._scripts[number] = list(answers)

    def answer_for(self, number: str) -> Answer:
        answers = self._scripts.get(number)
        if not answers:
            return self.default
        index = self._next.get(number, 0)
        self._next[number] = index + 1
        return answers[min(index, len(answers) - 1)]

    def local_url(self, url: str) -> str:
        """A callback URL on the public base, as the app under test is really reached."""
        if url.startswith(self.public_base):
            return self.app_base + url[len(self.public_base) :]
        return url


def _answer(data: dict[str, Any]) -> Answer:
    hangup = data.get("hangup_s")
    return Answer(
        kind=data["kind"],
        timeline=[Hangup(float(hangup))] if hangup is not None else [],
        ring_s=float(data.get("ring_s", 0.2)),
        amd_after_s=float(data.get("amd_after_s", 1.0)),
        answered_by=data.get("answered_by"),
    )


def stream_of(twiml: str | None) -> tuple[str, dict[str, str]] | None:
    """The `<Stream url>` and its `<Parameter>`s, if the TwiML connects one."""
    if not twiml:
        return None
    with contextlib.suppress(ET.ParseError):
        root = ET.fromstring(twiml)
        stream = root.find("./Connect/Stream")
        if stream is not None:
            params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
            return stream.get("url", ""), params
    return None


def said_in(twiml: str | None) -> list[str]:
    if not twiml:
        return []
    with contextlib.suppress(ET.ParseError):
        return [(s.text or "").strip() for s in ET.fromstring(twiml).iter("Say")]
    return []


class CallRunner:
    """Plays one call's life on the emulator's loop."""

    def __init__(self, emulator: TwilioRestEmulator, plan: DialPlan, sid: str, answer: Answer):
        self.emulator = emulator
        self.plan = plan
        self.sid = sid
        self.answer = answer
        self.caller_task: asyncio.Task[Any] | None = None
        call = emulator.get_call(sid) or {}
        self.record = DialRecord(sid, call.get("to", ""), answer.kind, time.monotonic())
        plan.records[sid] = self.record
        if plan.on_dial is not None:
            plan.on_dial(self.record)

    async def run(self) -> None:
        answer = self.answer
        await asyncio.sleep(answer.ring_s / 2)
        await self._status("ringing")
        await asyncio.sleep(answer.ring_s / 2)
        if self._ended():
            return await self._finish(None)
        if answer.kind not in _ANSWERED:
            return await self._finish(answer.kind)
        self.record.answered = time.monotonic()
        await self._status("in-progress")
        amd = asyncio.create_task(self._amd()) if self._wants_amd() else None
        try:
            await self._stream()
        finally:
            if amd is not None:
                amd.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await amd
        await self._finish("completed")

    def hang_up(self) -> None:
        """The call was redirected or hung up through the API: its stream ends."""
        call = self.emulator.get_call(self.sid) or {}
        self.record.said.extend(said_in(call.get("twiml")))
        if self.caller_task is not None:
            self.caller_task.cancel()

    def _ended(self) -> bool:
        call = self.emulator.get_call(self.sid) or {}
        return call.get("status") in ("completed", "canceled")

    def _wants_amd(self) -> bool:
        params = (self.emulator.get_call(self.sid) or {}).get("params", {})
        return bool(params.get("MachineDetection")) and bool(params.get("AsyncAmdStatusCallback"))

    async def _stream(self) -> None:
        call = self.emulator.get_call(self.sid) or {}
        stream = stream_of(call.get("twiml"))
        if stream is None:
            await asyncio.sleep(self.answer.max_duration_s)
            return
        url, parameters = stream
        caller = TwilioCaller(
            self.plan.media_url,
            self.answer.timeline,
            auth_token=self.emulator.auth_token,
            signed_url=url,
            account_sid=self.emulator.account_sid,
            call_sid=self.sid,
            custom_parameters=parameters,
            max_duration_s=self.answer.max_duration_s,
        )
        self.caller_task = asyncio.create_task(caller.run())
        with contextlib.suppress(asyncio.CancelledError):
            await self.caller_task

    async def _amd(self) -> None:
        await asyncio.sleep(self.answer.amd_after_s)
        result = self.answer.answered_by or _AMD_RESULT[self.answer.kind]
        self.record.amd = result
        self.emulator.set_answered_by(self.sid, result)
        call = self.emulator.get_call(self.sid) or {}
        url = call.get("params", {}).get("AsyncAmdStatusCallback", "")
        params = {
            "AccountSid": self.emulator.account_sid,
            "CallSid": self.sid,
            "AnsweredBy": result,
            "MachineDetectionDuration": str(int(self.answer.amd_after_s * 1000)),
        }
        await self._post(url, params)

    async def _status(self, status: str, **extra: str) -> None:
        if self._ended() and status not in ("completed",):
            return
        self.emulator.set_call_status(self.sid, status)
        self.record.status = status
        call = self.emulator.get_call(self.sid) or {}
        url = call.get("status_callback")
        events = call.get("status_callback_event") or ["completed"]
        event = {"in-progress": "answered", "queued": "initiated"}.get(status, status)
        if status in ("completed", "busy", "failed", "no-answer", "canceled"):
            event = "completed"
        if url and event in events:
            await self._post(url, self.emulator.call_status_params(self.sid, status, **extra))

    async def _finish(self, status: str | None) -> None:
        duration = 0
        if self.record.answered is not None:
            duration = max(1, round(time.monotonic() - self.record.answered))
        final = status or "completed"
        if final == "completed" and self.record.answered is None:
            final = "canceled"
        self.emulator.end_call(self.sid, final, duration)
        self.record.ended = time.monotonic()
        await self._status(final, CallDuration=str(duration))

    async def _post(self, url: str, params: dict[str, str]) -> None:
        if not url:
            return
        headers = {"X-Twilio-Signature": self.emulator.sign(url, params)}
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=self.plan.http_timeout_s) as client:
                await client.post(self.plan.local_url(url), data=params, headers=headers)
