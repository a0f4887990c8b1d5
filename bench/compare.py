"""`python -m bench.compare REPORT.json ...`: the headline figures of several bench reports,
one row per run, for A/B comparisons. A sweep's report gives one row per step (`name@N`).

    .venv/bin/python -m bench.compare bench/results/s12-base-*.json bench/results/s12-pin-*.json
    .venv/bin/python -m bench.compare --markdown bench/results/s12-sweep.json

Reports from earlier rounds lack some figures (steal, pinning, peak CPU): those cells are "-".
Must not import: fastapi, sqlalchemy, store, tools, postcall.
Of ours, imports only: bench.targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.targets import fmt_cell, report_field

COLUMNS: list[tuple[str, str]] = [
    ("steal %", "resources.machine_cpu_steal_pct"),
    ("overhead p50", "server.overhead.total.p50"),
    ("overhead p95", "server.overhead.total.p95"),
    ("v2v p50", "caller.voice_to_voice_ms.p50"),
    ("v2v p95", "caller.voice_to_voice_ms.p95"),
    ("barge-in p95", "caller.barge_in_ms.p95"),
    ("jitter p99", "caller.jitter_ms.p99"),
    ("underruns", "caller.underruns"),
    ("dropped", "inbound_frames_dropped"),
    ("false int.", "backchannel.false_interruptions"),
    ("completed", "calls.completed"),
    ("calls/core", "resources.calls_per_core"),
    ("CPU-s/call-min", "resources.cpu_s_per_call_minute"),
    ("server peak %", "resources.server_peak_cpu_pct"),
    ("callers peak %", "resources.generator_and_emulators_peak_cpu_pct"),
]
"""(header, path in a run's report) per column, after the run's name and pinning."""


def runs(path: Path, report: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, one run's report) for a run's file, or for each step of a sweep's."""
    name = path.stem
    if "steps" in report:
        for step in sorted(report["steps"], key=lambda s: report_field(s, "run.calls") or 0):
            step.setdefault("pinned", report.get("pinned"))
            yield f"{name}@{report_field(step, 'run.calls')}", step
    else:
        yield name, report


def rows(paths: list[Path]) -> list[list[str]]:
    out = []
    for path in paths:
        for name, run in runs(path, json.loads(path.read_text())):
            pinned = "yes" if run.get("pinned") else ("no" if "pinned" in run else "-")
            out.append([name, pinned, *(fmt_cell(report_field(run, key)) for _, key in COLUMNS)])
    return out


def render(paths: list[Path], markdown: bool = False) -> str:
    header = ["run", "pinned", *(title for title, _ in COLUMNS)]
    body = rows(paths)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *body]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("reports", nargs="+", type=Path, help="bench JSON reports (runs or sweeps)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.reports if not path.is_file()]
    if missing:
        p.error("no such report: " + ", ".join(missing))
    try:
        print(render(args.reports, args.markdown))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        p.error(f"not a bench report ({exc.__class__.__name__}: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
