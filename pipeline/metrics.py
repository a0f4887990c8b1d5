"""Prometheus metrics for live calls, one registry per app (so tests and several apps in one
process never collide). The pipeline records; `/metrics` exposes.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6, 0.8, 1, 1.5, 2, 3, 5, 10)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LOOP_LAG_SAMPLE_S = 0.25
"""How often the event loop's lag is sampled: four timers a second, nothing next to calls."""


class PipelineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls_started = Counter("aisdr_calls_started", "Media streams started", registry=r)
        self.calls_active = Gauge("aisdr_calls_active", "Calls with a live stream", registry=r)
        self.calls_ended = Counter(
            "aisdr_calls_ended", "Calls ended, by reason", ["reason"], registry=r
        )
        self.calls_refused = Counter(
            "aisdr_calls_refused",
            "Calls refused at MAX_CONCURRENT_CALLS, by direction",
            ["direction"],
            registry=r,
        )
        self.call_slots = Gauge(
            "aisdr_call_slots_in_use",
            "Live streams plus calls admitted whose stream has not started (MAX_CONCURRENT_CALLS)",
            registry=r,
        )
        self.turn_latency = Histogram(
            "aisdr_turn_latency_seconds",
            "Latency from the caller's end of speech, by stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.barge_in_latency = Histogram(
            "aisdr_barge_in_seconds",
            "Caller speech onset to Twilio clear",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.barge_ins = Counter(
            "aisdr_barge_ins",
            "Agent speech paused by caller speech, by outcome",
            ["outcome"],
            registry=r,
        )
        self.early_answers = Counter(
            "aisdr_early_answers",
            "Answers started on a pause's transcript: started, then used or why discarded",
            ["outcome"],
            registry=r,
        )
        self.provider_latency = Histogram(
            "aisdr_provider_latency_seconds",
            "Request made -> first output, as this service saw it (network included): the LLM's"
            " first token, the TTS's first audio of an answer",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_errors = Counter(
            "aisdr_provider_errors", "Provider failures during calls", ["provider"], registry=r
        )
        self.inbound_frames_dropped = Counter(
            "aisdr_inbound_frames_dropped",
            "Inbound audio the VAD skipped after falling over 1 s behind, in 20 ms frames",
            registry=r,
        )
        self.tool_refusals = Counter(
            "aisdr_tool_refusals",
            "Tool calls a budget or policy refused (the agent's tool_limits), by reason",
            ["reason"],
            registry=r,
        )
        self.retrieval_timeouts = Counter(
            "aisdr_retrieval_timeouts",
            "Caller turns answered without knowledge passages: retrieval passed its budget",
            registry=r,
        )
        self.malformed_messages = Counter(
            "aisdr_malformed_messages", "Media stream messages that could not be used", registry=r
        )

        self.tts_sockets = Gauge(
            "aisdr_tts_sockets_open", "Deepgram speak WebSockets open (busy or pooled)", registry=r
        )
        self.tts_rest_fallbacks = Gauge(
            "aisdr_tts_rest_fallback_requests",
            "TTS requests sent over REST since start because every speak socket was busy or out"
            " of flushes (DEEPGRAM_TTS_SOCKETS)",
            registry=r,
        )
        self.tts_inline_connects = Gauge(
            "aisdr_tts_inline_connect_requests",
            "TTS requests since start that waited for a new speak socket's handshake because"
            " no spare was ready (DEEPGRAM_TTS_SPARE_SOCKETS)",
            registry=r,
        )

        self.dialer_statements = Gauge(
            "aisdr_dialer_db_statements",
            "Database statements the campaign dialer ran since start",
            registry=r,
        )
        self.dialer_dials = Gauge(
            "aisdr_dialer_dials", "Campaign calls the dialer placed since start", registry=r
        )

        self.loop_lag = Histogram(
            "aisdr_event_loop_lag_seconds",
            "How late the event loop ran a timer, sampled every 0.25 s: what every live call's"
            " next step waits when the process is busy (timer resolution 1 ms)",
            buckets=_LAG_BUCKETS,
            registry=r,
        )

    async def watch_loop_lag(self, interval_s: float = LOOP_LAG_SAMPLE_S) -> None:
        """Until cancelled: sleep `interval_s`, record how much later than that it woke."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def observe_turn(self, stage: str, seconds: float | None) -> None:
        if seconds is not None:
            self.turn_latency.labels(stage).observe(seconds)

    def observe_turn_ms(self, stage: str, ms: float | None) -> None:
        """`observe_turn` for a latency in milliseconds, as turns record them."""
        if ms is not None:
            self.turn_latency.labels(stage).observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
