"""Voice activity detection for barge-in: Silero VAD (the ONNX model shipped in the
`silero-vad` wheel) on onnxruntime, one model per process, windows batched across calls,
and a cheap energy pre-gate.

Role: turn a call's inbound 20 ms mu-law frames into speech start/end events on the audio
timeline. It only detects speech; whether an utterance interrupts the agent is decided by
`voice_pipeline` from the transcript.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline, torch.

Pieces::

    SileroModel   one InferenceSession per process (1 thread), run on B windows and B
                  recurrent states at once (`pipeline.silero`)
    VADBatcher    per event loop: gathers the windows all calls submit within `max_wait_ms`
                  into one inference, run on the model's worker thread (`pipeline.silero`)
    VADStream     per call: frames -> 256-sample windows -> probabilities -> VADEvents

The model at 8 kHz takes 256-sample windows (32 ms), each prefixed by the last 32 samples
of the previous window as context, plus a recurrent state of shape (2, B, 128). Calls share
nothing but the model and the batcher: each stream owns its buffer and its state row.

Energy pre-gate: while a stream is idle (not speaking, no onset pending), a window whose
RMS is below `energy_gate_dbfs` skips the model, counts as probability 0, and resets the
recurrent state to zeros. Zero is the state the model starts every stream from, so speech
after a gated stretch is scored like the start of a stream, whatever the length of the
silence (measured: onsets land on the same window as without the gate). Once an onset is
pending or speech is confirmed, every window goes to the model, so the end of speech is the
model's own decision, not the gate's.

Latency budget from caller speech onset to the start event:

    up to 32 ms     filling the window that holds the onset
    + 64 ms         min_speech_ms=60 rounded up to whole windows (onset window included)
    + 0-96 ms       the model's reaction: 0-1 window on voiced onsets, up to 3 on a soft
                    "h" or "s"
    + < 20 ms       the rest of the 20 ms frame that completes the deciding window
    + <= 5 ms       batch wait (`max_wait_ms`), plus about 0.5 ms to run a batch of 20

Measured with espeak-ng speech (audio time, before the batch wait): 52-112 ms after the
first sample for voiced onsets ("yeah", "okay", "uh-huh"), 96-200 ms for "Hello?", "Sorry",
"Stop.".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.silero import (
    CONTEXT_SAMPLES,
    INPUT_SAMPLES,
    STATE_SIZE,
    WINDOW_SAMPLES,
    SileroModel,
    VADBatcher,
    default_model_path,
    shared_batcher,
)
from utils import SAMPLE_RATE, mulaw_to_float

# The model's names too, for code that imports them from here.
__all__ = [
    "INPUT_SAMPLES",
    "STATE_SIZE",
    "WINDOW_SAMPLES",
    "WINDOW_SECONDS",
    "SileroModel",
    "VADBatcher",
    "VADEvent",
    "VADPause",
    "VADResume",
    "VADSpeechEnd",
    "VADSpeechStart",
    "VADStream",
    "default_model_path",
    "shared_batcher",
]

WINDOW_SECONDS = WINDOW_SAMPLES / SAMPLE_RATE

Clock = Callable[[], float]


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VADSpeechStart:
    """Speech confirmed: it has lasted `min_speech_ms`. Times are audio seconds since the
    stream's first frame; `detected_at` is the injected clock when the event was made."""

    onset: float
    confirmed_at: float
    detected_at: float


@dataclass(frozen=True, slots=True)
class VADSpeechEnd:
    """Speech over: `min_silence_ms` of non-speech followed `end`."""

    onset: float
    end: float
    confirmed_at: float
    detected_at: float

    @property
    def duration(self) -> float:
        return self.end - self.onset


@dataclass(frozen=True, slots=True)
class VADPause:
    """Speech paused: `pause_ms` of non-speech have followed `silence_start`, and speech may
    yet resume (then no VADSpeechEnd follows for this silence). Once per silence."""

    silence_start: float
    confirmed_at: float
    detected_at: float


@dataclass(frozen=True, slots=True)
class VADResume:
    """Speech again after a VADPause, before the silence became the end of speech: the
    pause was inside the utterance. `at` is the audio time of the first speech window."""

    at: float
    detected_at: float


VADEvent = VADSpeechStart | VADPause | VADResume | VADSpeechEnd


# --- per-call stream --------------------------------------------------------------------


