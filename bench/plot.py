"""`python -m bench.plot REPORT.json [-o OUT.png]`: the capacity chart of a `--sweep` report.

    .venv/bin/python -m bench.plot bench/results/s12-sweep.json -o docs/capacity-s12-sweep.png

Calls (N, one call per slot) on the x axis of three panels that share it: the service's CPU
as a share of one core; voice-to-voice latency; pipeline overhead and barge-in latency. The
targets are drawn as dashed lines at the limits the report itself was judged against, and
the first N that fails today's sweep bound (`bench.targets.SWEEP_TARGETS`) is marked, with
the steps past it shaded. Missing figures (older reports) leave gaps.

Draws with matplotlib's Agg backend (no display). Imports nothing of ours but the bench's
report reader; never the service, FastAPI or a vendor SDK.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display here or in CI

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from bench.targets import SWEEP_TARGETS, passes, report_field


class NotASweep(ValueError):
    """The file is JSON but not the report of `python -m bench --sweep`."""


@dataclass
class Sweep:
    """A sweep's steps, in order of N, and what the report says about its bound."""

    name: str
    command: str
    pinned: bool
    steps: list[dict[str, Any]]
    recorded_first_failing: int | None

    @property
    def calls(self) -> list[int]:
        return [int(report_field(step, "run.calls")) for step in self.steps]

    def series(self, path: str) -> list[float]:
        """One figure per step; NaN where a step lacks it, so the line shows a gap."""
        values = (report_field(step, path) for step in self.steps)
        return [float(v) if isinstance(v, int | float) else math.nan for v in values]

    def limit(self, target: str) -> float | None:
        """The limit a target was judged against in the report (the same at every step)."""
        for step in self.steps:
            for t in step.get("targets", []):
                if t.get("target") == target:
                    return float(str(t["limit"]).split()[-1])
        return None

    def first_failing(self) -> tuple[int, list[str]] | None:
        """The smallest N whose step misses the sweep bound, with the targets it missed."""
        for n, step in zip(self.calls, self.steps, strict=True):
            if not passes(step):
                missed = [t["target"] for t in step["targets"] if not t["met"]]
                return n, [name for name in missed if name in SWEEP_TARGETS]
        return None


def load(path: Path) -> Sweep:
    """A sweep report from `path`; NotASweep (or a JSON/OS error) when it is not one."""
    report = json.loads(path.read_text())
    steps = report.get("steps") if isinstance(report, dict) else None
    if not isinstance(steps, list) or not steps:
        raise NotASweep("it has no sweep steps; draw the report of `python -m bench --sweep`")
    for step in steps:
        if not isinstance(step, dict) or not isinstance(report_field(step, "run.calls"), int):
            raise NotASweep("a sweep step has no `run.calls`")
        if not isinstance(step.get("targets"), list):
            raise NotASweep("a sweep step has no `targets`")
    return Sweep(
        name=path.stem,
        command=str(report.get("command") or "python -m bench --sweep"),
        pinned=bool(report.get("pinned")),
        steps=sorted(steps, key=lambda s: report_field(s, "run.calls")),
        recorded_first_failing=report.get("first_failing_calls"),
    )


# --- drawing ------------------------------------------------------------------------------

COLOURS = {"cpu": "tab:blue", "v2v": "tab:purple", "overhead": "tab:orange", "barge": "tab:green"}


def _target_line(ax: Axes, y: float | None, colour: str, label: str) -> None:
    """A dashed line at a target's limit, labelled at the left, where the sweep is calm."""
    if y is not None:
        ax.axhline(y, color=colour, linestyle="--", linewidth=1, alpha=0.8)
        ax.annotate(
            f"{label} ({y:g})",
            (0.0, y),
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=8,
            color=colour,
        )


def _percentiles(ax: Axes, sweep: Sweep, path: str, colour: str, label: str) -> None:
    ax.plot(sweep.calls, sweep.series(f"{path}.p95"), "o-", color=colour, label=f"{label} p95")
    ax.plot(sweep.calls, sweep.series(f"{path}.p50"), "o:", color=colour, label=f"{label} p50")


def _cpu_panel(ax: Axes, sweep: Sweep) -> None:
    calls = sweep.calls
    peak = sweep.series("resources.server_peak_cpu_pct")
    per_call = sweep.series("resources.cpu_fraction_per_call")
    all_connected = [n * f * 100 for n, f in zip(calls, per_call, strict=True)]
    ax.plot(calls, peak, "o-", color=COLOURS["cpu"], label="service CPU, busiest 2 s")
    ax.plot(
        calls,
        all_connected,
        "o:",
        color=COLOURS["cpu"],
        label="N x the step's CPU per connected call",
    )
    per_core = sweep.limit("calls per server core")
    if per_core:
        top = max(calls)
        ax.plot(
            [0, top],
            [0, top / per_core * 100],
            "--",
            color="grey",
            linewidth=1,
            label=f"capacity target ({per_core:g} calls per core): N/{per_core:g} of a core",
        )
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_ylabel("% of one core")
    ax.set_ylim(0, 5 + max(100.0, *(v for v in peak + all_connected if not math.isnan(v))))
    ax.legend(loc="upper left", fontsize=8)


