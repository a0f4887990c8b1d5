"""The browser test call's media transport: a console page's WebSocket as the pipeline's
`MediaTransport`, beside the Twilio one (`api/media_stream.py`), feeding the same
`CallSession`.

Wire format (ours; the page's `talk.js` speaks it):
- page -> service: binary messages are caller audio, mu-law 8 kHz mono (the page resamples
  its microphone from the AudioContext's rate); text messages are JSON: `{"type": "start"}`
  once, `{"type": "mark", "name"}` when the audio queued before a mark has played,
  `{"type": "dtmf", "digit"}` and `{"type": "stop"}`.
- service -> page: binary messages are agent audio, mu-law 8 kHz; text messages are JSON
  `{"type": "mark", "name"}` (echo it once played) and `{"type": "clear"}` (drop the queued
  audio now and echo the marks behind it), as Twilio's Media Streams do.

Oversize or malformed messages are ignored.

Must not import: twilio, deepgram, ollama, chromadb, sqlalchemy, adapters, voice_pipeline,
runtime, store.
Of ours, imports only: pipeline.contracts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from pipeline.contracts import MediaSink, StreamStart

log = logging.getLogger("ai_sdr.console")

MAX_AUDIO_BYTES = 8000
"""One second of mu-law: a page sends 20 ms frames."""
MAX_TEXT_CHARS = 4096


class BrowserMediaStream:
    """One browser test call's WebSocket as a `MediaTransport`."""

    def __init__(self, websocket: WebSocket, call_id: str, stream_token: str) -> None:
        self.websocket = websocket
        self.call_id = call_id
        self.stream_token = stream_token

    async def start(self) -> StreamStart | None:
        while (message := await self._receive()) is not None:
            if isinstance(message, dict) and message.get("type") == "start":
                return StreamStart(
                    stream_sid=f"web-{self.call_id}",
                    call_sid="",
                    parameters={"call_id": self.call_id, "stream_token": self.stream_token},
                )
            if isinstance(message, dict) and message.get("type") == "stop":
                return None
        return None

    async def run(self, sink: MediaSink) -> None:
        while (message := await self._receive()) is not None:
            if isinstance(message, bytes):
                if message:
                    sink.on_audio(message)
            elif message.get("type") == "mark":
                sink.on_mark(str(message.get("name", ""))[:100])
            elif message.get("type") == "dtmf":
                if digit := str(message.get("digit", ""))[:1]:
                    sink.on_dtmf(digit)
            elif message.get("type") == "stop":
                return

    async def _receive(self) -> bytes | dict[str, Any] | None:
        """The next audio frame or JSON object; None once the page has gone."""
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            data = message.get("bytes")
            if data is not None:
                if len(data) <= MAX_AUDIO_BYTES:
                    return bytes(data)
                continue
            text = message.get("text") or ""
            if len(text) > MAX_TEXT_CHARS:
                continue
            try:
                parsed = json.loads(text)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                return parsed

    async def send_audio(self, audio: bytes | bytearray) -> None:
        await self.websocket.send_bytes(bytes(audio))

    async def send_mark(self, name: str) -> None:
        await self.websocket.send_text(json.dumps({"type": "mark", "name": name}))

    async def send_clear(self) -> None:
        await self.websocket.send_text('{"type":"clear"}')

    async def close(self, code: int = 1000) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            await self.websocket.close(code=code)
