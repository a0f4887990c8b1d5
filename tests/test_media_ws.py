"""media_ws.MediaStreamProtocol under a real uvicorn, with a bare ASGI app and a real
WebSocket client: a subscribed connection's text messages reach the sink in order (those
queued before the subscription first), everything else still reaches `receive()`, and a
sink that raises fails the connection with 1011."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from emulators.base import ThreadedServer
from media_ws import TEXT_SINK


class SinkServer(ThreadedServer):
    """Reads `before` messages with receive(), waits `settle_s` (more arrive and queue),
    subscribes, then reads receive() until the disconnect."""

    name = "sink-app"
    ws_protocol = "media_ws:MediaStreamProtocol"

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
