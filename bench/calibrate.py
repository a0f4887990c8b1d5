"""The emulators' own delay beyond their configured ones, two ways:

- the floor: how much longer than configured the LLM's first token and the TTS's first
  byte take when asked directly from this process (idle, loopback, before the load), with
  a bare HTTP/1.1 client on an open socket. An HTTP library's own time would count here
  otherwise: httpx took about 3.5 ms more than a bare socket per request
  (docs/benchmark-history.md, eighth round);
- the lateness under load: each request's own timing as the emulators recorded it during
  the run (`GET /emulator/timings`), read afterwards.

Both are reported beside the pipeline overhead, which counts them as overhead: part of what
the service appears to add is the emulators' scheduling and HTTP.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from bench.report import percentiles
from bench.script import Providers
from bench.stack import DEEPGRAM_KEY, BenchStack
from emulators.base import TIMINGS_PATH

SPEAK_QUERY = {"model": "aura-2-thalia-en", "encoding": "mulaw", "sample_rate": "8000"}


async def _first_body_ms(
    base_url: str, method: str, target: str, body: bytes, headers: dict[str, str], marker: bytes
) -> float:
    """Milliseconds from writing the request on an open connection to the first body bytes
    holding `marker` (any body byte when empty). HTTP/1.1, `Connection: close`."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    lines += [f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    try:
        started = time.perf_counter()
        writer.write(request)
        received = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError(f"{target}: closed before the first body bytes")
            received += chunk
            head, sep, rest = received.partition(b"\r\n\r\n")
            if sep and not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{target}: {head.splitlines()[0]!r}")
            if sep and rest and marker in rest:
                return (time.perf_counter() - started) * 1000
    finally:
        writer.close()


async def _llm_ms(stack: BenchStack) -> float:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "calibration"}],
        "stream": True,
    }
    return await _first_body_ms(
        stack.emulator_urls["ollama"],
        "POST",
        "/api/chat",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        b'"content"',  # the first token's line, not the headers
    )


async def _tts_ms(stack: BenchStack) -> float:
    query = urlencode({**SPEAK_QUERY, "container": "none"})
    return await _first_body_ms(
        stack.emulator_urls["deepgram"],
        "POST",
        "/v1/speak?" + query,
        json.dumps({"text": "Calibration."}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Token {DEEPGRAM_KEY}"},
        b"",
    )


async def emulator_floor(
    stack: BenchStack, providers: Providers, rounds: int = 8
) -> dict[str, Any]:
    """Extra ms beyond the configured TTFT and TTS first byte, measured directly."""
    llm, tts = [], []
    for i in range(rounds + 1):
        llm_ms, tts_ms = await _llm_ms(stack), await _tts_ms(stack)
        if i:  # the first round warms the emulators' own paths
            llm.append(llm_ms - providers.llm_ttft_ms)
            tts.append(tts_ms - providers.tts_first_byte_ms)
    return {"llm_ttft_extra_ms": percentiles(llm), "tts_first_byte_extra_ms": percentiles(tts)}


TIMED = {"llm": "ollama", "tts": "deepgram"}
"""Timings key -> the emulator serving it."""


async def emulator_timings(
    stack: BenchStack, since: float, until: float
) -> dict[str, list[dict[str, Any]]]:
    """The requests each emulator received in [since, until] (`time.monotonic()`, the same
    clock in every process) that sent their first token / audio byte:
    {"llm": [{"received", "first", "configured_ms"}, ...], "tts": [...]}."""
    params = {"since": repr(since), "until": repr(until)}
    out: dict[str, list[dict[str, Any]]] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for key, emulator in TIMED.items():
            url = stack.emulator_urls[emulator] + TIMINGS_PATH
            response = await client.get(url, params=params)
            response.raise_for_status()
            out[key] = response.json()[key]
    return out
