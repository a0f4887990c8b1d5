"""api.media_stream.TwilioMediaStream, the Twilio JSON codec behind the pipeline's
`MediaTransport`, over a real ASGI WebSocket (Starlette's test client): the handshake
becomes a `StreamStart`, inbound messages become sink calls, malformed ones are counted
and ignored, and what the pipeline sends goes out as Twilio's `media`, `mark` and `clear`.
(The live-call tests cover it under uvicorn, with and without `MediaStreamProtocol`.)"""

from __future__ import annotations

import base64
import json
from typing import Any

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from api.media_stream import TwilioMediaStream
from pipeline.contracts import MediaSink, StreamStart
from pipeline.metrics import PipelineMetrics

STREAM_SID = "MZ" + "a" * 32
CALL_SID = "CA" + "b" * 32
OUR_AUDIO = bytes(range(256)) * 3  # any mu-law bytes: 96 ms


class Recorded:
    def __init__(self) -> None:
        self.metrics = PipelineMetrics()
        self.start: StreamStart | None = None
        self.audio: list[bytes] = []
        self.marks: list[str] = []
        self.digits: list[str] = []
        self.run_returned = False

    def malformed(self) -> float:
        text = self.metrics.render().decode()
        line = next(x for x in text.splitlines() if x.startswith("aisdr_malformed_messages_total"))
        return float(line.split()[-1])


def _client(recorded: Recorded) -> TestClient:
    async def media(websocket: WebSocket) -> None:
        await websocket.accept()
        transport = TwilioMediaStream(websocket, recorded.metrics)
        recorded.start = await transport.start()
        if recorded.start is None:
            await transport.close(1008)
            return
        await transport.send_audio(bytearray(OUR_AUDIO))
        await transport.send_mark("s1c1.0")
        await transport.send_clear()
        sink = MediaSink(
            on_audio=recorded.audio.append,
            on_mark=recorded.marks.append,
            on_dtmf=recorded.digits.append,
        )
        await transport.run(sink)
        recorded.run_returned = True
        await transport.close(1000)

    return TestClient(Starlette(routes=[WebSocketRoute("/media", media)]))


def _start(**custom: str) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "streamSid": STREAM_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": custom,
            },
            "streamSid": STREAM_SID,
        }
    )


def _media(audio: bytes, **media: Any) -> str:
    body = {"track": "inbound", "payload": base64.b64encode(audio).decode(), **media}
    return json.dumps({"event": "media", "streamSid": STREAM_SID, "media": body})


def test_a_stream_is_decoded_into_the_sink_and_sends_twilio_messages() -> None:
    recorded = Recorded()
    with _client(recorded) as client, client.websocket_connect("/media") as ws:
        ws.send_text('{"event":"mark","mark":{"name":"early"}}')  # before start: skipped
        ws.send_text(json.dumps({"event": "connected", "protocol": "Call"}))
        ws.send_text(_start(call_id="call_123", campaign="spring"))
        sent = [json.loads(ws.receive_text()) for _ in range(3)]
        for message in [
            _media(b"\x7f" * 160),
            _media(b"\x01" * 160, track="outbound"),  # not the caller's: ignored
            _media(b""),  # empty: nothing to hear
            json.dumps({"event": "mark", "mark": {"name": "s1c1.0"}}),
            json.dumps({"event": "dtmf", "dtmf": {"digit": "42"}}),  # one digit a message
            json.dumps({"event": "dtmf", "dtmf": {}}),  # no digit: ignored
            json.dumps({"event": "something-new"}),  # unknown: ignored
            _media(b"\x02" * 160),
        ]:
            ws.send_text(message)
        ws.send_text(json.dumps({"event": "stop", "stop": {}}))
        closed = ws.receive()

    assert recorded.start == StreamStart(
        stream_sid=STREAM_SID,
        call_sid=CALL_SID,
        parameters={"call_id": "call_123", "campaign": "spring"},
    )
    assert [m["event"] for m in sent] == ["media", "mark", "clear"]
    assert all(m["streamSid"] == STREAM_SID for m in sent)
    assert base64.b64decode(sent[0]["media"]["payload"]) == OUR_AUDIO
    assert sent[1]["mark"] == {"name": "s1c1.0"}
    assert recorded.audio == [b"\x7f" * 160, b"\x02" * 160]
    assert recorded.marks == ["s1c1.0"]
    assert recorded.digits == ["4"]
    assert recorded.run_returned and closed["code"] == 1000
    assert recorded.malformed() == 0


def test_malformed_messages_are_counted_and_ignored() -> None:
    recorded = Recorded()
    with _client(recorded) as client, client.websocket_connect("/media") as ws:
        ws.send_text("not json at all")  # before start: skipped, not counted
        ws.send_text(_start(call_id="call_123"))
        for _ in range(3):
            ws.receive_text()
        for junk in [
            "not json",
            "[1, 2]",
            '{"event":"media","media":{"payload":"%%%not-base64"}}',
            json.dumps({"event": "media", "media": {"payload": "A" * 100_000}}),  # oversize
            '{"event":"mark","mark":"s1c1.0"}',
            '{"event":"dtmf","dtmf":["1"]}',
            '{"event":"media","media":"oops"}',  # no media object: ignored, uncounted
        ]:
            ws.send_text(junk)
        ws.send_text(_media(b"\x7f" * 160))  # the stream goes on
        ws.send_bytes(json.dumps({"event": "stop"}).encode())  # a binary frame is read too
        closed = ws.receive()

    assert recorded.audio == [b"\x7f" * 160]
    assert recorded.marks == [] and recorded.digits == []
    assert recorded.malformed() == 6
    assert recorded.run_returned and closed["code"] == 1000


def test_a_stream_stopped_before_it_started_is_refused() -> None:
    recorded = Recorded()
    with _client(recorded) as client, client.websocket_connect("/media") as ws:
        ws.send_text(json.dumps({"event": "connected", "protocol": "Call"}))
        ws.send_text(json.dumps({"event": "stop", "stop": {}}))
        closed = ws.receive()

    assert recorded.start is None
    assert closed["code"] == 1008


def test_a_start_without_its_body_is_refused() -> None:
    recorded = Recorded()
    with _client(recorded) as client, client.websocket_connect("/media") as ws:
        ws.send_text(json.dumps({"event": "start", "start": "MZ123"}))
        closed = ws.receive()

    assert recorded.start is None
    assert closed["code"] == 1008
