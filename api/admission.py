"""Call admission: at most `MAX_CONCURRENT_CALLS` calls at once in this process.

Role: decide whether a new call may start. Every call of a process runs on its one event
loop, so what a process can carry is bounded by one core: past its capacity, barge-in,
pacing and latency degrade for every call at once (BENCHMARKS.md, the capacity sweep).
Refusing the call that would cross the cap keeps the calls already up as they were. A live
call is never cut, and a stream Twilio opens for a call we answered is always served.

A call holds a slot from its admission (the voice webhook answering it, or `POST /v1/calls`
dialling it) until its media stream ends. Until the stream starts the slot is a
reservation, which lapses after `hold_s` (the stream never came: the callee did not answer,
Twilio failed) or when a status callback says the call ended.

Must not import: twilio, deepgram, ollama, chromadb, fastapi, starlette, sqlalchemy,
pipeline, voice_pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

INBOUND_HOLD_S = 30.0
"""An answered inbound call opens its stream within a second or two of our TwiML."""
OUTBOUND_HOLD_S = 120.0
"""A dialled call opens its stream once the callee answers: Twilio rings for up to 60 s."""
RETRY_AFTER_S = 30
"""What a refused API client is told to wait (`Retry-After`): about one short call."""


class CallAdmission:
    """Slots for concurrent calls; `limit` 0 admits every call.

    `live` gives the ids of the calls whose stream is running (the pipeline's registry);
    they hold their slot until they leave it, whether or not they were admitted here (a
    stream that outlived its reservation, or one from before a restart)."""

    def __init__(
        self,
        limit: int,
        live: Callable[[], Collection[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._live = live
        self._clock = clock
        self._reserved: dict[str, float] = {}  # call id -> when its reservation lapses

    def try_admit(self, call_id: str, hold_s: float) -> bool:
        """Admit `call_id` if a slot is free (or it already holds one); False at the cap."""
        self._prune()
        live = self._live()
        if call_id in self._reserved or call_id in live:
            return True
        if self.limit and len(live) + len(self._reserved) >= self.limit:
            return False
        self._reserved[call_id] = self._clock() + hold_s
        return True

    def release(self, call_id: str) -> None:
        """The call ended before its stream started (or it never will): free its slot."""
        self._reserved.pop(call_id, None)

    def in_use(self) -> int:
        """Slots taken: live streams plus reservations not yet started or lapsed."""
        self._prune()
        return len(self._live()) + len(self._reserved)

    def reserved(self) -> int:
        self._prune()
        return len(self._reserved)

    def _prune(self) -> None:
        now, live = self._clock(), self._live()
        for call_id, lapses_at in list(self._reserved.items()):
            if lapses_at <= now or call_id in live:  # lapsed, or its stream holds the slot
                del self._reserved[call_id]
