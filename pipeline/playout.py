"""Playout: the agent's speech onto the media transport, paced against the playback clock.

Role: the pacer loop (audio in 100 ms messages, `LEAD_S` ahead of playback), marks at the
end of each text chunk and what their return proves, `clear` and rewind on a barge-in, the
playout lag learnt from returning marks, and so what the caller has heard of a `Speech`.
Whose speech plays, and when to pause or stop it, is the call's decision (`CallSession`).

Must not import FastAPI, SQLAlchemy, a vendor SDK, `api/`, `store/` or `voice_pipeline`.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from pipeline.contracts import MediaTransport
from pipeline.metrics import PipelineMetrics
from pipeline.providers import Clock
from pipeline.speech import Speech
from utils import FRAME_BYTES, SAMPLE_RATE

LEAD_S = 0.3
"""Outbound audio kept queued at Twilio ahead of the playback clock: enough to ride out
network jitter, little enough that a barge-in has little to clear."""
OUTBOUND_BYTES = 5 * FRAME_BYTES
"""Audio per outbound `media` message: 100 ms. Twilio buffers any length; each message costs
a JSON envelope, a WebSocket frame and a send syscall, so five frames per message cut the
busiest outbound path to a fifth. The lead (`LEAD_S`) is unchanged, and a `clear` empties
Twilio's buffer whatever the message size."""
LOW_WATER_S = 0.1
"""Below this much queued audio (the first message of a speech, or a slow TTS), whole frames
go out as soon as they exist instead of waiting for a full message."""
DEFAULT_PLAYOUT_LAG_S = 0.08
MAX_PLAYOUT_LAG_S = 1.0
RESUME_BACKUP_S = 0.3
"""On resuming after a false barge-in, repeat this much: a little repetition after a pause
sounds natural; a skipped syllable does not."""
MARK_GRACE_S = 1.0
"""How long after the end of the audio sent a speech counts as heard if its marks never
come back (Twilio returns each one as its audio plays; this only covers marks lost)."""
MAX_UNSENT_BYTES = 20 * SAMPLE_RATE
"""Synthesised audio waiting to be paced out; TTS waits beyond this (backpressure)."""
PACER_GRID_S = 0.005
"""The pacer's waits end on this grid, for the same reason as the call's timers (see
`voice_pipeline.WATCHDOG_S`): the speaking calls' sends share wake-ups. A send is at most
5 ms later than its lead allows, against a 300 ms lead."""


def on_grid(delay: float, grid: float, now: float | None = None) -> float:
    """`delay`, lengthened to end on the next multiple of `grid` of the loop's clock (`now`:
    its reading, by default read here)."""
    if now is None:
        now = asyncio.get_running_loop().time()
    return delay + (-(now + delay)) % grid


class SendFailed(Exception):
    """The transport could not send: the caller's side has gone."""


