"""Figures from a benchmark run: per-stage latency percentiles from the server's turn
records, voice-to-voice / barge-in / greeting / pacing from the callers' ears, false
interruptions, and the server's CPU and memory per call. Pure functions over recorded data.

Definitions (all times in ms):

- server stages: the turn fields of GET /v1/calls/{id}, each measured by the pipeline from
  the caller's end of speech (Silero VAD's estimate, mapped onto the server clock).
- pipeline overhead, per answer: first_media_ms - stt_final_ms - TTFT - first-chunk
  generation - TTS first byte, where stt_final_ms is measured (it includes the turn-detection
  wait) and the rest are the emulators' configured delays; it splits exactly into
    llm_leg   = llm_first_token_ms - stt_final_ms - TTFT
    tts_leg   = tts_first_audio_ms - llm_first_token_ms - first_chunk - TTS first byte
    pacer_leg = first_media_ms - tts_first_audio_ms
  so anything the service (or the emulators' scheduling, or the loopback) adds is counted.
  Where the turns also carry when each request was made (llm_request_ms, tts_request_ms),
  the same total splits into what happens inside the service and around the two requests:
    prompt         = llm_request_ms - stt_final_ms              (history, retrieval, prompt)
    llm_round_trip = llm_first_token_ms - llm_request_ms - TTFT (SDK, HTTP both ways, emulator)
    chunking       = tts_request_ms - llm_first_token_ms - first_chunk (tokens 2.. arriving,
                     the first chunk cut; the emulator's token pacing lands here too)
    tts_round_trip = tts_first_audio_ms - tts_request_ms - TTS first byte
    pacer          = pacer_leg
  with in_service = prompt + chunking + pacer and provider_round_trips = the two round trips.
- emulator lateness under load, per request the emulators timed during the run:
  (first output sent - request received) - configured delay, for the LLM's first token and
  the TTS's first byte. The overhead p95 less both lateness p95s is an approximation of the
  overhead net of it (percentiles do not subtract exactly).
- voice-to-voice: the caller's last speech sample -> first agent audio it hears.
- pacing: each outbound frame's lateness against the pacer's schedule (it plays at
  max(arrival, end of buffered audio); once the pacer has filled its lead, a frame is due
  LEAD_S before it plays). Jitter is the change in lateness between consecutive
  clock-paced frames (= inter-arrival deviation from the frame length); an underrun is a
  frame that arrives after the caller's buffer ran dry, within a continuing answer.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.load import CallOutcome
from bench.script import BACKCHANNEL, BARGE_IN, CallScript, Providers
from emulators.twilio_caller import CallerResult
from voice_pipeline import LEAD_S

STAGES = ("stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_media_ms")
REQUEST_STAGES = ("llm_request_ms", "tts_request_ms")
OVERHEAD_LEGS = (
    "total",
    "llm_leg",
    "tts_leg",
    "pacer_leg",
    "in_service",
    "provider_round_trips",
    "prompt",
    "llm_round_trip",
    "chunking",
    "tts_round_trip",
)
FRAME_S = 0.02
STRAY_S = 0.05
"""A frame arriving this soon after a clear, before any other, was sent after the clear."""
CONTINUING_GAP_S = 1.0
"""A dry buffer shorter than this, with no clear in between, is an underrun inside an
answer; longer gaps are between turns (the caller speaks for a second or more)."""


def percentiles(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """n, p50, p95, p99, max (linear interpolation); None when there are no samples."""
    data = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {
        "n": int(data.size),
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "p99": round(float(p99), 1),
        "max": round(float(data.max()), 1),
    }


# --- server turns -------------------------------------------------------------------------


@dataclass
class Answer:
    """One agent answer (not the greeting) with the reply it was scripted to be."""

    turn: dict[str, Any]
    reply: str
    index: int


def answers(outcome: CallOutcome, script: CallScript) -> list[Answer]:
    turns = [t for t in outcome.detail.get("turns", []) if t["role"] == "assistant"]
    out = []
    for i, turn in enumerate(t for t in turns if t.get("stt_final_ms") is not None):
        reply = script.replies[i] if i < len(script.replies) else ""
        out.append(Answer(turn, reply, i))
    return out


def overhead(answer: Answer, providers: Providers) -> dict[str, float] | None:
    t = answer.turn
    if any(t.get(stage) is None for stage in STAGES) or not answer.reply:
        return None
    llm = t["llm_first_token_ms"] - t["stt_final_ms"] - providers.llm_ttft_ms
    tts = (
        t["tts_first_audio_ms"]
        - t["llm_first_token_ms"]
        - providers.first_chunk_ms(answer.reply)
        - providers.tts_first_byte_ms
    )
    pacer = t["first_media_ms"] - t["tts_first_audio_ms"]
    legs = {"total": llm + tts + pacer, "llm_leg": llm, "tts_leg": tts, "pacer_leg": pacer}
    if t.get("llm_request_ms") is None or t.get("tts_request_ms") is None:
        return legs  # a service from before these stages were recorded
    prompt = t["llm_request_ms"] - t["stt_final_ms"]
    first_chunk = providers.first_chunk_ms(answer.reply)
    chunking = t["tts_request_ms"] - t["llm_first_token_ms"] - first_chunk
    legs.update(
        prompt=prompt,
        llm_round_trip=llm - prompt,
        chunking=chunking,
        tts_round_trip=tts - chunking,
        in_service=prompt + chunking + pacer,
        provider_round_trips=llm + tts - prompt - chunking,
    )
    return legs


def server_figures(
    outcomes: list[CallOutcome], script: CallScript, providers: Providers
) -> dict[str, Any]:
    all_answers = [a for o in outcomes for a in answers(o, script)]
    stages = {s: percentiles(a.turn.get(s) for a in all_answers) for s in STAGES}
    for stage in (*REQUEST_STAGES, "retrieval_ms"):
        stages[stage] = percentiles(a.turn.get(stage) for a in all_answers)
    legs = [o for a in all_answers if (o := overhead(a, providers)) is not None]
    over = {k: percentiles(leg.get(k) for leg in legs) for k in OVERHEAD_LEGS}
    detect = percentiles(
        a.turn["stt_final_ms"] - providers.stt_final_ms
        for a in all_answers
        if a.turn.get("stt_final_ms") is not None
    )
    return {
        "stages": stages,
        "turn_detection_ms": detect,
        "overhead": over,
        "answers": len(all_answers),
    }


def lateness_figures(timings: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Percentiles of each emulator request's lateness, (first - received) - configured."""

    def late(rows: list[dict[str, float]]) -> list[float]:
        return [(r["first"] - r["received"]) * 1000 - r["configured_ms"] for r in rows]

    return {
        "llm_first_token_ms": percentiles(late(timings.get("llm", []))),
        "tts_first_byte_ms": percentiles(late(timings.get("tts", []))),
    }