def _log_axis(ax: Axes) -> None:
    """A log axis labelled 1, 2, 5, 10, 20, 50, ... ms, with room at the top for the legend."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 4)


def _latency_panels(v2v: Axes, fast: Axes, sweep: Sweep) -> None:
    _percentiles(v2v, sweep, "caller.voice_to_voice_ms", COLOURS["v2v"], "voice-to-voice")
    _target_line(
        v2v,
        sweep.limit("voice-to-voice p95 ms (providers + 30)"),
        COLOURS["v2v"],
        "p95 target: providers + 30 ms",
    )
    _target_line(
        v2v,
        sweep.limit("voice-to-voice p95 ms (+ turn detection)"),
        COLOURS["v2v"],
        "p95 target: providers + turn detection + 30 ms",
    )
    v2v.set_ylabel("ms")
    v2v.legend(loc="lower right", fontsize=8)

    _percentiles(fast, sweep, "server.overhead.total", COLOURS["overhead"], "pipeline overhead")
    _percentiles(fast, sweep, "caller.barge_in_ms", COLOURS["barge"], "barge-in")
    _target_line(
        fast, sweep.limit("pipeline overhead p95 ms"), COLOURS["overhead"], "overhead p95 target"
    )
    _target_line(fast, sweep.limit("barge-in p95 ms"), COLOURS["barge"], "barge-in p95 target")
    _log_axis(fast)
    fast.set_ylabel("ms (log scale)")
    fast.legend(loc="upper left", fontsize=8, ncol=2)


def _mark_failing(axes: list[Axes], sweep: Sweep) -> str:
    """Marks the first failing N on every panel; returns a line saying what failed there."""
    failing = sweep.first_failing()
    if failing is None:
        return f"every step met the sweep bound, up to N={max(sweep.calls)}"
    n, missed = failing
    for ax in axes:
        ax.axvline(n, color="red", linewidth=1.2)
        ax.axvspan(n, max(sweep.calls), color="red", alpha=0.06)
    axes[0].annotate(
        f"first failing N={n}",
        (n, 0.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, 6),
        textcoords="offset points",
        color="red",
        fontsize=9,
    )
    line = f"first failing N={n}: " + ", ".join(missed)
    if sweep.recorded_first_failing not in (None, n):
        line += f" (the sweep itself, on its bound then, stopped at {sweep.recorded_first_failing})"
    return line


def _spaced(calls: list[int]) -> list[int]:
    """The Ns to label on the x axis: each at least 5% of the range past the last one."""
    labelled = [calls[0]]
    for n in calls[1:]:
        if n - labelled[-1] >= 0.05 * calls[-1]:
            labelled.append(n)
    return labelled


def draw(sweep: Sweep, out: Path) -> None:
    """Writes the chart of `sweep` to `out` as a PNG."""
    fig, axes = plt.subplots(
        3, 1, sharex=True, figsize=(9, 10), height_ratios=[1.0, 1.0, 1.1], layout="constrained"
    )
    try:
        _cpu_panel(axes[0], sweep)
        _latency_panels(axes[1], axes[2], sweep)
        failing = _mark_failing(list(axes), sweep)
        for ax in axes:
            ax.grid(True, which="major", alpha=0.3)
        axes[-1].set_xlabel("concurrent calls N (one call per slot)")
        axes[-1].set_xticks(_spaced(sweep.calls))
        axes[-1].set_xlim(0, max(sweep.calls) * 1.03)
        where = "pinned: the service on a core of its own" if sweep.pinned else "unpinned"
        fig.suptitle(
            f"Capacity sweep {sweep.name} ({where})\n`{sweep.command}`\n{failing}", fontsize=10
        )
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="the JSON report of `python -m bench --sweep`")
    p.add_argument("-o", "--out", type=Path, help="the PNG to write (default: REPORT.png)")
    args = p.parse_args(argv)
    if not args.report.is_file():
        p.error(f"no such report: {args.report}")
    try:
        sweep = load(args.report)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and NotASweep are ValueErrors
        p.error(f"not a sweep report: {args.report}: {exc}")
    out = args.out or args.report.with_suffix(".png")
    if not out.parent.is_dir():
        p.error(f"no such folder for the chart: {out.parent}")
    draw(sweep, out)
    print(f"chart: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