class Playout:
    """Plays `speech` (one at a time) through the transport. `run()` is the pacer loop;
    `spawn` runs a send that a synchronous decision starts (a `clear`)."""

    def __init__(
        self,
        transport: MediaTransport,
        *,
        clock: Clock,
        metrics: PipelineMetrics,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.speech: Speech | None = None
        """What the caller hears (or is about to): the call sets it with `play()`."""
        self.paused = False
        """Held for caller speech: nothing is sent until resumed."""
        self._transport = transport
        self._clock = clock
        self._metrics = metrics
        self._spawn = spawn
        self._play_end = 0.0  # when the audio sent so far ends playing, by the clock
        self._lag = DEFAULT_PLAYOUT_LAG_S
        self._generation = 0  # clears so far: a mark from before the last one was cleared
        self._wake = asyncio.Event()
        self._sent_more = asyncio.Event()
        self._send_lock = asyncio.Lock()

    # --- the call's controls ------------------------------------------------------------

    def play(self, speech: Speech) -> None:
        """`speech` is the one to play from now on; it goes out once released."""
        self.speech = speech
        self.paused = False

    def wake(self) -> None:
        """There may be something to send."""
        self._wake.set()

    def stop(self, speech: Speech, *, interrupted: bool) -> None:
        """`speech` plays no more (it ended, or the rest was dropped)."""
        now = self._clock()
        self.speech = None
        if interrupted:
            self._play_end = min(self._play_end, now)
        speech.end_at = now
        speech.played.set()

    def audible(self) -> bool:
        speech = self.speech
        if speech is None or self.paused:
            return False
        return self._play_end > self._clock() or speech.sent < len(speech.audio)

    def played_bytes(self, speech: Speech) -> int:
        """What the caller has heard by now: the playback clock, shifted by the playout lag
        that returning marks reveal (network and the phone's jitter buffer)."""
        unplayed = max(0.0, self._play_end + self._lag - self._clock()) * SAMPLE_RATE
        return max(int(speech.sent - unplayed), 0)

    def heard(self, speech: Speech) -> str:
        return speech.heard_text(self.played_bytes(speech))

    def pause(self, now: float) -> int:
        """Caller speech over the agent: drop what the phone has queued, hold the rest, and
        return how many bytes of the speech the caller heard."""
        speech = self.speech
        assert speech is not None
        played = self.played_bytes(speech)
        self.clear()
        self._rewind(speech, played)
        self._play_end = now
        self.paused = True
        return played

    def resume(self, speech: Speech | None) -> None:
        """Play on after a pause, `speech` from a little before where it was held."""
        self.paused = False
        if speech is not None:
            self._rewind(speech, speech.sent - int(RESUME_BACKUP_S * SAMPLE_RATE))
        self._wake.set()

    def clear(self) -> None:
        """Drop the audio queued at the phone (sent in order after what is being sent)."""
        self._generation += 1
        self._spawn(self._send_clear())

    def _rewind(self, speech: Speech, position: int) -> None:
        """Send again from `position`: the phone dropped what was queued after it."""
        speech.sent = max(min(position, speech.sent), 0)
        for chunk in speech.chunks:
            if chunk.end is not None and chunk.end > speech.sent and not chunk.acked:
                chunk.mark_sent = False

    # --- the producer's side ------------------------------------------------------------

    async def append(self, speech: Speech, audio: bytes) -> None:
        """Synthesised audio for `speech`; waits while too much of it is still unsent."""
        if speech.first_audio_at is None:
            speech.first_audio_at = self._clock()
        while len(speech.audio) - speech.sent > MAX_UNSENT_BYTES:
            self._sent_more.clear()
            await self._sent_more.wait()
        speech.audio += audio
        self._wake.set()

    async def wait_played(self, speech: Speech) -> None:
        """Until the caller has heard all of it (marks), with a clock-based safety net for
        marks that never come back: a second after the last audio sent should have played.
        The net is re-armed while audio is still unsent (the pacer sends only `LEAD_S`
        ahead), so it never fires before the end of what the caller has to hear."""
        while not speech.cancelled:
            if all(c.acked for c in speech.chunks) and speech.sent >= len(speech.audio):
                return
            deadline = max(self._play_end - self._clock(), 0) + MARK_GRACE_S
            waiter = asyncio.ensure_future(speech.played.wait())
            try:
                await asyncio.wait_for(waiter, timeout=deadline)
            except TimeoutError:
                all_sent = speech.sent >= len(speech.audio)
                if not self.paused and all_sent and self._clock() >= self._play_end:
                    return
            if speech.played.is_set():
                return

    # --- the transport's side -----------------------------------------------------------

    def on_mark(self, name: str) -> None:
        """A mark came back: the chunk it ends has played, unless a clear discarded it."""
        mark, _, generation = name.rpartition(".")
        speech = self.speech
        if speech is None or generation != str(self._generation):
            return  # a mark returned by a clear: its audio was discarded, not heard
        for chunk in speech.chunks:
            if chunk.mark == mark and not chunk.acked:
                chunk.acked = True
                self._learn_lag(self._clock() - chunk.due)
        if speech.producer_done and all(c.acked for c in speech.chunks):
            speech.played.set()

    def _learn_lag(self, sample: float) -> None:
        # a returning mark overstates the lag by its trip back: resuming repeats a few
        # milliseconds rather than skipping any
        sample = min(max(sample, 0.0), MAX_PLAYOUT_LAG_S)
        self._lag = 0.7 * self._lag + 0.3 * sample

    # --- pacing -------------------------------------------------------------------------

    async def run(self) -> None:
        """The pacer: speech audio -> media messages paced against the playback clock."""
        while True:
            await self._wake.wait()
            speech = self.speech
            if speech is None or self.paused or not self._has_sendable(speech):
                self._wake.clear()
                continue
            lead = self._play_end - self._clock()
            if lead > LEAD_S:
                await asyncio.sleep(on_grid(lead - LEAD_S, PACER_GRID_S))
                continue
            await self._send_frame(speech)

    def _has_sendable(self, speech: Speech) -> bool:
        if speech.sent < len(speech.audio):
            return True
        return any(c.end is not None and not c.mark_sent for c in speech.chunks)

    async def _send_frame(self, speech: Speech) -> None:
        complete = speech.complete_bytes()
        available = len(speech.audio) - speech.sent
        size = min(OUTBOUND_BYTES, available)
        if 0 < size < OUTBOUND_BYTES and speech.sent + size > complete:
            # a short message only at the end of a chunk, or whole frames when the caller's
            # buffer runs low; otherwise wait for more audio
            lead = self._play_end - self._clock()
            if lead < LOW_WATER_S and size >= FRAME_BYTES:
                size -= size % FRAME_BYTES
            else:
                self._wake.clear()
                if size >= FRAME_BYTES:  # frames wait: send them by low water at the latest
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), lead - LOW_WATER_S)
                    self._wake.set()
                return
        if size > 0:
            payload = speech.audio[speech.sent : speech.sent + size]
            speech.sent += size
            self._sent_more.set()
            now = self._clock()
            self._play_end = max(self._play_end, now) + size / SAMPLE_RATE
            if speech.first_media_at is None:
                speech.first_media_at = now
                self._first_media(speech)
            await self._send_audio(payload, self._generation)
        for chunk in speech.chunks:
            if chunk.end is not None and not chunk.mark_sent and speech.sent >= chunk.end:
                chunk.mark_sent = True
                chunk.due = self._play_end
                await self._send_mark(f"{chunk.mark}.{self._generation}")

    # Sends go out in order, one at a time. Audio taken before a `clear` (an older
    # generation) is dropped rather than sent after it: the rewind sends it again.

    async def _send_audio(self, audio: bytes | bytearray, generation: int) -> None:
        async with self._send_lock:
            if generation != self._generation:
                return
            try:
                await self._transport.send_audio(audio)
            except Exception:
                raise SendFailed from None

    async def _send_mark(self, name: str) -> None:
        async with self._send_lock:
            try:
                await self._transport.send_mark(name)
            except Exception:
                raise SendFailed from None

    async def _send_clear(self) -> None:
        async with self._send_lock:
            try:
                await self._transport.send_clear()
            except Exception:
                raise SendFailed from None

    def _first_media(self, speech: Speech) -> None:
        """The speech's first audio is out: its latencies from the caller's end of speech."""
        timing = speech.timing
        if timing is None:
            return
        latency, metrics = speech.latency, self._metrics
        latency["first_media_ms"] = timing.ms(speech.first_media_at)
        latency["tts_first_audio_ms"] = timing.ms(speech.first_audio_at)
        if speech.llm_request_at is not None:  # an answer (a fixed line has no LLM request)
            latency["llm_request_ms"] = timing.ms(speech.llm_request_at)
            if timing.llm_first_token_at is not None:
                waited = timing.llm_first_token_at - speech.llm_request_at
                metrics.provider_latency.labels("llm").observe(waited)
        latency["tts_request_ms"] = timing.ms(speech.tts_request_at)
        if speech.tts_request_at is not None and speech.first_audio_at is not None:
            waited = speech.first_audio_at - speech.tts_request_at
            metrics.provider_latency.labels("tts").observe(waited)
        metrics.observe_turn_ms("first_media", latency["first_media_ms"])
        metrics.observe_turn_ms("tts_first_audio", latency["tts_first_audio_ms"])
