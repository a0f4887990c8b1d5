"""One benchmark run against a started BenchStack: an optional warm-up call, the idle
reading, N concurrent call slots for the duration while the server's memory is sampled,
then the report dict (figures, resources, targets).

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.calibrate import emulator_floor, emulator_timings
from bench.load import (
    CallOutcome,
    LoadPlan,
    api_client,
    create_agent,
    fetch_details,
    read_metrics,
    run_load,
)
from bench.script import GREETING, SCRIPTS, CallScript, Providers
from bench.stack import CLOCK_TICKS, BenchStack, ProcSample, proc_sample
from bench.targets import evaluate

DROPPED = "aisdr_inbound_frames_dropped_total"
TTS_SOCKETS = "aisdr_tts_sockets_open"
TTS_REST = "aisdr_tts_rest_fallback_requests"
TTS_INLINE = "aisdr_tts_inline_connect_requests"


@dataclass(frozen=True)
class RunConfig:
    calls: int
    duration_s: float
    stagger_s: float = 0.05
    script: str = "full"
    max_call_s: float = 90.0


class PeakSampler:
    """Samples processes' RSS and CPU every `period` s in a thread, summed over `pids`: the
    peak RSS, and the busiest `window` s of CPU (as a share of one core)."""

    def __init__(self, *pids: int, period: float = 0.5, window: float = 2.0) -> None:
        self.pids, self.period, self.window = pids, period, window
        self.peak_rss = 0
        self.samples: list[ProcSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                each = [proc_sample(pid) for pid in self.pids]
                sample = ProcSample(
                    time.monotonic(),
                    sum(one.cpu_s for one in each),
                    sum(one.rss_bytes for one in each),
                )
                self.samples.append(sample)
                self.peak_rss = max(self.peak_rss, sample.rss_bytes)
            self._stop.wait(self.period)

    @property
    def peak_cpu_pct(self) -> float:
        steps = max(int(self.window / self.period), 1)
        rates = [
            (b.cpu_s - a.cpu_s) / (b.at - a.at)
            for a, b in zip(self.samples, self.samples[steps:], strict=False)
            if b.at > a.at
        ]
        return round(100 * max(rates, default=0.0), 1)


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, steal) jiffies of all CPUs from /proc/stat. Steal, time the hypervisor
    gave this VM's CPUs to others, counts as busy: nothing here could run then."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values), values[7]


def _cpu_delta(before: ProcSample, after: ProcSample) -> float:
    return after.cpu_s - before.cpu_s


async def ensure_agent(stack: BenchStack) -> None:
    """The one agent every call reaches (created once per stack)."""
    if stack.agent is None:
        async with api_client(stack) as http:
            stack.agent = await create_agent(http, GREETING)


async def warm_up(stack: BenchStack, script: CallScript) -> None:
    """One call of the script's first exchange, so lazily built parts (SDK clients,
    connection pools, codecs) are not charged to the measured load."""
    first = CallScript("short", script.lines[:1], script.replies[:1], script.normal_turns[:1])
    await run_load(stack, LoadPlan(1, 0.0, 0.0, first, max_call_s=40.0))


@dataclass(frozen=True)
class Readings:
    """Counters read before and after the load."""

    server: ProcSample
    emulators: ProcSample
    generator: ProcSample
    machine: tuple[float, float, float]
    metrics: dict[str, float]


async def take_readings(stack: BenchStack) -> Readings:
    return Readings(
        stack.server_sample(),
        stack.emulator_sample(),
        proc_sample(os.getpid()),
        machine_busy(),
        await read_metrics(stack),
    )


async def run_once(stack: BenchStack, config: RunConfig, providers: Providers) -> dict[str, Any]:
    """The load phase and its report."""
    script = SCRIPTS[config.script]
    plan = LoadPlan(config.calls, config.duration_s, config.stagger_s, script, config.max_call_s)
    floor = await emulator_floor(stack, providers)
    idle_rate = await idle_cpu_rate(stack)
    before = await take_readings(stack)
    load_start = time.monotonic()
    assert stack.emulators is not None
    with (
        PeakSampler(server_pid(stack)) as sampler,
        PeakSampler(os.getpid()) as generator,
        PeakSampler(os.getpid(), stack.emulators.pid) as generator_side,
    ):
        placed = await run_load(stack, plan)
    load_end = time.monotonic()
    outcomes = [o for o in placed if not o.refused]
    at_hangup = stack.server_sample()
    settle_s = await settle(stack, idle_rate)
    after = await take_readings(stack)
    await fetch_details(stack, outcomes)
    timings = await emulator_timings(stack, load_start, load_end)
    calls = report.call_figures(outcomes, script)
    calls["refused"] = len(placed) - len(outcomes)
    result = _figures(outcomes, script, providers, calls)
    result["resources"] = resources(before, after, sampler, idle_rate, calls)
    result["resources"]["load_generator_peak_cpu_pct"] = generator.peak_cpu_pct
    result["resources"]["generator_and_emulators_peak_cpu_pct"] = generator_side.peak_cpu_pct
    result["resources"]["settle_s"] = round(settle_s, 1)
    result["resources"]["after_hangup_cpu_s"] = round(_cpu_delta(at_hangup, after.server), 2)
    result["emulator_floor"] = floor  # before evaluate(): the net overhead needs it
    result["emulator_lateness"] = report.lateness_figures(timings)
    result["server"]["overhead_net_of_emulator_lateness"] = report.overhead_net_of_lateness(
        result["server"], result["emulator_lateness"]
    )
    result["inbound_frames_dropped"] = after.metrics.get(DROPPED, 0) - before.metrics.get(
        DROPPED, 0
    )
    result["loop_lag"] = report.loop_lag_figures(before.metrics, after.metrics)
    result["tts_sockets"] = {  # the speak WebSocket pool, when the service uses it
        "open_after": after.metrics.get(TTS_SOCKETS),
        "rest_fallbacks": after.metrics.get(TTS_REST, 0) - before.metrics.get(TTS_REST, 0),
        "inline_connects": after.metrics.get(TTS_INLINE, 0) - before.metrics.get(TTS_INLINE, 0),
    }
    result["run"] = {**asdict(config), "providers": asdict(providers), "cores": os.cpu_count()}
    result["pinned"] = stack.pinned
    result["targets"] = evaluate(result, providers, script)
    return result


def resources(
    before: Readings, after: Readings, sampler: PeakSampler, idle_rate: float, calls: dict[str, Any]
) -> dict[str, Any]:
    """Service CPU and memory per call, and what else used the machine meanwhile."""
    wall_s = after.server.at - before.server.at
    server_cpu = _cpu_delta(before.server, after.server)
    out = report.resource_figures(
        server_cpu,
        calls["call_seconds"],
        before.server.rss_bytes,
        max(sampler.peak_rss, after.server.rss_bytes),
        calls["peak_concurrent"] or 1,
    )
    net = report.resource_figures(server_cpu - idle_rate * wall_s, calls["call_seconds"], 0, 0, 1)
    emulators = _cpu_delta(before.emulators, after.emulators)
    generator = _cpu_delta(before.generator, after.generator)
    busy, total, steal = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    return {
        **out,
        "idle_cpu_s_per_s": round(idle_rate, 4),
        "server_peak_cpu_pct": sampler.peak_cpu_pct,
        "calls_per_core_net_of_idle": net["calls_per_core"],
        "emulators_cpu_s": round(emulators, 2),
        "load_generator_cpu_s": round(generator, 2),
        "machine_cpu_busy_pct": round(100 * busy / max(total, 1), 1),
        "machine_cpu_steal_pct": round(100 * steal / max(total, 1), 1),
        "other_processes_cpu_s": round(
            (busy - steal) / CLOCK_TICKS - server_cpu - emulators - generator, 1
        ),
        "wall_s": round(wall_s, 1),
    }


SETTLE_STEP_S = 0.5
SETTLE_MAX_S = 30.0


async def settle(stack: BenchStack, idle_rate: float) -> float:
    """Wait until the service has finished what the calls left it (the last calls' final
    writes, post-call analysis, webhooks): its CPU rate over half a second back within
    0.05 CPU-s/s of idle, at most 30 s. The load's CPU then includes that work. Returns
    the seconds waited."""
    started = time.monotonic()
    last = stack.server_sample()
    while time.monotonic() - started < SETTLE_MAX_S:
        await asyncio.sleep(SETTLE_STEP_S)
        now = stack.server_sample()
        rate = (now.cpu_s - last.cpu_s) / max(now.at - last.at, 1e-6)
        last = now
        if rate <= idle_rate + 0.05:
            break
    return time.monotonic() - started


async def idle_cpu_rate(stack: BenchStack, seconds: float = 3.0) -> float:
    """The server's CPU seconds per second with no call (timers, housekeeping)."""
    before = stack.server_sample()
    await asyncio.sleep(seconds)
    after = stack.server_sample()
    return (after.cpu_s - before.cpu_s) / (after.at - before.at)


def server_pid(stack: BenchStack) -> int:
    assert stack.server is not None
    return stack.server.pid


def _figures(
    outcomes: list[CallOutcome],
    script: CallScript,
    providers: Providers,
    calls: dict[str, Any],
) -> dict[str, Any]:
    return {
        "calls": calls,
        "server": report.server_figures(outcomes, script, providers),
        "caller": report.caller_figures(outcomes, script),
        "backchannel": report.backchannel_figures(outcomes, script),
        "budget_ms": {
            "providers": {r[:40]: round(providers.budget_ms(r), 1) for r in script.replies},
            "first_chunk_ms": {r[:40]: providers.first_chunk_ms(r) for r in script.replies},
        },
    }


def run_sync(
    stack: BenchStack, config: RunConfig, providers: Providers, warm: bool
) -> dict[str, Any]:
    """Run (after a warm-up call) on a fresh event loop, uvloop when available."""

    async def main() -> dict[str, Any]:
        await ensure_agent(stack)
        if warm:
            await warm_up(stack, SCRIPTS[config.script])
        return await run_once(stack, config, providers)

    figures: dict[str, Any] = _run(main())
    return figures


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
