"""Silero VAD on real speech from espeak-ng. Every time asserted is audio time (20 ms per
frame), never wall-clock time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from emulators.audio import frames, noise, silence, synth_speech, tone
from pipeline.vad import (
    WINDOW_SECONDS,
    SileroModel,
    VADBatcher,
    VADEvent,
    VADPause,
    VADResume,
    VADSpeechEnd,
    VADSpeechStart,
    VADStream,
    default_model_path,
    shared_batcher,
)
from utils import mulaw_to_float

DEMO = "Hi, I would like to book a demo next Tuesday"
LEAD_IN = 1.0
"""Seconds of silence before the speech in a scripted caller's audio."""
ONSET_TOLERANCE = 0.15


@pytest.fixture(scope="session")
def silero() -> SileroModel:
    return SileroModel.load()


@pytest.fixture(params=[True, False], ids=["offload", "inline"])
def batcher(request, silero) -> VADBatcher:
    """No batch wait: these streams run faster than real time, one at a time."""
    return VADBatcher(silero, offload=request.param, max_wait_ms=0)


@pytest.fixture(scope="session")
def demo() -> bytes:
    return synth_speech(DEMO)


async def run(stream: VADStream, audio: bytes) -> list[VADEvent]:
    events: list[VADEvent] = []
    for frame in frames(audio):
        events += await stream.process(frame)
    return events


async def run_with_probabilities(
    stream: VADStream, audio: bytes
) -> tuple[list[VADEvent], list[float]]:
    events: list[VADEvent] = []
    probabilities = []
    for frame in frames(audio):
        events += await stream.process(frame)
        probabilities.append(stream.last_probability)
    return events, probabilities


