"""Slowloris through the real server on real sockets: 300 connections trickling header
bytes and 50 partial WebSocket upgrades are closed by the request-head deadline
(`api.http_protocol.HEAD_TIMEOUT_S`), upgraded media streams that never send `start` by the
handshake deadline (`voice_pipeline.HANDSHAKE_TIMEOUT_S`), and `/health` answers throughout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from twilio.request_validator import RequestValidator

from api.http_protocol import HEAD_TIMEOUT_S
from tests.conftest import AUTH_TOKEN, make_settings
from tests.harness import AppServer
from voice_pipeline import HANDSHAKE_TIMEOUT_S

SLOW_HEADS, PARTIAL_UPGRADES, SILENT_STREAMS = 300, 50, 10
TRICKLE_S = 0.5
GRACE_S = 2.0  # the deadline plus the loop's timer and a read on a busy machine


@pytest.fixture
def server(tmp_path: Path, embedding_model: None) -> Iterator[AppServer]:
    with AppServer(make_settings(tmp_path)) as running:
        yield running


async def _trickle(port: int, head: bytes, opened: float) -> float:
    """Sends `head`, then one header byte every TRICKLE_S, never the blank line; returns
    when the server closed the connection (seconds after `opened`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    closed = asyncio.ensure_future(reader.read())  # b"" once the server closes

    try:
        while not closed.done():
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait({closed}, timeout=TRICKLE_S)
        await closed
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - opened


async def _silent_stream(url: str, signature: str, opened: float) -> tuple[float, int | None]:
    """A signed, upgraded media stream that never sends `start`."""
    async with websockets.connect(url, additional_headers={"X-Twilio-Signature": signature}) as ws:
        try:
            await ws.recv()
        except websockets.ConnectionClosed as exc:
            return time.monotonic() - opened, exc.rcvd.code if exc.rcvd else None
    return time.monotonic() - opened, None


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_slow_clients_are_closed_at_the_deadlines(server: AppServer) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: "
    upgrade = (
        b"GET /twilio/media HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: "
    )
    signature = RequestValidator(AUTH_TOKEN).compute_signature(
        server.app.state.settings.media_stream_url, {}
    )
    opened = time.monotonic()
    slow = [asyncio.ensure_future(_trickle(server.port, head, opened)) for _ in range(SLOW_HEADS)]
    partial = [
        asyncio.ensure_future(_trickle(server.port, upgrade, opened))
        for _ in range(PARTIAL_UPGRADES)
    ]
    silent = [
        asyncio.ensure_future(_silent_stream(server.ws_url + "/twilio/media", signature, opened))
        for _ in range(SILENT_STREAMS)
    ]
    await asyncio.sleep(1.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        health = await http.get("/health")  # while all of them are open
    heads = await asyncio.gather(*slow, *partial)
    streams = await asyncio.gather(*silent)

    assert health.status_code == 200
    assert max(heads) < HEAD_TIMEOUT_S + GRACE_S, max(heads)
    assert min(heads) > HEAD_TIMEOUT_S - 0.5, min(heads)  # it was the deadline, not a fault
    assert {code for _, code in streams} == {1008}
    assert max(t for t, _ in streams) < HANDSHAKE_TIMEOUT_S + GRACE_S
