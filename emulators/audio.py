"""Audio for scripted callers in tests and benchmarks, as Twilio carries it: G.711 mu-law,
8 kHz, mono, raw bytes.

`synth_speech()` speaks text with espeak-ng and converts it with sox, trimmed so that speech
starts at the first sample and ends at the last; results are cached in memory and on disk
($AI_SDR_AUDIO_CACHE, else ~/.cache/ai-sdr-audio). `silence()`, `tone()` and `noise()` make
synthetic signals; `frames()` cuts audio into 20 ms frames.

Of ours, imports only: emulators, utils.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from utils import FRAME_BYTES, MULAW_SILENCE, SAMPLE_RATE, mulaw_decode, mulaw_encode

DEFAULT_RATE_WPM = 160
TRIM_LEVEL = 32
"""Samples at or below this magnitude (about -60 dBFS) count as silence when trimming."""
_CACHE_FORMAT = "v1"
"""Part of every cache key: change it when the synthesis or trimming changes."""

_memory: dict[str, bytes] = {}
_memory_lock = threading.Lock()


class AudioToolMissing(RuntimeError):
    """espeak-ng or sox is not installed."""


def synth_speech(text: str, *, voice: str = "en-us", rate_wpm: int = DEFAULT_RATE_WPM) -> bytes:
    """`text` spoken by espeak-ng as 8 kHz mu-law, without leading or trailing silence."""
    key = _cache_key(text, voice, rate_wpm)
    with _memory_lock:
        cached = _memory.get(key)
    if cached is None:
        cached = _load_or_synth(key, text, voice, rate_wpm)
        with _memory_lock:
            _memory[key] = cached
    return cached


def silence(seconds: float) -> bytes:
    return bytes([MULAW_SILENCE]) * _samples(seconds)


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.3) -> bytes:
    """A sine at `amplitude` of full scale."""
    t = np.arange(_samples(seconds)) / SAMPLE_RATE
    return _encode_float(amplitude * np.sin(2 * np.pi * freq * t))


def noise(seconds: float, amplitude: float = 0.003, *, seed: int = 0) -> bytes:
    """Gaussian line noise with RMS `amplitude` of full scale (0.003 is about -50 dBFS)."""
    rng = np.random.default_rng(seed)
    return _encode_float(amplitude * rng.standard_normal(_samples(seconds)))


def frames(audio: bytes) -> list[bytes]:
    """20 ms frames of 160 bytes; the last one padded with silence."""
    remainder = len(audio) % FRAME_BYTES
    if remainder:
        audio += bytes([MULAW_SILENCE]) * (FRAME_BYTES - remainder)
    return [audio[i : i + FRAME_BYTES] for i in range(0, len(audio), FRAME_BYTES)]


def trim_silence(audio: bytes, level: int = TRIM_LEVEL) -> bytes:
    """Drop leading and trailing samples whose magnitude is at most `level`."""
    loud = np.flatnonzero(np.abs(mulaw_decode(audio).astype(np.int32)) > level)
    if loud.size == 0:
        return b""
    return audio[loud[0] : loud[-1] + 1]


def cache_dir() -> Path:
    configured = os.environ.get("AI_SDR_AUDIO_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "ai-sdr-audio"


def _samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def _encode_float(signal: np.ndarray) -> bytes:
    pcm = np.clip(np.round(signal * 32767), -32768, 32767).astype(np.int16)
    return mulaw_encode(pcm)


def _cache_key(text: str, voice: str, rate_wpm: int) -> str:
    material = "\0".join([_CACHE_FORMAT, text, voice, str(rate_wpm)])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _load_or_synth(key: str, text: str, voice: str, rate_wpm: int) -> bytes:
    path = cache_dir() / f"{key}.ulaw"
    if path.is_file():
        return path.read_bytes()
    audio = trim_silence(_synth_uncached(text, voice, rate_wpm))
    if not audio:
        raise ValueError(f"espeak-ng produced no audible speech for {text!r}")
    _write_atomically(path, audio)
    return audio


def _synth_uncached(text: str, voice: str, rate_wpm: int) -> bytes:
    espeak, sox = _require("espeak-ng"), _require("sox")
    with tempfile.TemporaryDirectory(prefix="ai-sdr-audio-") as tmp:
        wav, raw = Path(tmp) / "speech.wav", Path(tmp) / "speech.raw"
        # "--" keeps text that starts with "-" from being read as an option
        _run([espeak, "-v", voice, "-s", str(rate_wpm), "-w", str(wav), "--", text])
        _run([sox, str(wav), "-t", "raw", "-r", str(SAMPLE_RATE), "-c", "1", "-e", "mu-law",
              str(raw)])  # fmt: skip
        return raw.read_bytes()


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise AudioToolMissing(
            f"{tool} is not installed; test speech needs espeak-ng and sox "
            "(Debian/Ubuntu: apt-get install espeak-ng sox)"
        )
    return path


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed: {result.stderr.strip()}")


def _write_atomically(path: Path, data: bytes) -> None:
    """Parallel test workers may synthesise the same text: write aside, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
