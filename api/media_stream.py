"""The Twilio Media Stream as a `MediaTransport`: the Starlette WebSocket and the Twilio JSON
codec (`connected`, `start`, `media`, `mark`, `dtmf`, `stop` in; `media`, `mark`, `clear`
out, base64 mu-law inside).

The pipeline sees only decoded media: caller audio, returned marks and keypad digits go to
its `MediaSink`, and it sends audio, marks and clears. This is the hot path, 50 inbound
messages a second per call: under `api.media_ws.MediaStreamProtocol` the text messages are
handed over as uvicorn reads them (no task switch per message) and decoded here at once,
with orjson; outbound `media` messages reuse a prefix built once per stream.

A malformed message (oversize, not JSON, not an object, bad base64) is counted in
`malformed_messages` and ignored; unknown events are ignored silently.

Must not import voice_pipeline, store/, SQLAlchemy or a vendor SDK.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from api.media_ws import TEXT_SINK
from pipeline.contracts import MediaSink, StreamStart
from pipeline.metrics import PipelineMetrics

log = logging.getLogger("ai_sdr.media_stream")

MAX_MESSAGE_CHARS = 64 * 1024


def _ignore(_: object) -> None:
    """The sink before `run()`: nothing is decoded before then."""


class TwilioMediaStream:
    """One Twilio Media Stream over Starlette's WebSocket, as the pipeline's `MediaTransport`."""

    def __init__(self, websocket: WebSocket, metrics: PipelineMetrics) -> None:
        self.websocket = websocket
        self._metrics = metrics
        self._tag = ""  # the call id, for logs
        self._stream_sid = ""
        self._media_prefix = ""
        self._ended: asyncio.Future[None] | None = None
        self._on_audio: Callable[[bytes], None] = _ignore
        self._on_mark: Callable[[str], None] = _ignore
        self._on_dtmf: Callable[[str], None] = _ignore

    # --- inbound ------------------------------------------------------------------------

    async def start(self) -> StreamStart | None:
        """Read until `start`; `connected` and early messages are skipped, unparsed ones
        too (not counted: the call is not known yet)."""
        while (text := await self._receive_text()) is not None:
            try:
                message = json.loads(text) if len(text) <= MAX_MESSAGE_CHARS else None
            except ValueError:
                message = None
            if not isinstance(message, dict):
                continue
            if message.get("event") == "start":
                return self._opened(message.get("start"))
            if message.get("event") == "stop":
                return None
        return None

    def _opened(self, start: Any) -> StreamStart | None:
        if not isinstance(start, dict):
            return None
        params = start.get("customParameters")
        parameters = {str(k): str(v) for k, v in params.items()} if isinstance(params, dict) else {}
        self._tag = parameters.get("call_id", "")[:40]
        self._stream_sid = sid = str(start.get("streamSid", ""))
        self._media_prefix = (
            f'{{"event":"media","streamSid":{json.dumps(sid)},"media":{{"payload":"'
        )
        return StreamStart(
            stream_sid=sid, call_sid=str(start.get("callSid", "")), parameters=parameters
        )

    async def run(self, sink: MediaSink) -> None:
        """Decode messages into `sink` until `stop` or the disconnect. Where uvicorn runs
        `MediaStreamProtocol`, messages are pushed to `_on_pushed` as they are read and
        this only waits for the end: a `stop`, the disconnect, or the sink raising."""
        self._on_audio, self._on_mark, self._on_dtmf = sink.on_audio, sink.on_mark, sink.on_dtmf
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ended = ended  # before subscribing: messages queued so far arrive at once
        if not self._subscribe():
            self._ended = None
            await self._read_messages()
            return
        reader = asyncio.create_task(self._read_until_end(ended), name="receive-rest")
        try:
            await ended
        finally:
            self._ended = None
            reader.cancel()

    async def _read_messages(self) -> None:
        while (text := await self._receive_text()) is not None:
            if self._on_text(text):
                return

    async def _read_until_end(self, ended: asyncio.Future[None]) -> None:
        """While subscribed: what still comes through `receive()` (the disconnect, a binary
        message) ends `ended` the way the read loop would end."""
        try:
            await self._read_messages()
        except Exception as exc:
            if not ended.done():
                ended.set_exception(exc)
        else:
            if not ended.done():
                ended.set_result(None)

    def _on_pushed(self, text: str) -> None:
        ended = self._ended
        if ended is None or ended.done():
            return  # the call is ending: later messages are not its to handle
        try:
            if self._on_text(text):
                ended.set_result(None)
        except Exception as exc:  # the sink failed: `run()` raises it
            ended.set_exception(exc)

    def _on_text(self, text: str) -> bool:
        """Decode one message into the sink; True at the stream's `stop`."""
        message = self._parse(text)
        if message is None:
            return False
        event = message.get("event")
        if event == "media":
            self._media(message)
        elif event == "mark":
            self._mark(message)
        elif event == "dtmf":
            self._dtmf(message)
        elif event == "stop":
            return True
        return False

    def _parse(self, text: str) -> dict[str, Any] | None:
        if len(text) > MAX_MESSAGE_CHARS:
            self._malformed("oversize message")
            return None
        try:
            message = orjson.loads(text)  # 50 a second per call: a quarter of json's time
        except orjson.JSONDecodeError:
            self._malformed("invalid JSON")
            return None
        if not isinstance(message, dict):
            self._malformed("not a JSON object")
            return None
        return message

    def _malformed(self, why: str) -> None:
        self._metrics.malformed_messages.inc()
        log.warning("call %s: ignored media stream message (%s)", self._tag, why)

    def _media(self, message: dict[str, Any]) -> None:
        media = message.get("media")
        if not isinstance(media, dict) or media.get("track", "inbound") != "inbound":
            return
        try:
            frame = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            self._malformed("bad base64 payload")
            return
        if frame:
            self._on_audio(frame)

    def _mark(self, message: dict[str, Any]) -> None:
        body = message.get("mark") or {}
        if not isinstance(body, dict):
            self._malformed("mark is not an object")
            return
        self._on_mark(str(body.get("name", "")))

    def _dtmf(self, message: dict[str, Any]) -> None:
        body = message.get("dtmf") or {}
        if not isinstance(body, dict):
            self._malformed("dtmf is not an object")
            return
        if digit := str(body.get("digit", ""))[:1]:
            self._on_dtmf(digit)

    # --- outbound -----------------------------------------------------------------------

    async def send_audio(self, audio: bytes | bytearray) -> None:
        media = self._media_prefix + base64.b64encode(audio).decode() + '"}}'
        await self.websocket.send_text(media)

    async def send_mark(self, name: str) -> None:
        mark = {"event": "mark", "streamSid": self._stream_sid, "mark": {"name": name}}
        await self.websocket.send_text(json.dumps(mark))

    async def send_clear(self) -> None:
        await self.websocket.send_text(
            json.dumps({"event": "clear", "streamSid": self._stream_sid})
        )

    async def close(self, code: int = 1000) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            await self.websocket.close(code=code)

    # --- the WebSocket ------------------------------------------------------------------

    async def _receive_text(self) -> str | None:
        """The next message as text, or None once the peer has gone."""
        try:
            message = await self.websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        if message.get("text") is not None:
            return str(message["text"])
        return (message.get("bytes") or b"").decode("utf-8", errors="replace")

    def _subscribe(self) -> bool:
        """Text messages to `_on_pushed` as uvicorn reads them, where the server runs
        `media_ws.MediaStreamProtocol`; False (nothing changes) elsewhere."""
        hook = self.websocket.scope.get("extensions", {}).get(TEXT_SINK)
        if hook is None:
            state = self.websocket.app.state
            if not getattr(state, "told_media_protocol", False):
                state.told_media_protocol = True
                log.info(
                    "media streams are read through ASGI receive(): start uvicorn with "
                    "--ws api.media_ws:MediaStreamProtocol (as run.sh does) for ~15 us less CPU "
                    "per message"
                )
            return False
        hook(self._on_pushed)
        return True
