"""`python -m bench.plot`: the capacity chart of a sweep report it writes itself, and the
usage errors for a missing or foreign file. Draws with the real matplotlib (Agg)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from bench import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _target(name: str, value: float, limit: float, kind: str = "<=") -> dict[str, Any]:
    met = value <= limit if kind == "<=" else value >= limit
    return {"target": name, "value": value, "limit": f"{kind} {limit:g}", "met": met}


def _step(calls: int, cpu_pct: float, overhead_p95: float, underruns: int) -> dict[str, Any]:
    barge_in = {"p50": 66.0, "p95": 105.0}
    return {
        "run": {"calls": calls},
        "resources": {"server_peak_cpu_pct": cpu_pct, "cpu_fraction_per_call": 0.003},
        "server": {"overhead": {"total": {"p50": 3.0, "p95": overhead_p95}}},
        "caller": {
            "voice_to_voice_ms": {"p50": 780.0, "p95": 810.0},
            "barge_in_ms": barge_in,
            "underruns": underruns,
        },
        "targets": [
            _target("calls per server core", 333.0, 200, ">="),
            _target("pipeline overhead p95 ms", overhead_p95, 10),
            _target("voice-to-voice p95 ms (providers + 30)", 810.0, 630),
            _target("voice-to-voice p95 ms (+ turn detection)", 810.0, 930),
            _target("barge-in p95 ms", barge_in["p95"], 150),
            _target("playout underruns", underruns, 0),
        ],
    }


def _sweep_report(tmp_path: Path) -> Path:
    steps = [_step(40, 60.0, 14.0, 3), _step(10, 15.0, 5.0, 0), _step(20, 30.0, 6.0, 0)]
    del steps[2]["resources"]["server_peak_cpu_pct"]  # an older report lacks a figure
    report = {
        "highest_passing_calls": 20,
        "first_failing_calls": 40,
        "command": "python -m bench --sweep",
        "pinned": None,
        "steps": steps,
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(report))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_draws_the_chart_of_a_sweep_as_a_png(tmp_path: Path, capsys) -> None:
    report = _sweep_report(tmp_path)
    out = tmp_path / "chart.png"

    assert plot.main([str(report), "-o", str(out)]) == 0

    width, height = _png_size(out)
    assert 600 <= width <= 2000 and 600 <= height <= 2000
    assert 20_000 < out.stat().st_size < 2_000_000  # three panels of lines, not a blank image
    assert f"chart: {out}" in capsys.readouterr().out
    assert not report.with_suffix(".png").exists()  # written where -o says, not beside it


def test_the_first_failing_n_is_the_smallest_step_that_misses_the_sweep_bound(
    tmp_path: Path,
) -> None:
    sweep = plot.load(_sweep_report(tmp_path))

    assert sweep.calls == [10, 20, 40]
    # the overhead target is missed at 40 too, but it does not bound a sweep
    assert sweep.first_failing() == (40, ["playout underruns"])
    assert sweep.limit("barge-in p95 ms") == 150
    assert sweep.limit("calls per server core") == 200
    assert sweep.series("resources.server_peak_cpu_pct")[0] == 15.0
    assert str(sweep.series("resources.server_peak_cpu_pct")[1]) == "nan"  # a gap, not a 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "no sweep steps"),
        ('{"calls": {"placed": 100}, "targets": []}', "no sweep steps"),  # a single run's report
        ('{"steps": [{"run": {}}]}', "no `run.calls`"),
        ('{"steps": [{"run": {"calls": 5}}]}', "no `targets`"),
        ("{not json", "not a sweep report"),
    ],
)
def test_a_foreign_file_gets_a_usage_error_naming_it(
    tmp_path: Path, capsys, content: str, message: str
) -> None:
    foreign = tmp_path / "foreign.json"
    foreign.write_text(content)

    with pytest.raises(SystemExit) as exit_:
        plot.main([str(foreign), "-o", str(tmp_path / "x.png")])

    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not a sweep report" in err and str(foreign) in err and message in err
    assert not (tmp_path / "x.png").exists()


def test_a_missing_file_or_folder_gets_a_usage_error(tmp_path: Path, capsys) -> None:
    gone = tmp_path / "gone.json"
    for argv, message in (
        ([str(gone)], f"no such report: {gone}"),
        ([str(_sweep_report(tmp_path)), "-o", str(tmp_path / "no" / "x.png")], "no such folder"),
    ):
        with pytest.raises(SystemExit) as exit_:
            plot.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
