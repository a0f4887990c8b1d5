"""Live calls: one `CallSession` per Twilio Media Stream.

Placeholder while the live-audio pipeline lands: it completes the Media Streams handshake,
records the stream start and end, and ends the call with the right reason.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from call_store import SqlCallStore

log = logging.getLogger("ai_sdr.pipeline")


class CallManager:
    def __init__(self, store: SqlCallStore) -> None:
        self.store = store
        self.active: dict[str, Any] = {}

    async def handle(self, websocket: WebSocket) -> None:
        call_id = ""
        reason = "customer-ended-call"
        try:
            while True:
                message = json.loads(await websocket.receive_text())
                event = message.get("event")
                if event == "start":
                    start = message.get("start", {})
                    call_id = start.get("customParameters", {}).get("call_id", "")
                    await self.store.stream_started(
                        call_id,
                        stream_sid=start.get("streamSid", ""),
                        call_sid=start.get("callSid", ""),
                    )
                elif event == "stop":
                    break
        except WebSocketDisconnect:
            pass
        if call_id:
            await self.store.finish(call_id, ended_reason=reason)
