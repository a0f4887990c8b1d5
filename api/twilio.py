"""Twilio-facing endpoints: the voice webhook (answers with TwiML that opens the Media
Stream), status and recording callbacks, and the `/twilio/media` WebSocket (its transport
and JSON codec: `api.media_stream`).

Every request is authenticated by `X-Twilio-Signature` against the public URL (Twilio signs
what it requested, not what a proxy forwards to us); a forged one gets 403 and changes nothing.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, WebSocket
from sqlalchemy import select

from adapters.telephony import (
    form_params,
    hangup_twiml,
    reject_twiml,
    say_hangup_twiml,
    signature_is_valid,
    stream_twiml,
)
from api.admission import INBOUND_HOLD_S, CallAdmission
from api.deps import SessionDep, StreamTokensDep
from api.errors import APIError
from api.media_stream import TwilioMediaStream
from api.stream_binding import TOKEN_PARAMETER
from config import Settings
from models import TERMINAL_STATUSES, Agent, Call
from store.calls import apply_status
from utils import mask_phone, new_id

log = logging.getLogger("ai_sdr.twilio")
AT_CAPACITY = "at-capacity"
"""`ended_reason` of a call refused because MAX_CONCURRENT_CALLS were up."""
router = APIRouter(prefix="/twilio", include_in_schema=False)

_MAX_FORM_FIELDS = 200


async def signed_form(request: Request) -> dict[str, Any]:
    """The webhook's form fields, once the signature over public URL + fields checks out."""
    settings: Settings = request.app.state.settings
    form = await request.form(max_fields=_MAX_FORM_FIELDS)
    params = form_params([(k, v) for k, v in form.multi_items() if isinstance(v, str)])
    url = settings.public_url(request.url.path)
    if request.url.query:
        url += "?" + request.url.query
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature_is_valid(settings.TWILIO_AUTH_TOKEN, url, params, signature):
        log.warning("rejected Twilio webhook %s: bad or missing signature", request.url.path)
        raise APIError(403, "forbidden", "invalid or missing X-Twilio-Signature")
    return params


TwilioForm = Annotated[dict[str, Any], Depends(signed_form)]


def _twiml(body: str) -> Response:
    return Response(content=body, media_type="application/xml")


def first_param(params: dict[str, Any], key: str) -> str:
    value = params.get(key, "")
    return str(value[0] if isinstance(value, list) else value)


@router.post("/voice")
async def voice_webhook(
    params: TwilioForm, session: SessionDep, request: Request, tokens: StreamTokensDep
) -> Response:
    settings: Settings = request.app.state.settings
    call_sid, called, caller = (first_param(params, k) for k in ("CallSid", "To", "From"))
    if not call_sid:
        raise APIError(422, "validation_error", "CallSid: field required", "CallSid")
    call = await session.scalar(select(Call).where(Call.twilio_call_sid == call_sid))
    admission: CallAdmission = request.app.state.admission
    if call is None:  # Twilio retries webhooks: the same CallSid reuses its row
        agent = await session.scalar(select(Agent).where(Agent.phone_number == called))
        call = Call(
            id=new_id("call"),
            agent_id=agent.id if agent else None,
            direction="inbound",
            from_number=caller[:20],
            to_number=called[:20],
            twilio_call_sid=call_sid,
            status="ringing",
            variables=dict(agent.variables) if agent else {},
        )
        session.add(call)
        if agent is None:
            call.status, call.ended_reason = "failed", "failed"
            call.error_message = "no agent is assigned to the called number"
        elif not admission.try_admit(call.id, INBOUND_HOLD_S):
            await _record_refused(request, session, call)  # one transaction, as cheap as can be
        await session.commit()
    elif call.agent_id is not None and call.ended_reason != AT_CAPACITY:
        if _streamed_or_over(call):  # a replay: the same row, and no second stream
            log.info("voice webhook replayed for call %s, which already streamed", call.id)
            return _twiml(hangup_twiml())
        if not admission.try_admit(call.id, INBOUND_HOLD_S):
            # Twilio's retry of an admitted call whose slot lapsed, now at the cap
            await _record_refused(request, session, call)
            await session.commit()
    if call.agent_id is None:
        log.info("inbound call %s to unassigned number %s", call.id, mask_phone(called))
        return _twiml(say_hangup_twiml())
    if call.ended_reason == AT_CAPACITY:  # refused now, or Twilio retrying a refused call
        return _twiml(reject_twiml())
    request.app.state.call_store.prefetch_config(call.id)
    token = tokens.mint(call.id, call_sid)
    parameters = {"call_id": call.id, TOKEN_PARAMETER: token}
    return _twiml(stream_twiml(settings.media_stream_url, parameters))


def _streamed_or_over(call: Call) -> bool:
    over = call.status in TERMINAL_STATUSES or call.ended_reason is not None
    return over or call.stream_sid is not None


async def _record_refused(request: Request, session: SessionDep, call: Call) -> None:
    """At the cap: the call is recorded as refused (busy, `at-capacity`) and reported as
    ended, in the caller's transaction; the caller answers with a busy signal."""
    call.ended_reason = AT_CAPACITY
    apply_status(call, "busy")
    request.app.state.metrics.calls_refused.labels("inbound").inc()
    log.info("inbound call %s refused: MAX_CONCURRENT_CALLS are up", call.id)
    hook = getattr(request.app.state, "call_hook", None)
    if hook is not None:
        await session.flush()  # the hook reads the call's row
        await hook(session, call, "call.ended")


@router.post("/status", status_code=204)
async def status_callback(params: TwilioForm, session: SessionDep, request: Request) -> Response:
    call = await session.scalar(
        select(Call).where(Call.twilio_call_sid == first_param(params, "CallSid"))
    )
    if call is None:
        return Response(status_code=204)  # not ours (or already deleted): nothing to move
    status = first_param(params, "CallStatus")
    duration_text = first_param(params, "CallDuration")
    duration = float(duration_text) if duration_text.isdigit() else None
    changed = apply_status(call, status, duration=duration)
    if call.status in TERMINAL_STATUSES:  # ended before (or without) its stream: free its slot
        request.app.state.admission.release(call.id)
    if not changed and status in TERMINAL_STATUSES and duration is not None:
        call.duration_seconds = duration  # Twilio's billed duration is authoritative
    if changed and call.status in TERMINAL_STATUSES and call.stream_sid is None:
        hook = getattr(request.app.state, "call_hook", None)
        if hook is not None:
            await hook(session, call, "call.ended")
    await session.commit()
    return Response(status_code=204)


@router.post("/recording", status_code=204)
async def recording_callback(params: TwilioForm, session: SessionDep) -> Response:
    call = await session.scalar(
        select(Call).where(Call.twilio_call_sid == first_param(params, "CallSid"))
    )
    if call is not None and first_param(params, "RecordingStatus") in ("completed", ""):
        call.recording_url = first_param(params, "RecordingUrl") or None
        call.recording_sid = first_param(params, "RecordingSid") or None
        await session.commit()
    return Response(status_code=204)


@router.websocket("/media")
async def media_stream(websocket: WebSocket) -> None:
    settings: Settings = websocket.app.state.settings
    signature = websocket.headers.get("x-twilio-signature", "")
    valid = signature_is_valid(settings.TWILIO_AUTH_TOKEN, settings.media_stream_url, {}, signature)
    await websocket.accept()
    if not valid:
        log.warning("rejected media stream: bad or missing X-Twilio-Signature")
        await websocket.close(code=1008, reason="invalid signature")
        return
    await websocket.app.state.calls.handle(
        TwilioMediaStream(websocket, websocket.app.state.metrics)
    )
