"""`python -m bench`: many concurrent simulated phone calls against the real service.

    .venv/bin/python -m bench --calls 100 --duration 60
    .venv/bin/python -m bench --sweep                 # highest N that meets the targets

The emulators and the service each run in their own subprocess; this process is the load
generator (N TwilioCaller slots over real sockets). Prints a table and writes the whole
report as JSON to bench/results/<UTC timestamp>.json. See BENCHMARKS.md for definitions.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.runner import RunConfig, run_sync
from bench.script import SCRIPTS, Providers, emulator_config
from bench.stack import BenchStack, pin_process
from bench.targets import passes, table

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100, help="concurrent call slots")
    p.add_argument("--duration", type=float, default=60, help="seconds of load (>= one call)")
    p.add_argument("--stagger", type=float, default=0.05, help="seconds between slot starts")
    p.add_argument("--script", choices=sorted(SCRIPTS), default="full")
    p.add_argument("--stt-final-ms", type=int, default=150)
    p.add_argument("--llm-ttft-ms", type=int, default=250)
    p.add_argument("--llm-tokens-per-s", type=float, default=40.0)
    p.add_argument("--tts-first-byte-ms", type=int, default=150)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up call")
    p.add_argument("--default-loop", action="store_true", help="asyncio loop, h11 (no uvloop)")
    p.add_argument("--sweep", action="store_true", help="find the highest N meeting targets")
    p.add_argument("--sweep-start", type=int, default=25)
    p.add_argument("--sweep-max", type=int, default=800)
    p.add_argument(
        "--py-spy", type=Path, help="py-spy profile of the server (.svg, or .txt for raw)"
    )
    p.add_argument("--service-dir", type=Path, help="run the service from this checkout")
    p.add_argument(
        "--ws",
        default=None,
        help="the service's uvicorn --ws (default: the tree's own media_ws protocol; "
        "websockets-sansio: messages through ASGI receive())",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="the service's MAX_CONCURRENT_CALLS (default 0: no cap, so capacity is measured);"
        " refused calls are redialled",
    )
    p.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        help="niceness of the load generator (the simulated callers) once the service and"
        " emulators are up; they keep theirs, so the scheduler runs the service first",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="once up, run the service on the first CPU and the load generator and emulators on"
        " the others (sched_setaffinity), so the two sides do not take turns on one core",
    )
    p.add_argument("--out", type=Path, help="JSON report path (default bench/results/...)")
    return p.parse_args(argv)


def providers_from(args: argparse.Namespace) -> Providers:
    return Providers(
        stt_final_ms=args.stt_final_ms,
        llm_ttft_ms=args.llm_ttft_ms,
        llm_tokens_per_s=args.llm_tokens_per_s,
        tts_first_byte_ms=args.tts_first_byte_ms,
    )


def measure(
    stack: BenchStack, config: RunConfig, providers: Providers, args: argparse.Namespace
) -> dict[str, Any]:
    """One run, under py-spy if asked."""
    spy = None
    if args.py_spy:
        assert stack.server is not None
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(stack.server.pid),
                "-o",
                str(args.py_spy),
                # Blocking: each sample pauses the service for a moment, so its figures from
                # a profiled run read a little high. --nonblocking reads the stacks while they
                # change and gave mixed-up stacks (frames of one task under another's).
                "--rate",
                "50",
                "--gil",  # only the thread holding the GIL: what uses the interpreter
                *(["--format", "raw"] if args.py_spy.suffix == ".txt" else []),
            ],
            stdout=subprocess.DEVNULL,
        )
    try:
        return run_sync(stack, config, providers, warm=not args.no_warmup)
    finally:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes the profile and exits
            spy.wait(60)


def sweep(stack: BenchStack, args: argparse.Namespace, providers: Providers) -> dict[str, Any]:
    """Double N while the targets hold, then bisect between the last pass and first fail."""
    steps: list[dict[str, Any]] = []

    def attempt(n: int) -> bool:
        config = RunConfig(n, 0.0, args.stagger, args.script)
        result = measure(stack, config, providers, args)
        steps.append(result)
        ok = passes(result)
        print(f"sweep N={n}: {'pass' if ok else 'fail'}", flush=True)
        print(table(result), flush=True)
        return ok

    low, high, n = 0, None, args.sweep_start
    while n <= args.sweep_max and attempt(n):
        low, n = n, n * 2
    high = n if n <= args.sweep_max else None
    while high is not None and high - low > max(5, low // 10):
        mid = (low + high) // 2
        low, high = (mid, high) if attempt(mid) else (low, mid)
    return {"highest_passing_calls": low, "first_failing_calls": high, "steps": steps}


def pin_sides(stack: BenchStack) -> dict[str, list[int]]:
    """The service's threads on the first CPU it may use; this process (the callers) and the
    emulators on the rest."""
    assert stack.server is not None and stack.emulators is not None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    service, rest = {cpus[0]}, set(cpus[1:])
    pin_process(stack.server.pid, service)
    pin_process(stack.emulators.pid, rest)
    pin_process(os.getpid(), rest)
    return {"service": sorted(service), "generator_and_emulators": sorted(rest)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    providers = providers_from(args)
    script = SCRIPTS[args.script]
    out = args.out or RESULTS / (datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aisdr-bench-") as tmp:
        with (
            out.with_suffix(".log").open("w") as log,
            BenchStack(
                emulator_config(script, providers),
                Path(tmp),
                fast_loop=not args.default_loop,
                log=log,
                service_dir=args.service_dir,
                max_concurrent=args.max_concurrent,
                ws_protocol=args.ws,
            ) as stack,
        ):
            if args.generator_nice:
                # This thread runs the callers' event loop; nice is per thread on Linux, and
                # the service and emulators, started already, keep their own.
                os.setpriority(os.PRIO_PROCESS, 0, args.generator_nice)
            if args.pin:
                stack.pinned = pin_sides(stack)
            if args.sweep:
                result = sweep(stack, args, providers)
            else:
                config = RunConfig(args.calls, args.duration, args.stagger, args.script)
                result = measure(stack, config, providers, args)
                print(table(result), flush=True)
        result["command"] = "python -m bench " + " ".join(argv or sys.argv[1:])
        result["generator_nice"] = args.generator_nice
        result["pinned"] = stack.pinned
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"report: {out} (service and emulator logs: {out.with_suffix('.log').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
