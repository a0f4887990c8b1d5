"""Silero VAD on onnxruntime: the model (the ONNX file shipped in the `silero-vad` wheel),
one per process, and the batcher that runs the windows of all calls on one event loop as
few inferences, on the model's worker thread.

Pieces::

    SileroModel   one InferenceSession per process (1 thread), run on B windows and B
                  recurrent states at once
    VADBatcher    per event loop: gathers the windows all calls submit within `max_wait_ms`
                  into one inference, run on the model's worker thread

The model at 8 kHz takes 256-sample windows (32 ms), each prefixed by the last 32 samples
of the previous window as context, plus a recurrent state of shape (2, B, 128).

Must not import FastAPI, SQLAlchemy, vendor SDKs or torch (onnxruntime + numpy only).

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from utils import SAMPLE_RATE

WINDOW_SAMPLES = 256
"""Silero at 8 kHz scores 256-sample (32 ms) windows."""
CONTEXT_SAMPLES = 32
"""Each window is prefixed by the last 32 samples of the previous one."""
INPUT_SAMPLES = CONTEXT_SAMPLES + WINDOW_SAMPLES
STATE_SIZE = 128


# --- model ------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The ONNX file inside the installed `silero-vad` wheel. Located with `find_spec`, which
    does not execute the package: `silero_vad/__init__.py` imports torch."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but {path} is missing")
    return path


class SileroModel:
    """The Silero VAD network. Thread-safe; one per process through `load()`."""

    _shared: SileroModel | None = None
    _lock = threading.Lock()

    def __init__(self, path: Path | str | None = None) -> None:
        options = ort.SessionOptions()
        # Calls are parallel across the batch, not inside one inference: one thread each.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(
            str(path or default_model_path()),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @classmethod
    def load(cls) -> SileroModel:
        """The process-wide model, loaded on first use."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def infer(self, windows: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score B windows at once.

        windows: float32 (B, 288), context then window. states: float32 (2, B, 128).
        Returns probabilities (B,) and the next states (2, B, 128).
        """
        probs, next_states = self._session.run(
            None, {"input": windows, "state": states, "sr": self._sr}
        )
        return probs[:, 0], next_states

    @property
    def executor(self) -> ThreadPoolExecutor:
        """One worker thread for inference off the event loop; onnxruntime releases the GIL."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="silero-vad")
            return self._executor


# --- batching ---------------------------------------------------------------------------


_Outcome = tuple[np.ndarray, np.ndarray] | BaseException


@dataclass(slots=True)
class _Request:
    window: np.ndarray
    state: np.ndarray
    future: asyncio.Future[float]
    submitted: float


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    windows: int = 0
    max_batch: int = 0


class VADBatcher:
    """Runs the windows of all calls on one event loop as few batched inferences.

    A batch runs when its oldest window has waited `max_wait_ms` (0: the next loop turn),
    or at once when it holds `max_batch` windows; windows submitted while a batch runs go
    into the next one. With `offload` the batch runs on the model's worker thread, so the
    event loop only pays for the hand-off; otherwise it runs inline in a loop callback.
    An inference error fails every window of its batch.

    Defaults from bench/vad_bench.py (100 paced calls, 2 cores): batches of one cost about
    65 us a window and batches of 20 about 25 us; waiting 5 ms gathers about 20 windows and
    roughly halves the VAD's CPU, and offloading moves close to half of what is left off
    the event loop thread, which is the resource that limits calls per process.
    """

    def __init__(
        self,
        model: SileroModel | None = None,
        *,
        offload: bool = True,
        max_wait_ms: float = 5.0,
        max_batch: int = 256,
    ) -> None:
        self.model = model or SileroModel.load()
        self.offload = offload
        self.max_wait = max_wait_ms / 1000
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._pending: list[_Request] = []
        self._flush_handle: asyncio.Handle | None = None
        self._running = False

    async def infer(self, window: np.ndarray, state: np.ndarray) -> float:
        """Score one (288,) window; `state` (2, 128) is replaced in place by the next state.
        The caller must not touch either array until this returns. If cancelled, the window
        is not applied to the state."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        self._pending.append(_Request(window, state, future, loop.time()))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """One batch at a time. The next one runs when its oldest window has waited
        `max_wait`, or at once when it is full."""
        if self._running:
            return
        full = len(self._pending) >= self.max_batch
        if self._flush_handle is not None:
            if not full:
                return
            self._flush_handle.cancel()
        delay = 0.0 if full else self._pending[0].submitted + self.max_wait - loop.time()
        if delay <= 0:
            self._flush_handle = loop.call_soon(self._flush, loop)
        else:
            self._flush_handle = loop.call_later(delay, self._flush, loop)

    def _take_batch(self) -> list[_Request]:
        live = [r for r in self._pending if not r.future.done()]
        batch, self._pending = live[: self.max_batch], live[self.max_batch :]
        return batch

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_handle = None
        batch = self._take_batch()
        if not batch:
            return
        self._count(len(batch))
        if self.offload:
            self._running = True
            job = loop.run_in_executor(self.model.executor, self._run, batch)
            job.add_done_callback(functools.partial(self._on_batch_done, loop, batch))
            return
        try:
            outcome: _Outcome = self._run(batch)
        except Exception as exc:
            outcome = exc
        self._resolve(batch, outcome)
        if self._pending:
            self._schedule(loop)

    def _run(self, batch: list[_Request]) -> tuple[np.ndarray, np.ndarray]:
        """Safe off the loop: a caller leaves its window and state alone while it waits."""
        windows = np.stack([r.window for r in batch])
        states = np.stack([r.state for r in batch], axis=1)
        return self.model.infer(windows, states)

    def _on_batch_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Request],
        job: asyncio.Future[tuple[np.ndarray, np.ndarray]],
    ) -> None:
        self._running = False
        if job.cancelled():
            outcome: _Outcome = asyncio.CancelledError()
        else:
            outcome = job.exception() or job.result()
        self._resolve(batch, outcome)
        if self._pending:
            self._schedule(loop)

    @staticmethod
    def _resolve(batch: list[_Request], outcome: _Outcome) -> None:
        for i, request in enumerate(batch):
            if request.future.done():
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
                continue
            probs, next_states = outcome
            request.state[...] = next_states[:, i]
            request.future.set_result(float(probs[i]))

    def _count(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.windows += size
        self.stats.max_batch = max(self.stats.max_batch, size)


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, VADBatcher] = (
    weakref.WeakKeyDictionary()
)


def shared_batcher() -> VADBatcher:
    """The batcher of the running event loop, created on first use, on the shared model."""
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        batcher = _batchers[loop] = VADBatcher()
    return batcher
