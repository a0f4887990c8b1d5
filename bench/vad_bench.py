"""What Silero VAD costs per call. Prints figures; asserts nothing.

    .venv/bin/python -m bench.vad_bench [--streams 100] [--seconds 10] [--no-paced]

1. Model: cost of one inference of B windows, B = 1, 10, 50, 100, 200.
2. Batcher round trip for a single stream (no batching possible, no wait): inline vs
   offloaded.
3. N streams of 20 ms frames, a mix of speech, pauses and line noise, processed as fast as
   possible (all calls' frames of one 20 ms tick submitted together): CPU per call.
4. The same N streams paced in real time with random frame phases, each call its own task:
   CPU use, batch sizes and the wall time from a frame's arrival to its VAD result.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from emulators.audio import frames, noise, silence, synth_speech
from pipeline.vad import INPUT_SAMPLES, STATE_SIZE, SileroModel, VADBatcher, VADStream

PHRASES = [
    "Hi, I would like to book a demo next Tuesday",
    "uh-huh",
    "Sorry, can you repeat that?",
    "Wait, what about pricing?",
    "yeah",
    "We already use another vendor for that.",
    "okay",
]
FRAME_SECONDS = 0.02


def bench_model(model: SileroModel) -> None:
    print("1. Silero inference (one session, 1 thread)")
    print(f"   {'B':>4} {'per batch':>12} {'per window':>12}")
    rng = np.random.default_rng(0)
    for batch in (1, 10, 50, 100, 200):
        windows = (0.1 * rng.standard_normal((batch, INPUT_SAMPLES))).astype(np.float32)
        states = np.zeros((2, batch, STATE_SIZE), dtype=np.float32)
        for _ in range(10):
            model.infer(windows, states)
        repeats = max(20, 4000 // batch)
        started = time.perf_counter()
        for _ in range(repeats):
            model.infer(windows, states)
        per_batch = (time.perf_counter() - started) / repeats
        print(f"   {batch:>4} {per_batch * 1e6:>9.0f} us {per_batch / batch * 1e6:>9.1f} us")


async def bench_round_trip(model: SileroModel) -> None:
    print("2. One stream alone, batcher round trip per window (B=1)")
    window = np.zeros(INPUT_SAMPLES, dtype=np.float32) + 0.01
    for offload in (False, True):
        batcher = VADBatcher(model, offload=offload, max_wait_ms=0)
        state = np.zeros((2, STATE_SIZE), dtype=np.float32)
        for _ in range(50):
            await batcher.infer(window, state)
        repeats = 2000
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            await batcher.infer(window, state)
        wall = (time.perf_counter() - wall) / repeats
        cpu = (time.process_time() - cpu) / repeats
        mode = "offload" if offload else "inline "
        print(f"   {mode}: {wall * 1e6:6.0f} us wall, {cpu * 1e6:6.0f} us CPU per window")


def caller_script(rng: random.Random, seconds: float) -> list[bytes]:
    """Pauses (digital silence or low line noise) and phrases until `seconds` of audio."""
    audio = b""
    while len(audio) < seconds * 8000:
        pause = rng.uniform(0.3, 2.0)
        if rng.random() < 0.3:
            audio += noise(pause, amplitude=rng.uniform(0.001, 0.01), seed=rng.randrange(1000))
        else:
            audio += silence(pause)
        audio += synth_speech(rng.choice(PHRASES))
    # a random phase, so that callers' 32 ms windows do not all complete on the same frame
    return frames(silence(rng.randrange(8) * FRAME_SECONDS) + audio)[: int(seconds / 0.02)]


@dataclass
class RunFigures:
    wall: float
    cpu: float
    windows: int
    inferences: int
    batches: int
    max_batch: int


async def run_fast(scripts: list[list[bytes]], batcher: VADBatcher, **options: Any) -> RunFigures:
    streams = [VADStream(batcher, **options) for _ in scripts]
    wall, cpu = time.perf_counter(), time.process_time()
    for step in zip(*scripts, strict=True):
        await asyncio.gather(*(s.process(f) for s, f in zip(streams, step, strict=True)))
    return RunFigures(
        time.perf_counter() - wall,
        time.process_time() - cpu,
        sum(s.windows for s in streams),
        sum(s.inferences for s in streams),
        batcher.stats.batches,
        batcher.stats.max_batch,
    )


async def bench_fast(model: SileroModel, scripts: list[list[bytes]], seconds: float) -> None:
    calls = len(scripts)
    print(f"3. {calls} streams x {seconds:.0f} s of audio, as fast as possible")
    cases = [
        ("offload, gate on ", True, -55.0),
        ("inline,  gate on ", False, -55.0),
        ("offload, gate off", True, None),
        ("inline,  gate off", False, None),
    ]
    for label, offload, gate in cases:
        # every call's frame of a tick is submitted in the same loop turn: no wait needed
        batcher = VADBatcher(model, offload=offload, max_wait_ms=0)
        figures = await run_fast(scripts, batcher, energy_gate_dbfs=gate)
        per_call = figures.cpu / (calls * seconds)
        print(
            f"   {label}: {figures.cpu:5.2f} s CPU, {figures.wall:5.2f} s wall for "
            f"{calls * seconds:.0f} call-seconds -> {per_call * 100:.3f}% of a core per call; "
            f"{figures.inferences}/{figures.windows} windows inferred, "
            f"{figures.batches} batches (mean {figures.inferences / max(figures.batches, 1):.1f},"
            f" max {figures.max_batch})"
        )


async def paced_call(
    stream: VADStream | None, script: list[bytes], start: float, latencies: list[float]
) -> None:
    """Frames at real-time pace; without a stream, only the pacing (the baseline)."""
    loop = asyncio.get_running_loop()
    for index, frame in enumerate(script):
        due = start + index * FRAME_SECONDS
        await asyncio.sleep(max(0.0, due - loop.time()))
        if stream is None:
            continue
        inferences = stream.inferences
        await stream.process(frame)
        if stream.inferences > inferences:
            latencies.append(loop.time() - due)


async def run_paced(
    scripts: list[list[bytes]], batcher: VADBatcher | None
) -> tuple[float, float, list[float]]:
    """Returns process CPU seconds, event-loop thread CPU seconds, and latencies."""
    rng = random.Random(1)
    latencies: list[float] = []
    begin = asyncio.get_running_loop().time() + 0.1
    cpu, loop_cpu = time.process_time(), time.thread_time()
    async with asyncio.TaskGroup() as group:
        for script in scripts:
            stream = VADStream(batcher) if batcher else None
            start = begin + rng.uniform(0, FRAME_SECONDS)
            group.create_task(paced_call(stream, script, start, latencies))
    return time.process_time() - cpu, time.thread_time() - loop_cpu, latencies


async def bench_paced(model: SileroModel, scripts: list[list[bytes]], seconds: float) -> None:
    print(f"4. {len(scripts)} streams paced in real time for {seconds:.0f} s (random phases)")
    cpu, loop_cpu, _ = await run_paced(scripts, None)
    base, loop_base = cpu / seconds, loop_cpu / seconds
    print(f"   pacing alone: {base * 100:.1f}% of a core; VAD figures below exclude it")
    for offload, wait_ms in [(False, 0), (False, 2), (False, 5), (True, 0), (True, 2), (True, 5)]:
        batcher = VADBatcher(model, offload=offload, max_wait_ms=wait_ms)
        cpu, loop_cpu, latencies = await run_paced(scripts, batcher)
        stats = batcher.stats
        ms = sorted(x * 1000 for x in latencies)
        mode = "offload" if offload else "inline "
        print(
            f"   {mode} wait {wait_ms} ms: VAD CPU {(cpu / seconds - base) * 100:5.1f}% "
            f"(loop thread {(loop_cpu / seconds - loop_base) * 100:5.1f}%); "
            f"batch mean {stats.windows / max(stats.batches, 1):4.1f} max {stats.max_batch:3d}; "
            f"frame -> result p50 {statistics.median(ms):5.2f} ms, "
            f"p99 {ms[int(len(ms) * 0.99)]:5.2f} ms, max {ms[-1]:5.2f} ms"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-paced", action="store_true")
    args = parser.parse_args()

    model = SileroModel.load()
    bench_model(model)
    await bench_round_trip(model)
    rng = random.Random(0)
    scripts = [caller_script(rng, args.seconds) for _ in range(args.streams)]
    await bench_fast(model, scripts, args.seconds)
    if not args.no_paced:
        await bench_paced(model, scripts, args.seconds)


if __name__ == "__main__":
    asyncio.run(main())
