"""Test speech and signals from emulators.audio, in Twilio's 8 kHz mu-law."""

import numpy as np
import pytest

from emulators import audio
from utils import FRAME_BYTES, mulaw_decode, mulaw_to_float


def rms_dbfs(data: bytes) -> float:
    samples = mulaw_to_float(data).astype(np.float64)
    return 10 * np.log10(np.mean(samples**2))


def test_frames_are_20ms_and_the_last_is_padded_with_silence():
    chunks = audio.frames(audio.tone(0.05))
    assert [len(c) for c in chunks] == [FRAME_BYTES] * 3
    assert chunks[-1][-80:] == b"\xff" * 80
    assert audio.frames(audio.silence(0.04)) == [b"\xff" * 160] * 2
    assert audio.frames(b"") == []


def test_silence_decodes_to_zero():
    assert audio.silence(0.5) == b"\xff" * 4000
    assert not mulaw_decode(audio.silence(0.1)).any()


def test_tone_has_its_frequency_and_level():
    signal = mulaw_to_float(audio.tone(1.0, freq=440, amplitude=0.5))
    assert len(signal) == 8000
    assert np.argmax(np.abs(np.fft.rfft(signal))) == 440  # 1 Hz bins over one second
    assert rms_dbfs(audio.tone(1.0, amplitude=0.5)) == pytest.approx(
        20 * np.log10(0.5 / 2**0.5), abs=0.3
    )


def test_noise_has_its_level_and_is_repeatable():
    assert rms_dbfs(audio.noise(2.0, amplitude=0.01)) == pytest.approx(-40, abs=0.5)
    assert audio.noise(0.1, seed=7) == audio.noise(0.1, seed=7) != audio.noise(0.1, seed=8)


def test_speech_starts_at_the_first_sample_and_ends_at_the_last():
    speech = mulaw_decode(audio.synth_speech("Hi, I would like to book a demo next Tuesday"))
    assert abs(int(speech[0])) > audio.TRIM_LEVEL
    assert abs(int(speech[-1])) > audio.TRIM_LEVEL
    assert 1.5 < len(speech) / 8000 < 5.0


def test_speech_is_cached_on_disk_and_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("AI_SDR_AUDIO_CACHE", str(tmp_path))
    first = audio.synth_speech("Cache me, please", rate_wpm=171)
    assert [p.read_bytes() for p in tmp_path.glob("*.ulaw")] == [first]
    assert audio.synth_speech("Cache me, please", rate_wpm=171) is first
    assert audio.synth_speech("Cache me, please", rate_wpm=120) != first


def test_missing_tools_are_named_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("AI_SDR_AUDIO_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(audio.AudioToolMissing, match="apt-get install espeak-ng sox"):
        audio.synth_speech("Nobody can say this")
