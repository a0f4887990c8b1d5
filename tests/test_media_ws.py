"""api.media_ws.MediaStreamProtocol under a real uvicorn, with a bare ASGI app and a real
WebSocket client: a subscribed connection's text messages reach the sink in order (those
queued before the subscription first), everything else still reaches `receive()`, and a
sink that raises fails the connection with 1011."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from typing import Any

import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.protocol import OPEN
from websockets.uri import parse_uri

from api.media_ws import TEXT_SINK
from emulators.base import ThreadedServer


class SinkServer(ThreadedServer):
    """Reads `before` messages with receive(), waits `settle_s` (more arrive and queue),
    subscribes, then reads receive() until the disconnect."""

    name = "sink-app"
    ws_protocol = "api.media_ws:MediaStreamProtocol"

    def __init__(self, *, before: int = 0, settle_s: float = 0.0, fail_on: str = "") -> None:
        super().__init__()
        self.before, self.settle_s, self.fail_on = before, settle_s, fail_on
        self.pushed: list[str] = []
        self.received: list[dict[str, Any]] = []
        self.subscribed: bool | None = None
        self.done = threading.Event()

    def _sink(self, text: str) -> None:
        if text == self.fail_on:
            raise ValueError("a bug in the sink")
        self.pushed.append(text)

    def build_app(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "websocket":
                return
            await receive()
            await send({"type": "websocket.accept"})
            try:
                for _ in range(self.before):
                    self.received.append(await receive())
                await asyncio.sleep(self.settle_s)
                subscribe = scope["extensions"].get(TEXT_SINK)
                self.subscribed = subscribe is not None
                if subscribe is not None:
                    subscribe(self._sink)
                while True:
                    message = await receive()
                    self.received.append(message)
                    if message["type"] == "websocket.disconnect":
                        return
            finally:
                self.done.set()

        return app

    def wait_done(self, timeout: float = 5.0) -> None:
        assert self.done.wait(timeout), "the app did not see the disconnect"


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "websocket.receive" and "text" in m]


async def test_text_goes_to_the_sink_in_order_and_the_rest_through_receive() -> None:
    server = SinkServer(before=2, settle_s=0.3).start()
    try:
        async with websockets.connect(server.ws_url + "/media") as ws:
            for n in range(10):  # 2 read with receive(); the rest queue or wait in the kernel
                await ws.send(f"early {n}")
            await asyncio.sleep(0.6)  # the app has subscribed
            for n in range(20):
                await ws.send(f"late {n}")
            await ws.send(b"\x00\x01binary")
            await asyncio.sleep(0.1)
        server.wait_done()
    finally:
        server.stop()

    assert server.subscribed is True
    assert _texts(server.received) == ["early 0", "early 1"]
    assert server.pushed == [f"early {n}" for n in range(2, 10)] + [f"late {n}" for n in range(20)]
    binaries = [m.get("bytes") for m in server.received if m.get("bytes")]
    assert binaries == [b"\x00\x01binary"]
    assert server.received[-1]["type"] == "websocket.disconnect"


async def test_a_sink_that_raises_fails_the_connection_with_1011() -> None:
    server = SinkServer(fail_on="boom").start()
    try:
        async with websockets.connect(server.ws_url + "/media") as ws:
            await asyncio.sleep(0.2)
            await ws.send("fine")
            await ws.send("boom")
            await ws.send("never seen")
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        server.wait_done()
    finally:
        server.stop()

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert server.pushed == ["fine"]
    assert server.received[-1]["type"] == "websocket.disconnect"


async def test_under_plain_uvicorn_there_is_no_subscription() -> None:
    server = SinkServer()
    server.ws_protocol = "websockets-sansio"
    server.start()
    try:
        async with websockets.connect(server.ws_url + "/media") as ws:
            await asyncio.sleep(0.2)
            await ws.send("hello")
        server.wait_done()  # the disconnect comes after "hello"
    finally:
        server.stop()

    assert server.subscribed is False
    assert _texts(server.received) == ["hello"] and server.pushed == []


async def _raw_client(url: str) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """websockets' sans-I/O client over a plain socket, so the test decides how the bytes
    are cut into reads."""
    protocol = ClientProtocol(parse_uri(url))
    protocol.send_request(protocol.connect())
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"".join(protocol.data_to_send()))
    while protocol.state is not OPEN:
        protocol.receive_data(await asyncio.wait_for(reader.read(65536), 5))
    protocol.events_received()
    return protocol, reader, writer


async def _close_code(protocol: Any, reader: asyncio.StreamReader) -> int | None:
    """Read until the server closes the socket; the code of its close frame, if any."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            data += chunk
    protocol.receive_data(data)
    closes = [e for e in protocol.events_received() if e.opcode is Opcode.CLOSE]
    return int.from_bytes(bytes(closes[0].data)[:2], "big") if closes else None


