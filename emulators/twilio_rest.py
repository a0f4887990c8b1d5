"""Twilio REST API emulator: the 2010-04-01 Calls and Messages resources the service uses,
with Basic auth, Twilio's parameter validation codes and its JSON success and legacy error
bodies, so the real `twilio` SDK can be pointed at it (`client.api.base_url = emu.url`).

It also plays Twilio's webhook side: `post_status_callback()` sends a form POST signed with
X-Twilio-Signature the way Twilio does (PROTOCOLS A5/A6). With a `dial_plan`
(`emulators.twilio_dialplan`) it also plays each created call's life: who answers, the
signed status and AMD callbacks, and the Media Stream of an answered call.

Of ours, imports only: emulators, utils.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from emulators.base import ThreadedServer
from emulators.twilio_dialplan import CallRunner, DialPlan
from utils import normalize_e164

API = "/2010-04-01"
Form = list[tuple[str, str]]
"""A request's form fields in order, repeated names kept."""
Action = Callable[[dict[str, str], Form], tuple[int, dict[str, Any]]]
"""What a resource does with a request's path parameters and form: (status, JSON body)."""
CALL_STATUSES = {
    "queued",
    "ringing",
    "in-progress",
    "completed",
    "busy",
    "failed",
    "no-answer",
    "canceled",
}
_ENDED = {"completed", "busy", "failed", "no-answer", "canceled"}
_CALLBACK_EVENT = {"queued": "initiated", "in-progress": "answered"}
_CALLBACK_EVENT.update({status: "completed" for status in _ENDED})
"""The StatusCallbackEvent that reports each call status (every end state is `completed`)."""


class TwilioError(Exception):
    """A request rejected the way Twilio rejects it: HTTP status plus Twilio error code."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return JSONResponse(twilio_error_body(self.status, self.code, self.message), self.status)


def twilio_error_body(status: int, code: int, message: str) -> dict[str, Any]:
    """Twilio's legacy error shape; the SDK turns it into TwilioRestException."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _rfc2822(dt: datetime) -> str:
    return format_datetime(dt)


def _is_url(value: str) -> bool:
    try:
        parsed = httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _check_number(value: str | None, *, missing: TwilioError, invalid_code: int, label: str) -> str:
    if not value:
        raise missing
    if value.startswith(("client:", "sip:")):
        return value
    try:
        return normalize_e164(value)
    except ValueError:
        raise TwilioError(400, invalid_code, f"Invalid '{label}' Phone Number: {value}") from None


