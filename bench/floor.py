"""`python -m bench.floor`: what receiving Twilio's media messages costs a server before any
audio work, in three servers of increasing depth:

    io     a bare asyncio Protocol on uvloop that only counts bytes: the kernel, the loop and
           one Python callback per read
    parse  the same, parsing every frame with websockets' sans-I/O protocol (the parser
           under uvicorn's `websockets-sansio`, which the service uses)
    asgi   uvicorn (uvloop, httptools, websockets-sansio, no deflate) with a bare ASGI app
           that reads each message with `receive()`, parses it (orjson) and decodes its payload
    direct the same app and work, under the service's protocol (`api.media_ws`): each message is
           handed to the app in the read callback that parsed it, with no `receive()`

N connections each send a Twilio-shaped `media` message (20 ms of mu-law) every 20 ms on an
absolute clock for `--seconds`; each server runs in its own process, and its CPU
(utime + stime from /proc) is divided by the messages sent. The service does all of `asgi`
and then its audio work, so `direct` is a floor under its CPU per call
(docs/benchmark-history.md, seventh and eighth rounds).

    .venv/bin/python -m bench.floor --calls 100 --seconds 15

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import time
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.http11 import Request
from websockets.server import ServerProtocol

from api.media_ws import TEXT_SINK
from bench.stack import free_port, proc_sample

MODES = ("io", "parse", "asgi", "direct")
FRAME_S = 0.02
PAYLOAD = base64.b64encode(bytes([0xFF]) * 160).decode()  # 20 ms of mu-law silence


# --- servers -----------------------------------------------------------------------------


class _Counting(asyncio.Protocol):
    """The `io` and `parse` servers: websockets' sans-I/O handshake, then bytes counted
    (`io`) or frames parsed (`parse`)."""

    parse = False

    def connection_made(self, transport: Any) -> None:  # uvloop's TCPTransport
        self.transport, self.ws, self.open = transport, ServerProtocol(), False

    def data_received(self, data: bytes) -> None:
        if self.open and not self.parse:
            return
        self.ws.receive_data(data)
        for event in self.ws.events_received():  # frames, once open: parsed, then dropped
            if isinstance(event, Request):
                self.ws.send_response(self.ws.accept(event))
                self.open = True
        for chunk in self.ws.data_to_send():
            self.transport.write(chunk)


class _Parsing(_Counting):
    parse = True


def serve(mode: str, port: int) -> None:
    import uvloop

    async def main() -> None:
        protocol = _Parsing if mode == "parse" else _Counting
        await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", port)
        print("READY", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The `asgi` server's app: every media message parsed and its payload decoded."""
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        _on_text(message["text"])


def _on_text(text: str) -> None:
    media = orjson.loads(text).get("media")
    if media:
        base64.b64decode(media["payload"])


async def direct_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The `direct` server's app: the same work, each message handed over by the protocol."""
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    scope["extensions"][TEXT_SINK](_on_text)
    while (await receive())["type"] == "websocket.receive":
        pass


def _start(mode: str, port: int) -> subprocess.Popen[str]:
    if mode in ("asgi", "direct"):
        ws = "api.media_ws:MediaStreamProtocol" if mode == "direct" else "websockets-sansio"
        command = ["-m", "uvicorn", f"bench.floor:{mode}_app", "--loop", "uvloop"]
        command += ["--http", "httptools", "--ws", ws]
        command += ["--ws-per-message-deflate", "false", "--log-level", "warning"]
        command += ["--lifespan", "off", "--port", str(port)]
    else:
        command = ["-m", "bench.floor", "--serve", mode, "--port", str(port)]
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)


async def _wait_listening(port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.1)


# --- senders -----------------------------------------------------------------------------


def media_message(n: int) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(n + 2),
            "media": {
                "track": "inbound",
                "chunk": str(n + 1),
                "timestamp": str(n * 20),
                "payload": PAYLOAD,
            },
            "streamSid": "MZ" + "0" * 32,
        }
    )


async def _send_for(url: str, start_at: float, stop_at: float) -> int:
    async with connect(url, compression=None, close_timeout=0.2) as ws:  # io never replies
        sent = 0
        await asyncio.sleep(max(start_at - time.monotonic(), 0))
        while (due := start_at + sent * FRAME_S) < stop_at:
            await asyncio.sleep(max(due - time.monotonic(), 0))
            await ws.send(media_message(sent))
            sent += 1
        return sent


async def measure(mode: str, calls: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    server = _start(mode, port)
    try:
        await _wait_listening(port)
        start = time.monotonic() + 1.0
        phase = FRAME_S / calls  # connections spread over the 20 ms, as unrelated calls are
        senders = [
            _send_for(f"ws://127.0.0.1:{port}/media", start + i * phase, start + seconds)
            for i in range(calls)
        ]
        task = asyncio.gather(*senders)
        await asyncio.sleep(max(start - time.monotonic(), 0))
        before = proc_sample(server.pid)
        sent = sum(await task)
        after = proc_sample(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    cpu_s = after.cpu_s - before.cpu_s
    us = cpu_s / max(sent, 1) * 1e6
    return {
        "mode": mode,
        "messages": sent,
        "server_cpu_s": round(cpu_s, 2),
        "us_per_message": round(us, 1),
        "cpu_s_per_call_minute": round(us * 50 * 60 / 1e6, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100, help="concurrent connections")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + ",".join(MODES)
    )
    p.add_argument("--serve", choices=("io", "parse"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return
    print(f"{args.calls} connections, a media message each every 20 ms, {args.seconds:g} s each")
    print(f"{'server':8s} {'messages':>9s} {'cpu s':>7s} {'us/msg':>7s} {'CPU-s/call-min':>15s}")
    for mode in args.modes.split(","):
        row = asyncio.run(measure(mode, args.calls, args.seconds))
        print(
            f"{mode:8s} {row['messages']:9d} {row['server_cpu_s']:7.2f} "
            f"{row['us_per_message']:7.1f} {row['cpu_s_per_call_minute']:15.3f}"
        )


if __name__ == "__main__":
    main()