async def test_frames_cut_anywhere_mixed_with_control_and_fragmented_frames() -> None:
    """Whole text frames take the protocol's own framing; the rest go whole to websockets.
    Cut into reads of 1 to 700 bytes, every message still arrives once, in order. (Before
    the takeover the messages go through websockets' parser, as under plain uvicorn.)"""
    server = SinkServer(before=1, settle_s=0.3).start()
    rng = random.Random(7)
    texts = [f"message {n} " + "x" * rng.choice([3, 100, 200, 400]) for n in range(60)]
    texts[30] = "big " + "y" * 70_000  # a 64-bit length
    texts[40] = "h\u00e9llo \u2603"  # multi-byte UTF-8
    try:
        protocol, reader, writer = await _raw_client(server.ws_url + "/media")
        protocol.send_text(b"first, before the subscription")
        writer.write(b"".join(protocol.data_to_send()))
        await asyncio.sleep(0.1)
        head = texts[0].encode()
        protocol.send_text(head)
        pending = b"".join(protocol.data_to_send())
        writer.write(pending[:5])  # a frame cut in two across the subscription
        await asyncio.sleep(0.5)
        writer.write(pending[5:])  # the read ends between frames: the takeover
        await asyncio.sleep(0.1)
        stream = b""
        for n, text in enumerate(texts[1:], start=1):
            if n == 10:
                protocol.send_text(b"frag", fin=False)
                protocol.send_continuation(b"mented ", fin=False)
                protocol.send_continuation(b"message", fin=True)
            if n == 20:
                protocol.send_ping(b"are you there")
            if n == 25:
                protocol.send_binary(b"\x01\x02")
            protocol.send_text(text.encode())
            stream += b"".join(protocol.data_to_send())
        pos = 0
        while pos < len(stream):
            cut = rng.choice([1, 2, 3, 7, 60, 130, 700])
            writer.write(stream[pos : pos + cut])
            pos += cut
            if rng.random() < 0.2:
                await writer.drain()
                await asyncio.sleep(0.002)
        await writer.drain()
        await asyncio.sleep(0.3)
        protocol.receive_data(await asyncio.wait_for(reader.read(65536), 5))
        pongs = [e for e in protocol.events_received() if e.opcode is Opcode.PONG]
        protocol.send_close(1000)
        writer.write(b"".join(protocol.data_to_send()))
        await writer.drain()
        server.wait_done()
        writer.close()
    finally:
        server.stop()

    assert _texts(server.received) == ["first, before the subscription"]
    expected = [*texts[:10], "fragmented message", *texts[10:]]
    assert server.pushed == expected
    assert [m.get("bytes") for m in server.received if m.get("bytes")] == [b"\x01\x02"]
    assert [bytes(p.data) for p in pongs] == [b"are you there"]
    assert server.received[-1]["type"] == "websocket.disconnect"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x05hello", 1002),  # a client's frame must be masked
        (b"\x81\x84\x00\x00\x00\x00\xff\xfe\xfd\xfc", 1007),  # not UTF-8
    ],
    ids=["unmasked", "invalid-utf8"],
)
async def test_a_bad_frame_after_the_takeover_closes_with_the_right_code(
    frame: bytes, code: int
) -> None:
    server = SinkServer().start()
    try:
        protocol, reader, writer = await _raw_client(server.ws_url + "/media")
        await asyncio.sleep(0.2)  # subscribed
        protocol.send_text(b"fine")
        writer.write(b"".join(protocol.data_to_send()))
        await asyncio.sleep(0.1)  # the next read is split by the protocol itself
        writer.write(frame)
        await writer.drain()
        close_code = await _close_code(protocol, reader)
        server.wait_done()
        writer.close()
    finally:
        server.stop()

    assert server.pushed == ["fine"]
    assert close_code == code


async def test_a_sink_that_raises_on_a_queued_message_drops_the_rest_and_fails_1011() -> None:
    """Two messages queued before the subscription (one read): the first makes the sink
    raise; the second is not delivered, and the app still sees the disconnect."""
    server = SinkServer(before=0, settle_s=0.3, fail_on="boom").start()
    try:
        protocol, reader, writer = await _raw_client(server.ws_url + "/media")
        protocol.send_text(b"boom")
        protocol.send_text(b"after")
        writer.write(b"".join(protocol.data_to_send()))  # one write: one read, both queued
        close_code = await _close_code(protocol, reader)
        server.wait_done()
        writer.close()
    finally:
        server.stop()

    assert server.pushed == []
    assert close_code == 1011
    assert server.received[-1]["type"] == "websocket.disconnect"
