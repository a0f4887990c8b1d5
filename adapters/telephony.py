"""Twilio at the edge: TwiML builders, `X-Twilio-Signature` validation and a small REST
gateway on the twilio SDK's async client.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models, pipeline.
Of ours, imports only: nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import httpx
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
UNKNOWN_NUMBER_MESSAGE = (
    "Sorry, this number is not set up to take calls right now. Please try again later. Goodbye."
)


class TelephonyError(Exception):
    """Twilio refused or failed a request; carries Twilio's own code and message."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


# --- TwiML ------------------------------------------------------------------------------


def stream_twiml(stream_url: str, parameters: Mapping[str, str], status_callback: str = "") -> str:
    """`<Connect><Stream>`: a bidirectional Media Stream. Twilio drops query strings from
    stream URLs, so per-call values travel as `<Parameter>`s."""
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url=stream_url, status_callback=status_callback or None)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    connect.append(stream)
    response.append(connect)
    return str(response)


def say_hangup_twiml(message: str = UNKNOWN_NUMBER_MESSAGE) -> str:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


def reject_twiml() -> str:
    """`<Reject reason="busy">`: the caller hears a busy signal and the call is not answered
    (Twilio bills nothing for it)."""
    response = VoiceResponse()
    response.reject(reason="busy")
    return str(response)


def transfer_twiml(number: str, caller_id: str | None, announcement: str = "") -> str:
    response = VoiceResponse()
    if announcement:
        response.say(announcement)
    dial = response.dial(caller_id=caller_id or None, timeout=20)
    dial.number(number)
    return str(response)


# --- signatures -------------------------------------------------------------------------


def form_params(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Form fields as the SDK validator wants them: repeated names keep all values."""
    params: dict[str, Any] = {}
    for key, value in items:
        if key in params:
            previous = params[key]
            params[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            params[key] = value
    return params


def signature_is_valid(
    auth_token: str, url: str, params: Mapping[str, Any], signature: str
) -> bool:
    if not auth_token or not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


# --- REST -------------------------------------------------------------------------------


@dataclass(slots=True)
class CreatedCall:
    sid: str
    status: str


_RECORDING_SID = re.compile(r"RE[0-9a-fA-F]{32}")


@dataclass(slots=True)
class FetchedCall:
    sid: str
    status: str
    duration: float | None
    answered_by: str | None
    created_at: datetime | None


def _fetched(call: Any) -> FetchedCall:
    duration = getattr(call, "duration", None)
    return FetchedCall(
        sid=call.sid,
        status=str(call.status),
        duration=float(duration) if duration not in (None, "") else None,
        answered_by=getattr(call, "answered_by", None),
        created_at=getattr(call, "date_created", None),
    )


class TwilioGateway:
    """Twilio REST through the SDK's async client; the base URL is a setting so tests and
    the no-accounts demo reach the local emulator."""

    def __init__(self, account_sid: str, auth_token: str, base_url: str) -> None:
        self._http = AsyncTwilioHttpClient(timeout=10)
        self.client = Client(
            account_sid or "AC_unset", auth_token or "unset", http_client=self._http
        )
        self.client.api.base_url = base_url
        self.configured = bool(account_sid and auth_token)

    async def create_call(
        self,
        *,
        to: str,
        from_: str,
        twiml: str,
        status_callback: str,
        record: bool = False,
        recording_status_callback: str = "",
        amd_callback: str = "",
    ) -> CreatedCall:
        """`amd_callback`: ask for async answering-machine detection that waits for the
        end of a machine's greeting, its result POSTed there."""
        kwargs: dict[str, Any] = {
            "to": to,
            "from_": from_,
            "twiml": twiml,
            "status_callback": status_callback,
            "status_callback_event": STATUS_EVENTS,
            "status_callback_method": "POST",
        }
        if record:
            kwargs.update(record=True, recording_status_callback=recording_status_callback)
        if amd_callback:
            kwargs.update(
                machine_detection="DetectMessageEnd",
                async_amd="true",
                async_amd_status_callback=amd_callback,
                async_amd_status_callback_method="POST",
            )
        call = await self._run(self.client.calls.create_async(**kwargs))
        return CreatedCall(sid=call.sid, status=call.status)

    async def fetch_call(self, call_sid: str) -> FetchedCall:
        """The call as Twilio has it now (reconciling a call whose callbacks never came)."""
        call = await self._run(self.client.calls(call_sid).fetch_async())
        return _fetched(call)

    async def find_calls(self, *, to: str, since: datetime) -> list[FetchedCall]:
        """Calls to `to` created at or after `since` (a dial whose answer was lost)."""
        calls = await self._run(self.client.calls.list_async(to=to, limit=20))
        found = [_fetched(c) for c in calls]
        return [c for c in found if c.created_at is None or c.created_at >= since]

    async def update_call_twiml(self, call_sid: str, twiml: str) -> None:
        await self._run(self.client.calls(call_sid).update_async(twiml=twiml))

    async def hang_up(self, call_sid: str) -> None:
        if call_sid:
            await self._run(self.client.calls(call_sid).update_async(status="completed"))

    async def send_sms(self, *, to: str, from_: str, body: str) -> str:
        message = await self._run(self.client.messages.create_async(to=to, from_=from_, body=body))
        return str(message.sid)

    async def start_recording(self, call_sid: str, status_callback: str) -> None:
        await self._run(
            self.client.calls(call_sid).recordings.create_async(
                recording_status_callback=status_callback
            )
        )

    async def aclose(self) -> None:
        await self._http.close()

    # --- the pipeline's CallControl -------------------------------------------------------

    async def fetch_recording(self, recording_sid: str) -> bytes:
        """A recording's MP3 from the account's own Recordings resource, with the account's
        credentials (the stored `RecordingUrl` is never fetched: it could point anywhere)."""
        if not _RECORDING_SID.fullmatch(recording_sid):
            raise TelephonyError("not a Twilio recording SID")
        account = str(self.client.username)
        url = f"{self.client.api.base_url}/2010-04-01/Accounts/{account}/Recordings/"
        auth = (account, str(self.client.password))
        try:
            async with httpx.AsyncClient(timeout=30, auth=auth) as http:
                response = await http.get(url + recording_sid + ".mp3")
        except httpx.HTTPError as exc:
            raise TelephonyError(f"Twilio unreachable: {exc}") from None
        if response.status_code != 200:
            raise TelephonyError(
                f"Twilio answered {response.status_code}", status=response.status_code
            )
        return response.content

    async def transfer(self, call_sid: str, *, number: str, caller_id: str) -> None:
        await self.update_call_twiml(call_sid, transfer_twiml(number, caller_id))

    @staticmethod
    async def _run(awaitable: Any) -> Any:
        try:
            return await awaitable
        except TwilioRestException as exc:
            raise TelephonyError(str(exc.msg), status=exc.status, code=exc.code) from None
        except TwilioException as exc:
            raise TelephonyError(str(exc)) from None
        except (OSError, aiohttp.ClientError) as exc:
            raise TelephonyError(f"Twilio unreachable: {exc}") from None
