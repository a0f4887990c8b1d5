"""Smoke run of the call benchmark through its real code path: the service and the
emulators as subprocesses, two scripted callers over real sockets, the JSON report.
Asserts that the report is complete and the calls went through; never on speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare
from bench.stack import pin_process
from bench.targets import table

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_two_short_calls_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "bench", "--calls", "2", "--duration", "0"]
    command += ["--script", "short", "--no-warmup", "--stagger", "0.2", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=100)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "voice-to-voice" in done.stdout
    assert "emulator lateness under load" in done.stdout
    report = json.loads(out.read_text())
    assert set(report) >= {
        "calls",
        "server",
        "caller",
        "backchannel",
        "resources",
        "inbound_frames_dropped",
        "targets",
        "run",
        "emulator_floor",
        "emulator_lateness",
        "loop_lag",
    }
    assert report["calls"]["placed"] == 2
    assert report["calls"]["completed"] == 2, report["calls"]
    assert set(report["server"]["stages"]) >= {"stt_final_ms", "first_media_ms", "retrieval_ms"}
    assert report["server"]["overhead"]["total"]["n"] == 2
    for leg in ("in_service", "provider_round_trips", "prompt", "chunking"):
        assert report["server"]["overhead"][leg]["n"] == 2, leg
    assert report["server"]["stages"]["llm_request_ms"]["n"] == 2
    assert report["caller"]["voice_to_voice_ms"]["n"] == 2
    # every answer's first token and first audio byte was timed by the emulators
    assert report["emulator_lateness"]["llm_first_token_ms"]["n"] >= 2
    assert report["emulator_lateness"]["tts_first_byte_ms"]["n"] >= 2
    assert report["server"]["overhead_net_of_emulator_lateness"]["p95_ms"] is not None
    assert report["caller"]["greeting_ms"]["n"] == 2
    assert report["resources"]["cpu_s_per_call_minute"] > 0
    assert 0 <= report["resources"]["machine_cpu_steal_pct"] <= 100
    assert {t["target"] for t in report["targets"]} >= {"inbound frames dropped"}
    assert report["loop_lag"]["n"] >= 4  # the service sampled its loop through the calls
    assert "service event-loop lag" in done.stdout


def test_pacing_orders_media_and_clears_by_message_order_not_by_equal_times() -> None:
    """The caller's clock has a millisecond resolution and one socket read can hold a media
    message and a clear: a frame read just before the clear, at the same time, was sent
    before it and is not stale; one read just after it is."""
    from bench.report import pacing
    from emulators.twilio_caller import CallerResult

    def caller(clear_first: bool) -> CallerResult:
        result = CallerResult(account_sid="AC", call_sid="CA", stream_sid="MZ")
        times = [0.0, 0.1, 0.2, 0.3, 0.4]
        result.media = [(t, 800) for t in times]
        result.clears = [0.4]  # read together with the last media message
        result.clears_before_media = [0, 0, 0, 0, 1 if clear_first else 0]
        return result

    assert pacing(caller(clear_first=False))["stray"] == [0]
    assert pacing(caller(clear_first=True))["stray"] == [5]  # five stale frames heard


def test_loop_lag_figures_read_bucket_bounds_over_the_load_only() -> None:
    from bench import report

    def histogram(counts: dict[str, float], total_s: float) -> dict[str, float]:
        lag = "aisdr_event_loop_lag_seconds"
        out = {f'{lag}_bucket{{le="{le}"}}': float(n) for le, n in counts.items()}
        return {**out, f"{lag}_count": counts["+Inf"], f"{lag}_sum": total_s}

    before = histogram({"0.001": 10, "0.01": 10, "0.05": 10, "+Inf": 10}, 0.005)
    # over the load: 100 samples, 90 within 1 ms, 6 within 10 ms, 3 within 50 ms, 1 beyond
    after = histogram({"0.001": 100, "0.01": 106, "0.05": 109, "+Inf": 110}, 0.505)
    figures = report.loop_lag_figures(before, after)
    assert figures == {
        "n": 100,
        "p50_le_ms": 1.0,
        "p95_le_ms": 10.0,
        "p99_le_ms": 50.0,
        "over_10ms_pct": 4.0,
        "mean_ms": 5.0,
    }
    assert report.loop_lag_figures(before, before) == {"n": 0}


def test_overhead_splits_into_service_and_provider_round_trips() -> None:
    """With the request stages the overhead splits exactly into the service's own share
    and the two provider round trips; a turn without them (a service from before they were
    recorded) keeps only the three legs."""
    from bench.report import Answer, overhead
    from bench.script import Providers

    providers = Providers()  # TTFT 250, 40 tokens/s, TTS first byte 150
    reply = "Sure thing. The pro plan is forty nine dollars a month."
    first_chunk = providers.first_chunk_ms(reply)
    turn = {
        "stt_final_ms": 240.0,
        "llm_request_ms": 242.0,  # prompt: 2
        "llm_first_token_ms": 242.0 + 250 + 3,  # round trip: 3
        "tts_request_ms": 495.0 + first_chunk + 1,  # chunking: 1
        "tts_first_audio_ms": 496.0 + first_chunk + 150 + 4,  # round trip: 4
        "first_media_ms": 650.0 + first_chunk + 0.5,  # pacer: 0.5
    }
    legs = overhead(Answer(turn, reply, 0), providers)
    assert legs is not None
    assert legs["prompt"] == pytest.approx(2)
    assert legs["llm_round_trip"] == pytest.approx(3)
    assert legs["chunking"] == pytest.approx(1)
    assert legs["tts_round_trip"] == pytest.approx(4)
    assert legs["in_service"] == pytest.approx(3.5)
    assert legs["provider_round_trips"] == pytest.approx(7)
    assert legs["total"] == pytest.approx(legs["in_service"] + legs["provider_round_trips"])

    old = {k: v for k, v in turn.items() if k not in ("llm_request_ms", "tts_request_ms")}
    legs = overhead(Answer(old, reply, 0), providers)
    assert legs is not None and set(legs) == {"total", "llm_leg", "tts_leg", "pacer_leg"}
    assert legs["total"] == pytest.approx(10.5)


def test_receive_floor_runs_each_server_and_counts_every_message() -> None:
    command = [sys.executable, "-m", "bench.floor", "--calls", "3", "--seconds", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=100)

    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"io", "parse", "asgi", "direct"}
    for mode, (_, messages, cpu_s, us, _per_min) in rows.items():
        assert int(messages) == 3 * 50, mode  # every connection sent on its 20 ms clock
        assert float(cpu_s) >= 0 and float(us) >= 0, mode


def test_the_table_notes_a_run_taken_while_the_hypervisor_stole_cpu() -> None:
    caller = {"underruns": 0, "barge_in_missed": 0, "frames_received": 10, "frames_after_clear": 0}
    report = {
        "calls": {"placed": 1, "completed": 1},
        "backchannel": {},
        "resources": {"machine_cpu_steal_pct": 1.1},
        "caller": caller,
        "inbound_frames_dropped": 0,
        "targets": [],
    }
    quiet = table(report)
    report["resources"]["machine_cpu_steal_pct"] = 7.7
    noisy = table(report)

    assert "NOTE" not in quiet
    assert "NOTE: the hypervisor took 7.7% of this machine's CPU time" in noisy


def test_the_table_notes_a_run_whose_load_generator_ran_out_of_cpu() -> None:
    caller = {"underruns": 0, "barge_in_missed": 0, "frames_received": 10, "frames_after_clear": 0}
    resources = {"load_generator_peak_cpu_pct": 60.0, "generator_and_emulators_peak_cpu_pct": 85.0}
    report: dict = {
        "calls": {"placed": 1, "completed": 1},
        "backchannel": {},
        "resources": resources,
        "caller": caller,
        "inbound_frames_dropped": 0,
        "targets": [],
    }
    unpinned_ok = table(report)
    resources["load_generator_peak_cpu_pct"] = 97.0
    unpinned_saturated = table(report)
    report["pinned"] = {"service": [0], "generator_and_emulators": [1]}
    pinned_ok = table(report)  # its side's CPU is the sum with the emulators: 85 of 100
    resources["generator_and_emulators_peak_cpu_pct"] = 99.5
    pinned_saturated = table(report)

    assert "load generator's side" not in unpinned_ok + pinned_ok
    assert "side peaked at 97% CPU (of 100%)" in unpinned_saturated
    assert "side peaked at 99.5% CPU (of 100%)" in pinned_saturated
    assert "the service on CPU 0, the load generator and the emulators on CPU 1" in pinned_ok


def test_pinning_a_process_sets_every_one_of_its_running_threads() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to tell a pinned thread from an unpinned one")
    sleeper = "threading.Thread(target=time.sleep, args=(30,), daemon=True)"
    threads = f"[{sleeper}.start() for _ in '123']"
    code = f"import threading, time; {threads}; print('up', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        before = {int(t) for t in os.listdir(f"/proc/{child.pid}/task")}
        assert all(os.sched_getaffinity(tid) == set(cpus) for tid in before)

        count = pin_process(child.pid, {cpus[-1]})

        assert count == len(before) == 4  # the main thread and the three sleepers
        assert all(os.sched_getaffinity(tid) == {cpus[-1]} for tid in before)
    finally:
        child.kill()
        child.wait()


def _run_report(calls: int, overhead_p95: float, **extra: object) -> dict:
    return {
        "run": {"calls": calls},
        "calls": {"completed": calls},
        "server": {"overhead": {"total": {"p50": 1.5, "p95": overhead_p95}}},
        "resources": {"calls_per_core": 300.0},
        **extra,
    }


def test_compare_gives_a_row_per_run_and_per_sweep_step(tmp_path: Path) -> None:
    pinned = {"service": [0], "generator_and_emulators": [1]}
    run = _run_report(100, 6.5, pinned=None)
    old = _run_report(100, 21.5)  # an earlier round's report: no pinning field at all
    sweep = {"pinned": pinned, "steps": [_run_report(50, 4.0), _run_report(25, 3.5)]}
    paths = []
    for name, report in (("a", run), ("old", old), ("sw", sweep)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    header = ["run", "pinned", *(title for title, _ in compare.COLUMNS)]

    table_rows = compare.rows(paths)
    cells = [dict(zip(header, row, strict=True)) for row in table_rows]

    assert [c["run"] for c in cells] == ["a", "old", "sw@25", "sw@50"]  # steps by N
    assert [c["pinned"] for c in cells] == ["no", "-", "yes", "yes"]
    assert [c["overhead p95"] for c in cells] == ["6.5", "21.5", "3.5", "4"]
    assert {c["steal %"] for c in cells} == {"-"}  # absent from these reports
    markdown = compare.render(paths, markdown=True).splitlines()
    assert markdown[0].startswith("| run | pinned | steal %") and len(markdown) == 6


def test_compare_refuses_a_missing_or_foreign_file_by_name(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "list.json"
    foreign.write_text("[1, 2]")
    for argv, message in (
        ([str(tmp_path / "gone.json")], "no such report: "),
        ([str(foreign)], "not a bench report"),
    ):
        with pytest.raises(SystemExit) as exit_:
            compare.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
