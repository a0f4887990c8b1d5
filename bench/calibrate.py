"""The emulators' own delay beyond their configured ones, two ways:

- the floor: how much longer than configured the LLM's first token and the TTS's first
  byte take when asked directly from this process (idle, loopback, kept-alive connection),
  before the load;
- the lateness under load: each request's own timing as the emulators recorded it during
  the run (`GET /emulator/timings`), read afterwards.

Both are reported beside the pipeline overhead, which counts them as overhead: part of what
the service appears to add is the emulators' scheduling and HTTP.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench.report import percentiles
from bench.script import Providers
from bench.stack import DEEPGRAM_KEY, BenchStack
from emulators.base import TIMINGS_PATH

SPEAK_QUERY = {"model": "aura-2-thalia-en", "encoding": "mulaw", "sample_rate": "8000"}


async def _first_chunk_ms(client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> float:
    started = time.perf_counter()
    async with client.stream(method, url, **kw) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            if chunk:
                break
    return (time.perf_counter() - started) * 1000


async def _llm_ms(client: httpx.AsyncClient, stack: BenchStack) -> float:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "calibration"}],
        "stream": True,
    }
    return await _first_chunk_ms(
        client, "POST", stack.emulator_urls["ollama"] + "/api/chat", json=body
    )


async def _tts_ms(client: httpx.AsyncClient, stack: BenchStack) -> float:
    url = stack.emulator_urls["deepgram"] + "/v1/speak"
    params = {**SPEAK_QUERY, "container": "none"}
    headers = {"Authorization": f"Token {DEEPGRAM_KEY}"}
    body = {"text": "Calibration."}
    return await _first_chunk_ms(client, "POST", url, params=params, headers=headers, json=body)


async def emulator_floor(stack: BenchStack, providers: Providers, rounds: int = 8) -> dict:
    """Extra ms beyond the configured TTFT and TTS first byte, measured directly."""
    llm, tts = [], []
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(rounds + 1):
            llm_ms, tts_ms = await _llm_ms(client, stack), await _tts_ms(client, stack)
            if i:  # the first round opens the connections
                llm.append(llm_ms - providers.llm_ttft_ms)
                tts.append(tts_ms - providers.tts_first_byte_ms)
    return {"llm_ttft_extra_ms": percentiles(llm), "tts_first_byte_extra_ms": percentiles(tts)}


TIMED = {"llm": "ollama", "tts": "deepgram"}
"""Timings key -> the emulator serving it."""


async def emulator_timings(stack: BenchStack, since: float, until: float) -> dict[str, list]:
    """The requests each emulator received in [since, until] (`time.monotonic()`, the same
    clock in every process) that sent their first token / audio byte:
    {"llm": [{"received", "first", "configured_ms"}, ...], "tts": [...]}."""
    params = {"since": repr(since), "until": repr(until)}
    out: dict[str, list] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for key, emulator in TIMED.items():
            url = stack.emulator_urls[emulator] + TIMINGS_PATH
            response = await client.get(url, params=params)
            response.raise_for_status()
            out[key] = response.json()[key]
    return out
