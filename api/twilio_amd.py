"""`POST /twilio/amd`: Twilio's asynchronous answering-machine detection result for an
outbound call (`AsyncAmdStatusCallback`), signed like every Twilio webhook.

A call with its media stream live in this process hears of it through its session
(`CallSession.answered_by`): `human` starts the pitch, `machine_end_beep`,
`machine_end_silence` and `machine_end_other` leave the agent's voicemail message in its
own voice after the beep (or just hang up) with `ended_reason` `voicemail`, `fax` hangs up.
A call with no live session here (its stream not up yet) is ended through Twilio
instead: redirected to TwiML that says the message and hangs up, or hung up.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from adapters.telephony import TelephonyError, TwilioGateway, say_hangup_twiml
from api.deps import SessionDep
from api.twilio import TwilioForm, first_param
from models import TERMINAL_STATUSES, Agent, Call, CallEvent
from pipeline.voicemail import FAX, MACHINE_RESULTS, VOICEMAIL
from utils import render_template

log = logging.getLogger("ai_sdr.twilio")
router = APIRouter(prefix="/twilio", include_in_schema=False)


@router.post("/amd", status_code=204)
async def amd_callback(params: TwilioForm, session: SessionDep, request: Request) -> Response:
    call = await session.scalar(
        select(Call).where(Call.twilio_call_sid == first_param(params, "CallSid"))
    )
    answered_by = first_param(params, "AnsweredBy")[:40]
    if call is None or not answered_by:
        return Response(status_code=204)
    call.answered_by = answered_by
    duration = first_param(params, "MachineDetectionDuration")
    session.add(
        CallEvent(
            call_id=call.id,
            type="amd",
            data={
                "answered_by": answered_by,
                "detection_ms": int(duration) if duration.isdigit() else None,
            },
        )
    )
    twiml = None
    calls = request.app.state.calls
    if call.status not in TERMINAL_STATUSES and calls.control(
        call.id, lambda session: session.answered_by(answered_by)
    ):
        await session.commit()
        return Response(status_code=204)
    if call.status not in TERMINAL_STATUSES and answered_by in MACHINE_RESULTS | {FAX}:
        agent = await session.get(Agent, call.agent_id) if call.agent_id else None
        settings = (agent.voicemail if agent else None) or {}
        call.ended_reason = call.ended_reason or (VOICEMAIL if answered_by != FAX else "fax")
        if answered_by != FAX and settings.get("action") == "leave_message":
            variables = {**(agent.variables if agent else {}), **call.variables}
            message = render_template(settings.get("message", ""), variables).strip()
            twiml = say_hangup_twiml(message) if message else None
        sid = call.twilio_call_sid or ""
        await session.commit()
        await _end(request.app.state.twilio, sid, twiml, call.id)
        return Response(status_code=204)
    await session.commit()
    return Response(status_code=204)


async def _end(twilio: TwilioGateway, call_sid: str, twiml: str | None, call_id: str) -> None:
    try:
        if twiml is not None:
            await twilio.update_call_twiml(call_sid, twiml)  # Twilio says it, then hangs up
        else:
            await twilio.hang_up(call_sid)
    except TelephonyError as exc:
        log.warning("call %s: could not end after AMD (Twilio %s)", call_id, exc.code)