def kinds(events: list[VADEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


async def test_speech_start_is_confirmed_near_the_true_onset(batcher, demo):
    speech_end = LEAD_IN + len(demo) / 8000
    events = await run(VADStream(batcher), silence(LEAD_IN) + demo + silence(1.5))

    assert kinds(events) == ["VADSpeechStart", "VADSpeechEnd"]
    start, end = events
    assert isinstance(start, VADSpeechStart)
    assert isinstance(end, VADSpeechEnd)
    assert abs(start.onset - LEAD_IN) <= ONSET_TOLERANCE
    # window fill + min_speech_ms (two windows) + the model's reaction
    assert start.confirmed_at - start.onset >= 0.06
    assert start.confirmed_at - LEAD_IN <= 0.2
    assert end.onset == start.onset
    assert abs(end.end - speech_end) <= ONSET_TOLERANCE
    assert end.confirmed_at - end.end >= 0.25
    assert end.duration == pytest.approx(end.end - end.onset)


async def test_a_backchannel_is_detected_as_speech(batcher):
    """VAD only detects; the pipeline decides from the transcript that "uh-huh" is not a
    barge-in."""
    uh_huh = synth_speech("uh-huh")
    events = await run(VADStream(batcher), silence(LEAD_IN) + uh_huh + silence(1.0))

    assert kinds(events) == ["VADSpeechStart", "VADSpeechEnd"]
    assert abs(events[0].onset - LEAD_IN) <= ONSET_TOLERANCE


@pytest.mark.parametrize(
    "audio",
    [
        pytest.param(silence(3.0), id="digital-silence"),
        pytest.param(noise(3.0, amplitude=0.0005), id="noise-66dBFS"),
        pytest.param(noise(3.0, amplitude=0.003, seed=1), id="noise-50dBFS"),
        pytest.param(noise(3.0, amplitude=0.01, seed=2), id="noise-40dBFS"),
        pytest.param(tone(3.0, freq=60, amplitude=0.003), id="mains-hum"),
    ],
)
async def test_silence_and_line_noise_produce_no_events(batcher, audio):
    stream = VADStream(batcher)
    assert await run(stream, audio) == []
    assert not stream.is_speaking
    assert stream.speech_duration == 0.0


async def test_noise_above_the_gate_is_judged_by_the_model(batcher):
    stream = VADStream(batcher)
    assert await run(stream, noise(2.0, amplitude=0.003)) == []
    assert stream.inferences == stream.windows > 0


async def test_the_energy_gate_skips_inference_on_silence(batcher, demo):
    gated = VADStream(batcher)
    assert await run(gated, silence(2.0)) == []
    assert gated.windows == int(2.0 / WINDOW_SECONDS)
    assert gated.inferences == 0

    ungated = VADStream(batcher, energy_gate_dbfs=None)
    await run(ungated, silence(2.0))
    assert ungated.inferences == ungated.windows == gated.windows


async def test_the_energy_gate_does_not_move_the_onset(batcher, demo):
    audio = silence(LEAD_IN) + demo + silence(1.0)
    gated = await run(VADStream(batcher), audio)
    ungated = await run(VADStream(batcher, energy_gate_dbfs=None), audio)

    assert kinds(gated) == kinds(ungated) == ["VADSpeechStart", "VADSpeechEnd"]
    assert abs(gated[0].onset - ungated[0].onset) <= WINDOW_SECONDS


async def test_speech_after_a_gated_silence_scores_the_same_whatever_its_length(batcher):
    """The gate resets the recurrent state, so a stream scores speech after silence like
    the start of a stream. Both lead-ins are whole multiples of 160 ms, where 20 ms frames
    and 32 ms windows line up."""
    speech = synth_speech("Stop.") + silence(0.5)
    short_events, short = await run_with_probabilities(VADStream(batcher), silence(0.48) + speech)
    long_events, long = await run_with_probabilities(VADStream(batcher), silence(2.4) + speech)

    shift = round((2.4 - 0.48) / 0.02)
    np.testing.assert_allclose(long[shift:], short, atol=1e-5)
    assert [e.onset + 1.92 for e in short_events] == pytest.approx([e.onset for e in long_events])


async def test_is_speaking_and_speech_duration_follow_the_events(batcher, demo):
    stream = VADStream(batcher)
    durations = []
    for frame in frames(silence(LEAD_IN) + demo + silence(1.0)):
        for event in await stream.process(frame):
            assert stream.is_speaking == isinstance(event, VADSpeechStart)
        durations.append(stream.speech_duration)

    assert not stream.is_speaking
    assert max(durations) > len(demo) / 8000
    assert stream.audio_time == pytest.approx(len(durations) * 0.02)


async def test_frames_of_any_length_give_the_same_timeline(batcher, demo):
    audio = silence(LEAD_IN) + demo + silence(1.0)
    by_frame = await run(VADStream(batcher), audio)
    stream = VADStream(batcher)
    at_once = await stream.process(audio[:4321])
    at_once += await stream.process(audio[4321:])

    assert [(type(e), e.onset) for e in at_once] == [(type(e), e.onset) for e in by_frame]
    assert [e.end for e in at_once if isinstance(e, VADSpeechEnd)] == [
        e.end for e in by_frame if isinstance(e, VADSpeechEnd)
    ]


def caller_audio() -> list[bytes]:
    """Different callers: speech at different offsets, a backchannel, silence, noise."""
    demo, short = synth_speech(DEMO), synth_speech("uh-huh")
    scripts = [
        silence(0.3) + demo,
        silence(1.1) + short + silence(0.6) + demo,
        noise(2.0, amplitude=0.003, seed=3) + short,
        silence(4.0),
        demo + silence(0.7),
        noise(0.5, amplitude=0.01, seed=4) + demo,
    ]
    longest = max(len(audio) for audio in scripts)
    return [audio + silence((longest - len(audio)) / 8000 + 0.5) for audio in scripts]


@pytest.mark.parametrize(
    ("max_wait_ms", "max_batch"), [(0, 256), (2, 256), (0, 4)], ids=["next-turn", "2ms", "max4"]
)
async def test_batched_streams_equal_the_same_streams_run_alone(
    silero, batcher, max_wait_ms, max_batch
):
    scripts = [frames(audio) for audio in caller_audio()]
    alone = [await run_with_probabilities(VADStream(batcher), b"".join(s)) for s in scripts]
    assert batcher.stats.max_batch == 1

    together = VADBatcher(
        silero, offload=batcher.offload, max_wait_ms=max_wait_ms, max_batch=max_batch
    )
    streams = [VADStream(together) for _ in scripts]
    events: list[list[VADEvent]] = [[] for _ in scripts]
    probabilities: list[list[float]] = [[] for _ in scripts]
    for step in zip(*scripts, strict=True):
        results = await asyncio.gather(*(s.process(f) for s, f in zip(streams, step, strict=True)))
        for i, stream in enumerate(streams):
            events[i] += results[i]
            probabilities[i].append(stream.last_probability)

    assert together.stats.max_batch == min(max_batch, 5)  # the silent caller is gated
    assert sum(bool(e) for e in events) == len(scripts) - 1  # all but the silent caller
    for i, (alone_events, alone_probabilities) in enumerate(alone):
        assert kinds(events[i]) == kinds(alone_events)
        assert [(e.onset, e.confirmed_at) for e in events[i]] == [
            (e.onset, e.confirmed_at) for e in alone_events
        ]
        np.testing.assert_allclose(probabilities[i], alone_probabilities, atol=1e-5)


async def test_a_cancelled_process_call_leaves_the_stream_usable(batcher, demo):
    audio = frames(silence(0.2) + demo + silence(1.0))
    stream = VADStream(batcher)
    events: list[VADEvent] = []
    for index, frame in enumerate(audio):
        if index == 60:
            call = asyncio.ensure_future(stream.process(frame))
            await asyncio.sleep(0)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        events += await stream.process(frame)
    assert kinds(events) == ["VADSpeechStart", "VADSpeechEnd"]


async def test_a_stream_without_a_batcher_uses_the_loops_shared_one():
    stream = VADStream()
    events = await run(stream, silence(0.5) + synth_speech("okay") + silence(0.5))
    assert kinds(events) == ["VADSpeechStart", "VADSpeechEnd"]
    assert shared_batcher().stats.windows == stream.inferences > 0


async def test_an_inference_error_reaches_the_caller_and_the_batcher_recovers(batcher):
    state = np.zeros((2, 128), dtype=np.float32)
    with pytest.raises(Exception, match="data type"):
        await batcher.infer(np.zeros(288, dtype=np.float64), state)
    assert np.all(state == 0)
    events = await run(VADStream(batcher), silence(0.5) + synth_speech("okay") + silence(0.5))
    assert kinds(events) == ["VADSpeechStart", "VADSpeechEnd"]


async def test_probabilities_match_the_official_silero_wrapper(silero, demo):
    """Windowing, context and state as in silero_vad.utils_vad.OnnxWrapper (on torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch = pytest.importorskip("torch")
        utils_vad = pytest.importorskip("silero_vad.utils_vad")
    audio = silence(0.3) + demo + silence(0.5)
    official = utils_vad.OnnxWrapper(str(default_model_path()), force_onnx_cpu=True)
    waveform = torch.from_numpy(mulaw_to_float(audio))
    expected = [
        float(official(waveform[i : i + 256], 8000)) for i in range(0, len(waveform) - 255, 256)
    ]

    stream = VADStream(VADBatcher(silero), energy_gate_dbfs=None)
    ours = []
    for frame in frames(audio):
        windows = stream.windows
        await stream.process(frame)
        if stream.windows > windows:
            ours.append(stream.last_probability)

    assert len(ours) == len(expected)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_vad_runs_without_importing_torch():
    script = (
        "import sys; from pipeline import vad; vad.SileroModel.load(); "
        "assert 'torch' not in sys.modules"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=60)


async def test_push_handles_silence_without_the_model_and_flush_scores_speech(batcher, demo):
    """The pipeline's path: `push()` from the receive loop, `flush()` only when asked."""
    stream = VADStream(batcher)
    for frame in frames(silence(LEAD_IN)):
        assert stream.push(frame) is False  # gated silence: nothing left for flush()
    assert stream.inferences == 0 and stream.windows == int(LEAD_IN * 8000) // 256

    events: list[VADEvent] = []
    asked = 0
    for frame in frames(demo + silence(1.0)):
        if stream.push(frame):
            asked += 1
            events += await stream.flush()
    reference = await run(VADStream(batcher), silence(LEAD_IN) + demo + silence(1.0))

    assert asked > 0 and stream.inferences > 0
    assert [(type(e), e.onset) for e in events] == [(type(e), e.onset) for e in reference]


async def test_frames_pushed_during_a_flush_queue_and_are_scored_in_order(silero, demo):
    batcher = VADBatcher(silero, offload=True, max_wait_ms=5)
    audio = silence(0.5) + demo + silence(1.0)
    stream = VADStream(batcher)
    events: list[VADEvent] = []
    flushes: list[asyncio.Task[list[VADEvent]]] = []
    for frame in frames(audio):
        wanted = stream.push(frame)  # lands mid-flush: only queued
        if wanted and (not flushes or flushes[-1].done()):
            flushes.append(asyncio.create_task(stream.flush()))
        await asyncio.sleep(0)
    for task in flushes:
        events += await task
    events += await stream.flush()  # whatever the last push left
    reference = await run(VADStream(batcher), audio)

    assert len(flushes) < len(frames(audio)) // 2  # frames did queue behind running flushes
    assert stream.audio_time == pytest.approx(len(frames(audio)) * 0.02)
    assert [(type(e), e.onset) for e in events] == [(type(e), e.onset) for e in reference]


async def test_a_starved_stream_skips_its_oldest_windows_and_counts_them(batcher, demo):
    stream = VADStream(batcher, max_backlog_s=0.5)
    audio = frames(silence(0.2) + demo)
    for frame in audio:  # nobody flushes: seconds of speech queue up
        stream.push(frame)
    await stream.flush()

    queued_windows = (len(audio) * 160 - 1600) // 256
    assert 0.5 * 8000 // 256 <= queued_windows - stream.dropped_windows <= 0.5 * 8000 // 256 + 1
    assert stream.inferences == queued_windows - stream.dropped_windows
    assert stream.audio_time == pytest.approx(len(audio) * 0.02)


async def test_a_pause_is_reported_once_per_silence_and_speech_may_resume(batcher, demo):
    price = synth_speech("How much does the pro plan cost?")
    audio = silence(LEAD_IN) + demo + silence(0.34) + price + silence(1.0)
    events = await run(VADStream(batcher, min_silence_ms=300, pause_ms=160), audio)

    assert kinds(events) == [
        "VADSpeechStart",
        "VADPause",
        "VADResume",
        "VADPause",
        "VADSpeechEnd",
    ]
    _, mid, resume, last, end = events
    assert isinstance(mid, VADPause) and isinstance(last, VADPause)
    assert isinstance(end, VADSpeechEnd) and isinstance(resume, VADResume)
    # speech came back where the second sentence starts
    assert resume.at == pytest.approx(mid.silence_start + 0.34, abs=ONSET_TOLERANCE)
    # the first pause is the one inside the sentence; the last one is the final silence
    assert mid.silence_start == pytest.approx(LEAD_IN + len(demo) / 8000, abs=ONSET_TOLERANCE)
    assert last.silence_start == end.end
    # without pause_ms: the same speech, no pauses
    plain = await run(VADStream(batcher, min_silence_ms=300), audio)
    assert kinds(plain) == ["VADSpeechStart", "VADSpeechEnd"]


async def test_pause_start_tracks_the_pause_until_speech_resumes_or_ends(batcher, demo):
    price = synth_speech("How much does the pro plan cost?")
    audio = silence(LEAD_IN) + demo + silence(0.34) + price + silence(1.0)
    stream = VADStream(batcher, min_silence_ms=300, pause_ms=160)
    seen: list[tuple[str, float | None]] = []
    for frame in frames(audio):
        for event in await stream.process(frame):
            seen.append((type(event).__name__, stream.pause_start))
            if isinstance(event, VADPause):
                assert stream.pause_start == event.silence_start
    assert [(kind, start is None) for kind, start in seen] == [
        ("VADSpeechStart", True),
        ("VADPause", False),
        ("VADResume", True),
        ("VADPause", False),
        ("VADSpeechEnd", True),
    ]
