"""The issue's targets, checked against a run's report, and the table printed for humans.

Voice-to-voice has two budgets. The strict one is the issue's: the sum of provider
latencies (STT final + LLM first token + first-chunk generation + TTS first byte) + 30 ms.
The pipeline also waits for the caller to stop talking before the turn ends (about
TURN_DETECTION_MS of silence), a turn-taking policy rather than a provider latency, so the
second budget adds it.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

from typing import Any

from bench.script import CallScript, Providers

TURN_DETECTION_MS = 300
"""Silence before the final transcript is asked for or sent: Deepgram's endpointing
(DEEPGRAM_ENDPOINTING_MS=300) and the pipeline's Finalize path (Silero VAD's end of speech,
measured about 70 ms after the last sample, plus min_silence_ms=250) end the turn at about
the same time; the benchmark's server stages show the final about 300 + 150 ms after the
caller's last sample."""
SLACK_MS = 30
NOISY_STEAL_PCT = 2.0
"""CPU steal (time the hypervisor gave this VM's CPUs to others) from which a run's table
says its tails are the host's as much as the service's."""

SATURATED_GENERATOR = 0.9
"""Share of its CPU from which the callers' side (the busiest 2 s) counts as saturated."""


SWEEP_TARGETS = {
    "calls completed (all)",
    "inbound frames dropped",
    "outbound jitter p99 ms",
    "playout underruns",
    "barge-in p95 ms",
    "barge-ins missed",
    "false interruptions",
}
"""What bounds N in a sweep: the call still works (every frame heard, barge-in on time, no
false interruption, smooth playout with no gap in an answer). Latency budgets and per-core
capacity are reported for every step but do not bound N (see BENCHMARKS.md)."""


def report_field(report: dict[str, Any], path: str) -> Any:
    """The value at a dotted path ("caller.jitter_ms.p99") in a report, or None."""
    value: Any = report
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _target(name: str, value: Any, limit: float, kind: str = "<=") -> dict[str, Any]:
    met = value is not None and (value <= limit if kind == "<=" else value >= limit)
    return {"target": name, "value": value, "limit": f"{kind} {limit:g}", "met": met}


def _net_overhead(report: dict[str, Any]) -> float | None:
    """Overhead p95 less the emulators' own median extra delay (LLM + TTS), measured idle."""
    total = report_field(report, "server.overhead.total.p95")
    llm = report_field(report, "emulator_floor.llm_ttft_extra_ms.p50")
    tts = report_field(report, "emulator_floor.tts_first_byte_extra_ms.p50")
    if total is None or llm is None or tts is None:
        return None
    net: float = total - llm - tts
    return round(net, 1)


def passes(result: dict[str, Any]) -> bool:
    """Whether a run (or a sweep's step) meets the targets that bound a sweep."""
    return all(t["met"] for t in result["targets"] if t["target"] in SWEEP_TARGETS)


def evaluate(
    report: dict[str, Any], providers: Providers, script: CallScript
) -> list[dict[str, Any]]:
    budget = max(providers.budget_ms(r) for r in script.replies)
    calls = report["calls"]
    targets = [
        _target("calls completed (all)", calls["completed"], calls["placed"], ">="),
        _target("inbound frames dropped", report["inbound_frames_dropped"], 0),
        _target(
            "calls per server core", report_field(report, "resources.calls_per_core"), 200, ">="
        ),
        _target("pipeline overhead p95 ms", report_field(report, "server.overhead.total.p95"), 10),
        _target("  same, net of emulator floor", _net_overhead(report), 10),
        _target(
            "voice-to-voice p95 ms (providers + 30)",
            report_field(report, "caller.voice_to_voice_ms.p95"),
            budget + SLACK_MS,
        ),
        _target(
            "voice-to-voice p95 ms (+ turn detection)",
            report_field(report, "caller.voice_to_voice_ms.p95"),
            budget + TURN_DETECTION_MS + SLACK_MS,
        ),
        _target("outbound jitter p99 ms", report_field(report, "caller.jitter_ms.p99"), 20),
        _target("playout underruns", report_field(report, "caller.underruns"), 0),
        _target("RSS per call MB", report_field(report, "resources.rss_per_call_mb"), 2),
    ]
    if script.name == "full":
        targets += [
            _target("barge-in p95 ms", report_field(report, "caller.barge_in_ms.p95"), 150),
            _target("barge-ins missed", report_field(report, "caller.barge_in_missed"), 0),
            _target(
                "false interruptions", report_field(report, "backchannel.false_interruptions"), 0
            ),
        ]
    return targets