class VADStream:
    """One call's VAD. Feed it the inbound frames in order, either with `process()` (one
    at a time, awaiting each), or with `push()` from the receiving code and `flush()` from
    one task whenever `push()` returned True: silence is then handled without a task
    switch per frame, and frames arriving while the model runs just queue.

    A window whose probability is >= `threshold` is speech, < `end_threshold` is silence,
    and in between keeps the current status (hysteresis). Speech is confirmed once it has
    lasted `min_speech_ms` and ends after `min_silence_ms` of silence. With `pause_ms`
    (shorter than `min_silence_ms`), a VADPause marks each silence that long on the way:
    the moment to flush the transcriber, before the end of the turn is certain, and a
    VADResume follows it if speech comes back before that.
    """

    def __init__(
        self,
        batcher: VADBatcher | None = None,
        *,
        threshold: float = 0.5,
        end_threshold: float | None = None,
        min_speech_ms: int = 60,
        min_silence_ms: int = 250,
        energy_gate_dbfs: float | None = -55.0,
        max_backlog_s: float | None = None,
        pause_ms: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._batcher = batcher
        self.threshold = threshold
        self.end_threshold = threshold - 0.15 if end_threshold is None else end_threshold
        self._min_speech = min_speech_ms * SAMPLE_RATE // 1000
        self._min_silence = min_silence_ms * SAMPLE_RATE // 1000
        self._pause = None if pause_ms is None else pause_ms * SAMPLE_RATE // 1000
        self._paused_at: int | None = None  # silence start of the VADPause already sent
        self._gate_power = -1.0 if energy_gate_dbfs is None else 10 ** (energy_gate_dbfs / 10)
        self._clock = clock
        # context, then one window, then up to one 20 ms frame of leftover samples
        self._buffer = np.zeros(INPUT_SAMPLES + 160, dtype=np.float32)
        self._filled = 0  # samples after the context
        self._state = np.zeros((2, STATE_SIZE), dtype=np.float32)
        self._state_is_zero = True
        self._samples = 0  # samples received
        self._window_start = 0  # sample index of the next window
        self._onset: int | None = None
        self._silence_start: int | None = None
        self._speaking = False
        self.last_probability = 0.0
        self.windows = 0
        self.inferences = 0
        self.dropped_windows = 0
        self._flushing = False
        self._max_backlog = None if max_backlog_s is None else int(max_backlog_s * SAMPLE_RATE)

    @property
    def is_speaking(self) -> bool:
        """Speech confirmed and not yet ended."""
        return self._speaking

    @property
    def is_pausing(self) -> bool:
        """Speaking, and silent since a VADPause: the turn may be ending."""
        return self._speaking and self._paused_at is not None

    @property
    def pause_start(self) -> float | None:
        """While `is_pausing`: the audio time (s) at which the pause's silence began, the
        `silence_start` of its VADPause (which a caller may not have processed yet)."""
        if not self.is_pausing:
            return None
        assert self._paused_at is not None
        return self._seconds(self._paused_at)

    @property
    def speech_duration(self) -> float:
        """Seconds of audio since the confirmed onset (trailing silence included); 0 when
        not speaking."""
        if not self._speaking or self._onset is None:
            return 0.0
        return (self._samples - self._onset) / SAMPLE_RATE

    @property
    def audio_time(self) -> float:
        """Seconds of audio received: 20 ms per Twilio frame."""
        return self._samples / SAMPLE_RATE

    async def process(self, frame: bytes) -> list[VADEvent]:
        """Take one mu-law frame (Twilio: 160 bytes, 20 ms) and return the events it
        completed, usually none."""
        self.push(frame)
        return await self.flush()

    def push(self, frame: bytes) -> bool:
        """Take one frame without waiting. Windows that need no model (idle and below the
        energy gate: most of a call) are scored at once; returns True when windows wait
        for `flush()`. Safe to call while a `flush()` is in progress: the frame queues."""
        self._append(frame)
        if self._flushing:
            return True
        while self._filled >= WINDOW_SAMPLES and self._gated(self._buffer[:INPUT_SAMPLES]):
            self._shift_window()
            self._update(0.0)  # idle and silent: no event
        return self._filled >= WINDOW_SAMPLES

    async def flush(self) -> list[VADEvent]:
        """Score the complete windows queued by `push()` so far, in order; returns their
        events. Windows pushed meanwhile wait for the next flush (their `push()` returned
        True), so a flush is bounded even while speech keeps arriving. One flush at a time.
        With `max_backlog_s`, falling further behind (the model's thread starved) skips the
        oldest windows: counted in `dropped_windows`."""
        events: list[VADEvent] = []
        budget = self._filled // WINDOW_SAMPLES
        self._flushing = True
        try:
            while budget > 0:
                skipped = self.dropped_windows
                events += self._drop_backlog()
                budget -= self.dropped_windows - skipped
                if budget <= 0:
                    break
                probability = await self._score(self._buffer[:INPUT_SAMPLES])
                self._shift_window()
                budget -= 1
                event = self._update(probability)
                if event is not None:
                    events.append(event)
        finally:
            self._flushing = False
        return events

    def _drop_backlog(self) -> list[VADEvent]:
        """Skipped windows repeat the last probability, so their events still happen."""
        if self._max_backlog is None:
            return []
        events: list[VADEvent] = []
        excess = (self._filled - self._max_backlog) // WINDOW_SAMPLES
        for _ in range(max(0, excess)):
            self._shift_window()
            self.dropped_windows += 1
            if (event := self._update(0.0 if self._idle else self.last_probability)) is not None:
                events.append(event)
        return events

    def _append(self, frame: bytes) -> None:
        n = len(frame)  # mu-law: one byte per sample
        start = CONTEXT_SAMPLES + self._filled
        if start + n > len(self._buffer):
            grown = np.zeros(start + n + WINDOW_SAMPLES, dtype=np.float32)
            grown[:start] = self._buffer[:start]
            self._buffer = grown
        mulaw_to_float(frame, out=self._buffer[start : start + n])
        self._filled += n
        self._samples += n

    def _shift_window(self) -> None:
        """Keep the window's last 32 samples as the next context, then the leftover."""
        end = CONTEXT_SAMPLES + self._filled
        self._buffer[: end - WINDOW_SAMPLES] = self._buffer[WINDOW_SAMPLES:end]
        self._filled -= WINDOW_SAMPLES

    def _gated(self, model_input: np.ndarray) -> bool:
        """Idle and below the energy gate: probability 0 without the model (counted)."""
        if not (self._idle and self._below_gate(model_input[CONTEXT_SAMPLES:])):
            return False
        self.windows += 1
        if not self._state_is_zero:
            self._state.fill(0.0)
            self._state_is_zero = True
        self.last_probability = 0.0
        return True

    async def _score(self, model_input: np.ndarray) -> float:
        if self._gated(model_input):
            return 0.0
        self.windows += 1
        batcher = self._batcher or shared_batcher()
        self.inferences += 1
        self._state_is_zero = False
        self.last_probability = await batcher.infer(model_input, self._state)
        return self.last_probability

    @property
    def _idle(self) -> bool:
        return not self._speaking and self._onset is None

    def _below_gate(self, window: np.ndarray) -> bool:
        return float(np.dot(window, window)) < self._gate_power * WINDOW_SAMPLES

    def _update(self, probability: float) -> VADEvent | None:
        start = self._window_start
        end = self._window_start = start + WINDOW_SAMPLES
        is_speech = probability >= self.threshold
        is_silence = probability < self.end_threshold
        if self._speaking:
            return self._update_speaking(start, end, is_speech, is_silence)
        if self._onset is None and is_speech:
            self._onset = start
        elif self._onset is not None and is_silence:
            self._onset = None
        if self._onset is not None and end - self._onset >= self._min_speech:
            self._speaking = True
            return VADSpeechStart(self._seconds(self._onset), self.audio_time, self._clock())
        return None

    def _update_speaking(
        self, start: int, end: int, is_speech: bool, is_silence: bool
    ) -> VADSpeechEnd | VADPause | VADResume | None:
        if is_speech:
            resumed = self._paused_at is not None
            self._silence_start = self._paused_at = None
            return VADResume(self._seconds(start), self._clock()) if resumed else None
        elif is_silence and self._silence_start is None:
            self._silence_start = start
        if self._silence_start is None:
            return None
        silent = end - self._silence_start
        if silent < self._min_silence:
            if self._pause is None or silent < self._pause or self._paused_at is not None:
                return None
            self._paused_at = self._silence_start
            return VADPause(self._seconds(self._silence_start), self.audio_time, self._clock())
        assert self._onset is not None
        event = VADSpeechEnd(
            self._seconds(self._onset),
            self._seconds(self._silence_start),
            self.audio_time,
            self._clock(),
        )
        self._speaking = False
        self._onset = self._silence_start = self._paused_at = None
        return event

    @staticmethod
    def _seconds(sample: int) -> float:
        return sample / SAMPLE_RATE