class TwilioRestEmulator(ThreadedServer):
    """Calls, call updates and Messages of the Twilio 2010-04-01 REST API.

    Recorded (copies, safe to read from any thread): `calls`, `call_updates`, `messages`,
    `requests`. Each call/message record is the JSON resource returned to the client plus
    `params` (form fields, last value wins) and `form` (all pairs, in order).
    """

    name = "twilio-rest"

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "test-auth-token",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._calls: dict[str, dict[str, Any]] = {}
        self._messages: dict[str, dict[str, Any]] = {}
        self._call_updates: list[dict[str, Any]] = []
        self._recordings: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []
        self._failures: deque[TwilioError] = deque()
        self._callback_sequence: dict[str, int] = {}
        self.dial_plan: DialPlan | None = None
        self._runners: dict[str, CallRunner] = {}
        self._runner_tasks: set[asyncio.Task[None]] = set()

    # --- recorded state -----------------------------------------------------------------

    @property
    def calls(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(c) for c in self._calls.values()]

    @property
    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(m) for m in self._messages.values()]

    @property
    def call_updates(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(u) for u in self._call_updates]

    @property
    def recordings(self) -> list[dict[str, Any]]:
        """Recordings started through `Calls/{sid}/Recordings.json`, with their `params`."""
        with self.lock:
            return [dict(r) for r in self._recordings]

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self._requests]

    def get_call(self, call_sid: str) -> dict[str, Any] | None:
        with self.lock:
            call = self._calls.get(call_sid)
            return dict(call) if call else None

    # --- fault injection and state changes ----------------------------------------------

    def fail_next(
        self,
        status: int = 500,
        code: int = 20500,
        message: str = "Internal Server Error",
        count: int = 1,
    ) -> None:
        """Make the next `count` API requests fail with Twilio's legacy error body."""
        with self.lock:
            self._failures.extend(TwilioError(status, code, message) for _ in range(count))

    def set_answered_by(self, call_sid: str, answered_by: str) -> None:
        with self.lock:
            self._calls[call_sid]["answered_by"] = answered_by

    def end_call(self, call_sid: str, status: str, duration: int) -> None:
        """The call's end as the dial plan played it: status, duration and end time."""
        with self.lock:
            call = self._calls[call_sid]
            call["status"] = status
            call["duration"] = str(duration)
            call["end_time"] = call["date_updated"] = _rfc2822(datetime.now(UTC))

    def stop(self, timeout: float = 10.0) -> None:
        if self.running and self._runner_tasks:
            with contextlib.suppress(Exception):
                self.run_in_loop(self._cancel_runners(), timeout=timeout)
        super().stop(timeout)

    async def _cancel_runners(self) -> None:
        tasks = list(self._runner_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def set_call_status(self, call_sid: str, status: str) -> None:
        if status not in CALL_STATUSES:
            raise ValueError(f"unknown call status {status!r}")
        with self.lock:
            call = self._calls[call_sid]
            call["status"] = status
            call["date_updated"] = _rfc2822(datetime.now(UTC))

    # --- webhooks Twilio sends ----------------------------------------------------------

    def sign(self, url: str, params: dict[str, Any] | None = None) -> str:
        signature: str = RequestValidator(self.auth_token).compute_signature(url, params or {})
        return signature

    def call_status_params(self, call_sid: str, status: str, **extra: str) -> dict[str, str]:
        """The form fields of a call status callback for a recorded call (PROTOCOLS A6)."""
        call = self.get_call(call_sid)
        if call is None:
            raise KeyError(call_sid)
        with self.lock:
            seq = self._callback_sequence.get(call_sid, -1) + 1
            self._callback_sequence[call_sid] = seq
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call_sid,
            "CallStatus": status,
            "Direction": call["direction"],
            "From": call["from"],
            "To": call["to"],
            "Called": call["to"],
            "Caller": call["from"],
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(seq),
            "Timestamp": _rfc2822(datetime.now(UTC)),
        }
        params.update(extra)
        return params

    def post_status_callback(
        self,
        url: str,
        params: dict[str, str],
        *,
        signed_url: str | None = None,
        timeout: float = 5.0,
    ) -> httpx.Response:
        """POST `params` as a form to `url`, signed over `signed_url` (the public URL the
        app validates against; defaults to `url`)."""
        headers = {"X-Twilio-Signature": self.sign(signed_url or url, params)}
        return httpx.post(url, data=params, headers=headers, timeout=timeout)

    async def apost_status_callback(
        self,
        url: str,
        params: dict[str, str],
        *,
        signed_url: str | None = None,
        http_timeout: float = 5.0,
    ) -> httpx.Response:
        headers = {"X-Twilio-Signature": self.sign(signed_url or url, params)}
        async with httpx.AsyncClient(timeout=http_timeout) as client:
            return await client.post(url, data=params, headers=headers)

    async def notify_call_status(
        self, call_sid: str, status: str, *, signed_url: str | None = None, **extra: str
    ) -> httpx.Response | None:
        """Move a recorded call to `status` and, if the call asked for that event (Twilio's
        default is `completed` only), POST the status callback. Returns the app's response,
        or None when no callback was due."""
        self.set_call_status(call_sid, status)
        call = self.get_call(call_sid) or {}
        url = call.get("status_callback")
        events = call.get("status_callback_event") or ["completed"]
        event = _CALLBACK_EVENT.get(status, status)
        if not url or event not in events:
            return None
        params = self.call_status_params(call_sid, status, **extra)
        return await self.apost_status_callback(url, params, signed_url=signed_url)

    # --- HTTP app -----------------------------------------------------------------------

    def build_app(self) -> Starlette:
        base = API + "/Accounts/{account_sid}"
        routes = [
            Route(base + "/Calls.json", self._create_call, methods=["POST"]),
            Route(base + "/Calls.json", self._list_calls, methods=["GET"]),
            Route(base + "/Calls/{call_sid}.json", self._update_call, methods=["POST"]),
            Route(base + "/Calls/{call_sid}.json", self._fetch_call, methods=["GET"]),
            Route(
                base + "/Calls/{call_sid}/Recordings.json", self._create_recording, methods=["POST"]
            ),
            Route(base + "/Messages.json", self._create_message, methods=["POST"]),
            Route(base + "/Messages/{message_sid}.json", self._fetch_message, methods=["GET"]),
        ]
        return Starlette(routes=routes)

    async def _handle(self, request: Request, action: Action) -> Response:
        form = list((await request.form()).multi_items()) if request.method == "POST" else []
        fields: Form = [(k, str(v)) for k, v in form]
        record: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.url.path,
            "query": str(request.url.query),
            "form": fields,
            "headers": dict(request.headers),
        }
        try:
            self._authenticate(request)
            self._raise_injected_failure()
            status, body = action(request.path_params, fields)
            response: Response = JSONResponse(body, status)
        except TwilioError as exc:
            response = exc.response()
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        record["status"] = response.status_code
        with self.lock:
            self._requests.append(record)
        return response

    def _authenticate(self, request: Request) -> None:
        denied = TwilioError(401, 20003, "Authenticate")
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            raise denied
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise denied from None
        ok_user = hmac.compare_digest(user, self.account_sid)
        ok_password = hmac.compare_digest(password, self.auth_token)
        if not (ok_user and ok_password):
            raise denied
        if request.path_params.get("account_sid") != self.account_sid:
            path = request.url.path
            raise TwilioError(404, 20404, f"The requested resource {path} was not found")

    def _raise_injected_failure(self) -> None:
        with self.lock:
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            raise failure

    async def _create_call(self, request: Request) -> Response:
        return await self._handle(request, self._do_create_call)

    async def _list_calls(self, request: Request) -> Response:
        query = dict(request.query_params)
        return await self._handle(
            request, lambda path, form: self._do_list_calls(path, form, query)
        )

    async def _update_call(self, request: Request) -> Response:
        return await self._handle(request, self._do_update_call)

    async def _fetch_call(self, request: Request) -> Response:
        return await self._handle(request, self._do_fetch_call)

    async def _create_recording(self, request: Request) -> Response:
        return await self._handle(request, self._do_create_recording)

    async def _create_message(self, request: Request) -> Response:
        return await self._handle(request, self._do_create_message)

    async def _fetch_message(self, request: Request) -> Response:
        return await self._handle(request, self._do_fetch_message)

    # --- resources ----------------------------------------------------------------------

    def _resource_uri(self, kind: str, sid: str) -> str:
        return f"{API}/Accounts/{self.account_sid}/{kind}/{sid}.json"

    def _not_found(self, kind: str, sid: str) -> TwilioError:
        return TwilioError(
            404, 20404, f"The requested resource {self._resource_uri(kind, sid)} was not found"
        )

    def _do_create_call(self, path: dict[str, str], form: Form) -> tuple[int, dict[str, Any]]:
        params = dict(form)
        to = _check_number(
            params.get("To"),
            missing=TwilioError(400, 21201, "No 'To' number is specified"),
            invalid_code=21211,
            label="To",
        )
        from_ = _check_number(
            params.get("From"),
            missing=TwilioError(400, 21213, "Caller phone number is required"),
            invalid_code=21212,
            label="From",
        )
        _check_call_instructions(params)
        _check_amd(params)
        answer = None
        if self.dial_plan is not None:
            answer = self.dial_plan.answer_for(to)
            if answer.kind == "invalid":
                raise TwilioError(400, 21211, f"Invalid 'To' Phone Number: {to}")
        now = _rfc2822(datetime.now(UTC))
        sid = new_sid("CA")
        call = {
            "sid": sid,
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "date_created": now,
            "date_updated": now,
            "direction": "outbound-api",
            "from": from_,
            "from_formatted": from_,
            "to": to,
            "to_formatted": to,
            "status": "queued",
            "start_time": None,
            "end_time": None,
            "duration": None,
            "price": None,
            "price_unit": "USD",
            "answered_by": None,
            "caller_name": None,
            "forwarded_from": None,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "queue_time": "0",
            "trunk_sid": None,
            "uri": self._resource_uri("Calls", sid),
            "subresource_uris": {
                "recordings": self._resource_uri("Calls", sid)[:-5] + "/Recordings.json",
                "notifications": self._resource_uri("Calls", sid)[:-5] + "/Notifications.json",
            },
        }
        record = {
            **call,
            "url": params.get("Url"),
            "twiml": params.get("Twiml"),
            "application_sid": params.get("ApplicationSid"),
            "status_callback": params.get("StatusCallback"),
            "status_callback_event": _status_events(form),
            "params": params,
            "form": form,
        }
        with self.lock:
            self._calls[sid] = record
        if answer is not None and self.dial_plan is not None:
            runner = CallRunner(self, self.dial_plan, sid, answer)
            self._runners[sid] = runner
            task = asyncio.get_running_loop().create_task(runner.run())
            self._runner_tasks.add(task)
            task.add_done_callback(self._runner_tasks.discard)
        return 201, call

    def _do_list_calls(
        self, path: dict[str, str], form: Form, query: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        to = (query or {}).get("To")
        with self.lock:
            calls = [self._public(c) for c in self._calls.values() if not to or c["to"] == to]
        return 200, {"calls": calls, "page": 0, "page_size": 50, "next_page_uri": None}

    def _do_fetch_call(self, path: dict[str, str], form: Form) -> tuple[int, dict[str, Any]]:
        with self.lock:
            call = self._calls.get(path["call_sid"])
            if call is None:
                raise self._not_found("Calls", path["call_sid"])
            return 200, self._public(call)

    def _do_update_call(self, path: dict[str, str], form: Form) -> tuple[int, dict[str, Any]]:
        sid, params = path["call_sid"], dict(form)
        status = params.get("Status")
        if status is not None and status not in ("completed", "canceled"):
            raise TwilioError(400, 20001, f"Invalid Status: {status}")
        if "Url" in params and not _is_url(params["Url"]):
            raise TwilioError(400, 21205, f"Url is not a valid URL: {params['Url']}")
        if "Twiml" in params:
            _check_twiml(params["Twiml"])
        with self.lock:
            call = self._calls.get(sid)
            if call is None:
                raise self._not_found("Calls", sid)
            if call["status"] in _ENDED and (status is None):
                raise TwilioError(400, 21220, "Call is not in-progress. Cannot redirect.")
            self._apply_update(call, params, status)
            self._call_updates.append(
                {"time": time.time(), "sid": sid, "params": params, "form": form}
            )
            runner = self._runners.get(sid)
            if runner is not None and (status is not None or "Twiml" in params or "Url" in params):
                runner.hang_up()
            return 200, self._public(call)

    @staticmethod
    def _apply_update(call: dict[str, Any], params: dict[str, str], status: str | None) -> None:
        if status is not None and call["status"] not in _ENDED:
            call["status"] = status
            call["end_time"] = _rfc2822(datetime.now(UTC))
        for field, key in (("twiml", "Twiml"), ("url", "Url")):
            if key in params:
                call[field] = params[key]
        call["date_updated"] = _rfc2822(datetime.now(UTC))

    def _do_create_recording(self, path: dict[str, str], form: Form) -> tuple[int, dict[str, Any]]:
        # Inbound calls reach Twilio without this API, so any call sid is accepted here.
        call_sid, params = path["call_sid"], dict(form)
        now = _rfc2822(datetime.now(UTC))
        recording = {
            "sid": new_sid("RE"),
            "account_sid": self.account_sid,
            "call_sid": call_sid,
            "api_version": "2010-04-01",
            "status": "in-progress",
            "channels": 1,
            "source": "StartCallRecordingAPI",
            "date_created": now,
            "date_updated": now,
            "start_time": now,
            "uri": self._resource_uri("Calls", call_sid)[:-5] + "/Recordings.json",
        }
        with self.lock:
            self._recordings.append({**recording, "params": params})
        return 201, recording

    def _do_create_message(self, path: dict[str, str], form: Form) -> tuple[int, dict[str, Any]]:
        params = dict(form)
        to = _check_number(
            params.get("To"),
            missing=TwilioError(400, 21604, "A 'To' phone number is required."),
            invalid_code=21211,
            label="To",
        )
        sender = params.get("From") or ""
        if not sender and not params.get("MessagingServiceSid"):
            raise TwilioError(400, 21603, "A 'From' phone number is required.")
        body = params.get("Body", "")
        if not body and not params.get("MediaUrl"):
            raise TwilioError(400, 21602, "Message body is required.")
        if len(body) > 1600:
            raise TwilioError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        message = self._message_resource(to, sender, body, params)
        with self.lock:
            self._messages[message["sid"]] = {**message, "params": params, "form": form}
        return 201, message

    def _message_resource(
        self, to: str, sender: str, body: str, params: dict[str, str]
    ) -> dict[str, Any]:
        now = _rfc2822(datetime.now(UTC))
        sid = new_sid("SM")
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_updated": now,
            "date_sent": None,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender or None,
            "messaging_service_sid": params.get("MessagingServiceSid"),
            "num_media": "1" if params.get("MediaUrl") else "0",
            "num_segments": str(_sms_segments(body)),
            "price": None,
            "price_unit": "USD",
            "status": "accepted" if not sender else "queued",
            "to": to,
            "uri": self._resource_uri("Messages", sid),
            "subresource_uris": {"media": self._resource_uri("Messages", sid)[:-5] + "/Media.json"},
        }

    def _do_fetch_message(self, path: dict[str, str], form: Form) -> tuple[int, dict[str, Any]]:
        with self.lock:
            message = self._messages.get(path["message_sid"])
            if message is None:
                raise self._not_found("Messages", path["message_sid"])
            return 200, self._public(message)

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        private = {"url", "twiml", "application_sid", "status_callback"}
        private |= {"status_callback_event", "params", "form"}
        return {k: v for k, v in record.items() if k not in private}