# --- the table ----------------------------------------------------------------------------

_ROWS = [
    ("greeting (start -> first audio heard)", "caller.greeting_ms"),
    ("server stt_final_ms", "server.stages.stt_final_ms"),
    ("server llm_request_ms", "server.stages.llm_request_ms"),
    ("server llm_first_token_ms", "server.stages.llm_first_token_ms"),
    ("server tts_request_ms", "server.stages.tts_request_ms"),
    ("server tts_first_audio_ms", "server.stages.tts_first_audio_ms"),
    ("server first_media_ms", "server.stages.first_media_ms"),
    ("server retrieval_ms", "server.stages.retrieval_ms"),
    ("turn detection (stt_final - STT)", "server.turn_detection_ms"),
    ("pipeline overhead total", "server.overhead.total"),
    ("  llm leg", "server.overhead.llm_leg"),
    ("  tts leg", "server.overhead.tts_leg"),
    ("  pacer leg", "server.overhead.pacer_leg"),
    ("  in the service", "server.overhead.in_service"),
    ("    prompt (final -> LLM request)", "server.overhead.prompt"),
    ("    chunking (token -> TTS request)", "server.overhead.chunking"),
    ("  provider round trips", "server.overhead.provider_round_trips"),
    ("    LLM (request -> token, less TTFT)", "server.overhead.llm_round_trip"),
    ("    TTS (request -> audio, less TTFB)", "server.overhead.tts_round_trip"),
    ("voice-to-voice (normal turns)", "caller.voice_to_voice_ms"),
    ("voice-to-voice after barge-in", "caller.voice_to_voice_after_barge_in_ms"),
    ("barge-in (onset -> clear)", "caller.barge_in_ms"),
    ("backchannel pause (clear -> resume)", "backchannel.pause_ms"),
    ("outbound frame lateness", "caller.frame_lateness_ms"),
    ("outbound jitter", "caller.jitter_ms"),
    ("underrun gap", "caller.underrun_ms"),
]


def fmt_cell(value: Any) -> str:
    """A figure as a table cell: "-" when missing, floats without trailing zeros."""
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


_LATENESS_ROWS = [
    ("  llm first token", "emulator_lateness.llm_first_token_ms"),
    ("  tts first byte", "emulator_lateness.tts_first_byte_ms"),
]


def _rows(report: dict[str, Any], rows: list[tuple[str, str]]) -> list[str]:
    lines = []
    for label, path in rows:
        p = report_field(report, path) or {}
        cells = [fmt_cell(p.get(k)) for k in ("n", "p50", "p95", "p99", "max")]
        lines.append(f"{label:40} {cells[0]:>6} " + " ".join(f"{c:>8}" for c in cells[1:]))
    return lines


def _generator_note(report: dict[str, Any]) -> str | None:
    """A note when the callers' side ran out of CPU: the generator is one event loop, so one
    core bounds it, and pinned it shares its CPUs with the emulators."""
    resources, pinned = report.get("resources", {}), report.get("pinned")
    peak, limit = resources.get("load_generator_peak_cpu_pct"), 100.0
    if pinned:
        peak = resources.get("generator_and_emulators_peak_cpu_pct")
        limit = 100.0 * len(pinned["generator_and_emulators"])
    if peak is None or peak < SATURATED_GENERATOR * limit:
        return None
    return (
        f"NOTE: the load generator's side peaked at {fmt_cell(peak)}% CPU (of {fmt_cell(limit)}%)."
        " A saturated generator timestamps late, so its jitter, underrun and barge-in"
        " figures read high: compare with fewer calls, or without --pin."
    )


