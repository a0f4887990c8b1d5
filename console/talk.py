"""The browser test call ("Talk to this agent"): its page, and the WebSocket that carries
the page's microphone into the same `CallSession` a phone call runs in, through
`BrowserMediaStream` (`console/media.py`). The call is stored with direction `web`, admitted
like any call, and reported and analysed like a phone call.

Must not import: twilio, deepgram, ollama, chromadb, adapters, pipeline, voice_pipeline,
runtime.
Of ours, imports only: api, config, console, models, utils.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response

from api.admission import INBOUND_HOLD_S, CallAdmission
from api.console_session import read_session
from api.deps import SessionDep
from config import Settings
from console.media import BrowserMediaStream
from console.web import Signed, not_found, page
from models import Agent, Call
from utils import new_id

router = APIRouter(prefix="/console", include_in_schema=False)
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


@router.get("/agents/{agent_id}/talk")
async def talk_page(
    agent_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    agent = await session.get(Agent, agent_id)
    if agent is None:
        return not_found(request, signed, "agent", agent_id)
    return page(request, signed, "talk.html", agent=agent)


def _same_origin(websocket: WebSocket) -> bool:
    """The page that opened the socket is ours (a WebSocket is not bound by the same-origin
    policy, and SameSite cookies go with any same-site page)."""
    origin = websocket.headers.get("origin", "")
    return origin.split("://", 1)[-1] == websocket.headers.get("host", "")


@router.websocket("/agents/{agent_id}/talk/ws")
async def talk_socket(agent_id: str, websocket: WebSocket) -> None:
    """The console session and the page's own origin are required; a refusal closes the
    socket with a reason the page shows."""
    state = websocket.app.state
    settings: Settings = state.settings
    await websocket.accept()
    if read_session(websocket, settings) is None or not _same_origin(websocket):
        await websocket.close(code=POLICY_VIOLATION, reason="sign in to the console first")
        return
    admission: CallAdmission = state.admission
    async with state.db.sessionmaker() as session:
        agent = await session.get(Agent, agent_id)
        if agent is None:
            await websocket.close(code=POLICY_VIOLATION, reason="no such agent")
            return
        call = Call(
            id=new_id("call"),
            agent_id=agent.id,
            direction="web",
            from_number="browser",
            to_number=agent.phone_number or "",
            status="queued",
            variables=dict(agent.variables),
        )
        if not admission.try_admit(call.id, INBOUND_HOLD_S):
            await websocket.close(code=TRY_AGAIN_LATER, reason="at capacity: retry later")
            return
        try:
            session.add(call)
            await session.commit()
        except BaseException:
            admission.release(call.id)
            raise
    await websocket.send_text(json.dumps({"type": "started", "call_id": call.id}))
    try:
        token = state.stream_tokens.mint(call.id)  # the stream guard checks it, as for Twilio
        await state.calls.handle(BrowserMediaStream(websocket, call.id, token))
    finally:
        admission.release(call.id)
