"""Request body limits through the real server on a real socket: a declared oversize body
gets its 413 before any of it is sent, and a chunked one as soon as it passes the limit, on
every route (the JSON API, the Twilio webhooks, document uploads)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, make_settings
from tests.harness import AppServer

LIMIT = 64 * 1024
DOCUMENT_LIMIT = 256 * 1024
CHUNK = 64 * 1024
HUGE = 200 * 1024 * 1024  # what an attacker offers; far more than any socket buffer holds


@pytest.fixture
def server(tmp_path: Path, embedding_model: None) -> Iterator[AppServer]:
    settings = make_settings(tmp_path, MAX_REQUEST_BYTES=LIMIT, MAX_DOCUMENT_BYTES=DOCUMENT_LIMIT)
    with AppServer(settings) as running:
        yield running


def _head(path: str, content_type: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: {content_type}\r\n{extra}\r\n"
    ).encode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


MULTIPART_START = (
    b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
)


def stream_chunked(port: int, path: str, content_type: str, total: int) -> tuple[int, int]:
    """Sends `total` bytes of chunked body until the server answers; (status, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_head(path, content_type, "Transfer-Encoding: chunked\r\n"))
        if content_type.startswith("multipart/"):
            sock.sendall(f"{len(MULTIPART_START):x}\r\n".encode() + MULTIPART_START + b"\r\n")
        sock.setblocking(False)
        piece = f"{CHUNK:x}\r\n".encode() + b"a" * CHUNK + b"\r\n"
        pending, sent, answer = b"", 0, b""
        deadline = time.monotonic() + 30
        while sent < total and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(65536)
            if answer:
                break
            pending = pending or piece
            try:
                count = sock.send(pending)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except OSError:  # the server closed the connection after answering
                break
            pending, sent = pending[count:], sent + count
        sock.setblocking(True)
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    return _status(answer), sent


@pytest.mark.parametrize(
    ("path", "content_type", "limit"),
    [
        ("/v1/agents", "application/json", LIMIT),
        ("/twilio/voice", "application/x-www-form-urlencoded", LIMIT),
        ("/v1/agents/{agent}/documents", "multipart/form-data; boundary=B", DOCUMENT_LIMIT * 6),
    ],
)
def test_a_chunked_body_is_cut_off_at_the_limit(
    server: AppServer, path: str, content_type: str, limit: int
) -> None:
    agent = httpx.post(
        f"{server.url}/v1/agents",
        json={"name": "A"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    status, sent = stream_chunked(server.port, path.format(agent=agent["id"]), content_type, HUGE)
    assert status == 413
    # What was sent is the limit plus what the two sockets' buffers took, not 200 MiB.
    assert sent < limit + 16 * 1024 * 1024, sent


def test_a_declared_oversize_body_is_refused_before_it_is_sent(server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        length = f"Content-Length: {LIMIT + 1}\r\n"
        sock.sendall(_head("/v1/agents", "application/json", length))
        answer = sock.recv(65536)  # no body byte was sent
    assert _status(answer) == 413
    assert b"65536 bytes" in answer


def test_a_body_within_the_limit_is_read(server: AppServer) -> None:
    body = b'{"name": "' + b"x" * 100 + b'"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head("/v1/agents", "application/json", "Transfer-Encoding: chunked\r\n"))
        sock.sendall(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        answer = sock.recv(65536)
    assert _status(answer) == 201, answer