def _cpus(cpus: list[int]) -> str:
    return ",".join(str(cpu) for cpu in cpus)


def table(report: dict[str, Any]) -> str:
    """Percentile rows, counters, resources and targets as plain text."""
    lines = [f"{'ms':40} {'n':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"]
    lines += _rows(report, _ROWS)
    lines.append("")
    for section in ("calls", "backchannel", "resources"):
        flat = {k: v for k, v in report[section].items() if not isinstance(v, dict | list)}
        lines.append(f"{section}: " + ", ".join(f"{k}={fmt_cell(v)}" for k, v in flat.items()))
    for call in report["calls"].get("incomplete", []):
        lines.append(f"incomplete call {call['call_id']}: {call['why']}")
    floor = report.get("emulator_floor") or {}
    lines.append(
        "emulator floor (direct, idle; counted in the overhead above): "
        + ", ".join(f"{k} p50={fmt_cell((v or {}).get('p50'))}" for k, v in floor.items())
    )
    if "emulator_lateness" in report:
        lines.append(
            "emulator lateness under load (per request: first sent - received - configured, "
            "as the emulators timed it; counted in the overhead above):"
        )
        lines += _rows(report, _LATENESS_ROWS)
        net = report_field(report, "server.overhead_net_of_emulator_lateness.p95_ms")
        lines.append(
            "pipeline overhead p95 net of emulator lateness p95 (LLM + TTS), approximate "
            f"(p95s do not subtract exactly): {fmt_cell(net)} ms"
        )
    lag = report.get("loop_lag") or {}
    if lag.get("n"):
        lines.append(
            f"service event-loop lag (a timer every 0.25 s, n={lag['n']}; bucket bounds): "
            f"p50 <= {fmt_cell(lag['p50_le_ms'])} ms, p95 <= {fmt_cell(lag['p95_le_ms'])} ms, "
            f"p99 <= {fmt_cell(lag['p99_le_ms'])} ms, "
            f"over 10 ms {fmt_cell(lag['over_10ms_pct'])}%, "
            f"mean {fmt_cell(lag['mean_ms'])} ms"
        )
    pool = report.get("tts_sockets") or {}
    if pool.get("open_after") is not None:
        lines.append(
            f"TTS speak sockets open after the load: {fmt_cell(pool['open_after'])}, "
            f"chunks sent over REST (no socket free): {fmt_cell(pool['rest_fallbacks'])}, "
            f"chunks that waited for a handshake: {fmt_cell(pool.get('inline_connects'))}"
        )
    caller = report["caller"]
    lines.append(
        f"counters: inbound_frames_dropped={fmt_cell(report['inbound_frames_dropped'])}, "
        f"underruns={caller['underruns']}, barge_in_missed={caller['barge_in_missed']}, "
        f"frames_received={caller['frames_received']}, "
        f"frames_after_clear={caller['frames_after_clear']}"
    )
    steal = report_field(report, "resources.machine_cpu_steal_pct")
    if steal is not None and steal >= NOISY_STEAL_PCT:
        lines.append(
            f"NOTE: the hypervisor took {fmt_cell(steal)}% of this machine's CPU time during the "
            "load (steal). Latency tails follow it (docs/benchmark-history.md, eleventh round): "
            "compare runs taken at similar steal."
        )
    if note := _generator_note(report):
        lines.append(note)
    if pinned := report.get("pinned"):
        lines.append(
            f"pinned: the service on CPU {_cpus(pinned['service'])}, the load generator and"
            f" the emulators on CPU {_cpus(pinned['generator_and_emulators'])}"
        )
    lines.append("")
    for t in report["targets"]:
        mark = "MET   " if t["met"] else "MISSED"
        lines.append(f"{mark} {t['target']:42} {fmt_cell(t['value']):>10} {t['limit']}")
    return "\n".join(lines)