def overhead_net_of_lateness(server: dict[str, Any], lateness: dict[str, Any]) -> dict[str, Any]:
    """Overhead p95 less the LLM and TTS lateness p95s: an approximation (the three p95s
    are not of the same answers, so they do not subtract exactly)."""
    parts = (
        server["overhead"]["total"]["p95"],
        lateness.get("llm_first_token_ms", {}).get("p95"),
        lateness.get("tts_first_byte_ms", {}).get("p95"),
    )
    total, llm, tts = parts
    value = None if None in parts else round(total - llm - tts, 1)
    return {
        "p95_ms": value,
        "approximate": True,
        "formula": "overhead p95 - emulator LLM lateness p95 - emulator TTS lateness p95",
    }


# --- callers --------------------------------------------------------------------------------


def _segment_values(
    result: CallerResult, values: list[float | None], labels: Iterable[str]
) -> list[float | None]:
    wanted = set(labels)
    return [
        None if v is None else v * 1000
        for seg, v in zip(result.speech, values, strict=True)
        if seg.label in wanted
    ]


def pacing(result: CallerResult) -> dict[str, list[float]]:
    """Lateness, jitter and underruns of the outbound audio, replaying the caller's playout.

    A run of audio starts when it arrives to an empty buffer or after a clear; it is paced
    by the clock once the caller has held LEAD_S (less a frame) of it. From then on each
    frame is due LEAD_S before it plays; lateness and jitter are measured on those frames."""
    clears, order = result.clears, result.clears_before_media
    play_end, prev_arrival, steady = 0.0, -math.inf, False
    prev_late: float | None = None
    late, jitter, underruns = [], [], []
    last_clear, stray, applied = -math.inf, 0, 0
    for (arrival, size), clears_before in zip(result.media, order, strict=True):
        if applied < clears_before:  # by message order: one read can hold both, same time
            while applied < clears_before:
                last_clear = clears[applied]
                applied += 1
                play_end = min(play_end, last_clear)
            prev_arrival = -math.inf
        if arrival - last_clear < STRAY_S and prev_arrival == -math.inf:
            stray += max(1, size // 160)  # sent just after the clear: stale audio heard
            continue
        if arrival >= play_end:
            if arrival - prev_arrival < CONTINUING_GAP_S:
                underruns.append((arrival - play_end) * 1000)
            steady, prev_late = False, None
        start = max(arrival, play_end)
        if steady:
            lateness = arrival - (start - LEAD_S)
            late.append(max(lateness, 0.0) * 1000)
            if prev_late is not None:
                jitter.append(abs(lateness - prev_late) * 1000)
            prev_late = lateness
        steady = steady or start - arrival >= LEAD_S - FRAME_S
        play_end = start + size / 8000
        prev_arrival = arrival
    return {"lateness": late, "jitter": jitter, "underruns": underruns, "stray": [stray]}


def _resume_gap(result: CallerResult, clear_at: float) -> float | None:
    """From a clear to the next agent audio that arrives after it (a resumed answer)."""
    # the clear's index; `clear_at` is recomputed from a latency, so not compared exactly
    index = bisect.bisect_left(result.clears, clear_at - 1e-6) + 1
    pairs = zip(result.media, result.clears_before_media, strict=True)
    nxt = next((t for (t, _), n in pairs if n >= index), None)
    return None if nxt is None else (nxt - clear_at) * 1000


def backchannel_figures(outcomes: list[CallOutcome], script: CallScript) -> dict[str, Any]:
    """False interruptions (server turns) and backchannel pauses (caller clears)."""
    if BACKCHANNEL not in script.lines:
        return {"calls": 0, "false_interruptions": 0, "pauses": 0, "pause_ms": percentiles([])}
    false_calls: list[str] = []
    pause_ms: list[float | None] = []
    pauses = checked = 0
    for outcome in outcomes:
        spoke = [s for s in outcome.caller.speech if s.label == BACKCHANNEL.label]
        if not spoke or not outcome.detail:
            continue
        checked += 1
        if _false_interruption(outcome, script):
            false_calls.append(outcome.call_id)
        index = outcome.caller.speech.index(spoke[0])
        latency = outcome.caller.barge_in_latencies()[index]
        if latency is not None:
            pauses += 1
            pause_ms.append(_resume_gap(outcome.caller, spoke[0].start + latency))
    return {
        "calls": checked,
        "false_interruptions": len(false_calls),
        "false_interruption_calls": false_calls[:10],
        "pauses": pauses,
        "pause_ms": percentiles(pause_ms),
    }


def _false_interruption(outcome: CallOutcome, script: CallScript) -> bool:
    """The backchannel became a user turn, or the answer it was said over was cut."""
    turns = outcome.detail.get("turns", [])
    if any(t["role"] == "user" and t["text"] == BACKCHANNEL.transcript for t in turns):
        return True
    over = next((a for a in answers(outcome, script) if a.index == 0), None)
    return over is None or bool(over.turn["interrupted"]) or over.turn["text"] != over.reply


def caller_figures(outcomes: list[CallOutcome], script: CallScript) -> dict[str, Any]:
    results = [o.caller for o in outcomes]
    v2v, after_barge, barge, missed = [], [], [], 0
    late, jitter, underruns, stray = [], [], [], 0
    for r in results:
        v2v += _segment_values(r, r.turn_latencies(), script.normal_turns)
        after_barge += _segment_values(r, r.turn_latencies(), [BARGE_IN.label])
        hits = _segment_values(r, r.barge_in_latencies(), [BARGE_IN.label])
        missed += sum(1 for h in hits if h is None)
        barge += hits
        p = pacing(r)
        late += p["lateness"]
        jitter += p["jitter"]
        underruns += p["underruns"]
        stray += int(p["stray"][0])
    return {
        "greeting_ms": percentiles(
            None if r.greeting_latency is None else r.greeting_latency * 1000 for r in results
        ),
        "voice_to_voice_ms": percentiles(v2v),
        "voice_to_voice_after_barge_in_ms": percentiles(after_barge),
        "barge_in_ms": percentiles(barge),
        "barge_in_missed": missed,
        "frame_lateness_ms": percentiles(late),
        "jitter_ms": percentiles(jitter),
        "underruns": len(underruns),
        "underrun_ms": percentiles(underruns),
        "frames_received": sum(size for r in results for _, size in r.media) // 160,
        "media_messages_received": sum(len(r.media) for r in results),
        "frames_after_clear": stray,
    }


# --- calls and resources ----------------------------------------------------------------------


def call_figures(outcomes: list[CallOutcome], script: CallScript) -> dict[str, Any]:
    """How the calls went: ended as scripted, errors, peak concurrency."""
    ended: dict[str, int] = {}
    for o in outcomes:
        ended[o.caller.ended_by or "none"] = ended.get(o.caller.ended_by or "none", 0) + 1
    errors = [o.error or "; ".join(o.caller.errors) for o in outcomes if o.error or o.caller.errors]
    incomplete = [
        {"call_id": o.call_id, "why": why, "turns": _turn_outline(o)}
        for o in outcomes
        if (why := _incomplete(o, script)) is not None
    ]
    return {
        "placed": len(outcomes),
        "completed": len(outcomes) - len(incomplete),
        "ended_by": ended,
        "errors": errors[:10],
        "incomplete": incomplete[:10],
        "peak_concurrent": peak_concurrency(o.caller for o in outcomes),
        "call_seconds": round(sum(o.caller.duration for o in outcomes), 1),
    }


def _turn_outline(outcome: CallOutcome) -> list[dict[str, Any]]:
    """The call's turns as the service recorded them (the script's own lines, no caller
    data), for reading why a call did not complete."""
    keys = ("role", "text", "start_s", "end_s", "interrupted", "stt_final_ms", "first_media_ms")
    return [{k: t.get(k) for k in keys} for t in outcome.detail.get("turns", [])]


def _incomplete(outcome: CallOutcome, script: CallScript) -> str | None:
    """Why a call does not count as completed, or None if it does: completed is the caller
    hanging up after hearing an answer to each of its turns."""
    r = outcome.caller
    if outcome.error:
        return f"error: {outcome.error}"
    if r.ended_by != "hangup":
        return f"ended by {r.ended_by or 'nobody'}, not the caller's hang-up"
    timed = len(answers(outcome, script))
    if timed != len(script.replies):
        assistant = [t for t in outcome.detail.get("turns", []) if t["role"] == "assistant"]
        shape = [
            ("timed" if t.get("stt_final_ms") is not None else "untimed")
            + (", interrupted" if t.get("interrupted") else "")
            for t in assistant
        ]
        return f"{timed} timed answers of {len(script.replies)}; assistant turns: {shape}"
    reason = outcome.detail.get("ended_reason")
    if reason != "customer-ended-call":
        return f"ended_reason {reason!r}"
    return None


def peak_concurrency(results: Iterable[CallerResult]) -> int:
    edges = []
    for r in results:
        if r.started_at:
            edges += [(r.started_at, 1), (r.started_at + r.duration, -1)]
    level = peak = 0
    for _, step in sorted(edges):
        level += step
        peak = max(peak, level)
    return peak


def resource_figures(
    cpu_s: float, call_seconds: float, idle_rss: int, peak_rss: int, calls: int
) -> dict[str, Any]:
    """Server CPU per call-minute, calls per core, and RSS per concurrent call."""
    per_minute = cpu_s / (call_seconds / 60) if call_seconds else None
    fraction = None if per_minute is None else per_minute / 60
    return {
        "server_cpu_s": round(cpu_s, 2),
        "cpu_s_per_call_minute": None if per_minute is None else round(per_minute, 3),
        "cpu_fraction_per_call": None if fraction is None else round(fraction, 5),
        "calls_per_core": None if not fraction else round(1 / fraction, 1),
        "idle_rss_mb": round(idle_rss / 2**20, 1),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "rss_per_call_mb": round((peak_rss - idle_rss) / 2**20 / max(calls, 1), 3),
    }


LOOP_LAG = "aisdr_event_loop_lag_seconds"


def loop_lag_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The service's event-loop lag over the load, from its histogram's buckets on /metrics
    (a sample every 0.25 s): the sample count, the bucket bound under which 50/95/99% of the
    samples fall (an upper bound, in ms), the share of samples over 10 ms, and the mean."""
    prefix = LOOP_LAG + '_bucket{le="'
    bounds = sorted(
        (float(key[len(prefix) : -2]), after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith(prefix)
    )
    n = after.get(LOOP_LAG + "_count", 0.0) - before.get(LOOP_LAG + "_count", 0.0)
    total = after.get(LOOP_LAG + "_sum", 0.0) - before.get(LOOP_LAG + "_sum", 0.0)
    if not n or not bounds:
        return {"n": int(n)}

    def bound_ms(q: float) -> float | None:
        bound = next((b for b, count in bounds if count >= q * n), None)
        return None if bound is None or bound == float("inf") else round(bound * 1000, 1)

    within_10ms = next((count for b, count in bounds if b >= 0.01), n)
    return {
        "n": int(n),
        "p50_le_ms": bound_ms(0.50),
        "p95_le_ms": bound_ms(0.95),
        "p99_le_ms": bound_ms(0.99),
        "over_10ms_pct": round(100 * (n - within_10ms) / n, 1),
        "mean_ms": round(1000 * total / n, 2),
    }