def _sms_segments(body: str) -> int:
    # GSM-7: one segment holds 160 characters, concatenated segments 153 each
    return 1 if len(body) <= 160 else -(-len(body) // 153)


def _status_events(form: list[tuple[str, str]]) -> list[str]:
    events: list[str] = []
    for key, value in form:
        if key == "StatusCallbackEvent":
            events.extend(value.split())
    return events


def _check_call_instructions(params: dict[str, str]) -> None:
    given = [k for k in ("Url", "Twiml", "ApplicationSid") if params.get(k)]
    if not given:
        raise TwilioError(400, 21205, "A 'Url', 'Twiml' or 'ApplicationSid' parameter is required.")
    if len(given) > 1:
        raise TwilioError(
            400, 21205, "Only one of 'Url', 'Twiml' or 'ApplicationSid' may be specified."
        )
    if "Url" in given and not _is_url(params["Url"]):
        raise TwilioError(400, 21205, f"Url is not a valid URL: {params['Url']}")
    if "Twiml" in given:
        _check_twiml(params["Twiml"])
    if params.get("StatusCallback") and not _is_url(params["StatusCallback"]):
        raise TwilioError(400, 21609, "Invalid StatusCallback URL")


def _check_amd(params: dict[str, str]) -> None:
    """Answering-machine detection parameters, as Twilio checks them."""
    mode = params.get("MachineDetection")
    if mode is not None and mode not in ("Enable", "DetectMessageEnd"):
        raise TwilioError(400, 21626, f"Invalid MachineDetection: {mode}")
    async_amd = params.get("AsyncAmd")
    if async_amd is not None and async_amd not in ("true", "false"):
        raise TwilioError(400, 21626, f"Invalid AsyncAmd: {async_amd}")
    callback = params.get("AsyncAmdStatusCallback")
    if callback and not _is_url(callback):
        raise TwilioError(400, 21609, "Invalid AsyncAmdStatusCallback URL")


def _check_twiml(twiml: str) -> None:
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        raise TwilioError(400, 12100, "Document parse failure") from None
    if root.tag != "Response":
        raise TwilioError(400, 12100, "Document parse failure: root element is not <Response>")
