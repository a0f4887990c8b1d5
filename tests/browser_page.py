"""The console's talk page at the wire: a WebSocket client speaking `console/media.py`'s
protocol as `static/talk.js` and its playback worklet do, for scripted browser-call tests
without a browser.

It sends `{"type": "start"}`, then one binary 20 ms mu-law frame on an absolute 20 ms
schedule (silence when the script has nothing to say). The agent's binary audio is queued
and "played" against the page's own clock at 8000 bytes/s; a `mark` is echoed only once the
audio queued before it has played, and a `clear` drops the unplayed audio and echoes the
marks behind it at once: the behaviour the service judges "heard" by, as with Twilio.

The script uses the Twilio caller's cues (`SayAfterAgentAudio`, `HangupAfterAgentAudio`),
anchored on agent talkspurts (agent audio heard without a gap over `talkspurt_gap_s`).

Must not import project modules but `emulators` and `utils`: it is the page, outside the
service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from emulators.twilio_caller import (
    HangupAfterAgentAudio,
    MarkEvent,
    SayAfterAgentAudio,
    Talkspurt,
)
from utils import FRAME_BYTES, MULAW_SILENCE, SAMPLE_RATE

FRAME_S = FRAME_BYTES / SAMPLE_RATE
SILENT_FRAME = bytes([MULAW_SILENCE]) * FRAME_BYTES
Cue = SayAfterAgentAudio | HangupAfterAgentAudio


@dataclass
class PageResult:
    """Times are seconds after `start` was sent (monotonic clock)."""

    call_id: str | None = None
    talkspurts: list[Talkspurt] = field(default_factory=list)
    marks: list[MarkEvent] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    bytes_received: int = 0
    bytes_discarded: int = 0
    close_code: int | None = None
    close_reason: str = ""
    ended_by: str = ""
    """"hangup", "server" or "timeout"."""


def _frames(audio: bytes) -> int:
    return math.ceil(len(audio) / FRAME_BYTES)


class BrowserPage:
    """One scripted browser test call: `await page.run()` connects with `headers` (the
    session cookie and the page's Origin), plays the script and returns what happened."""

    def __init__(
        self,
        ws_url: str,
        script: Iterable[Cue],
        *,
        headers: Mapping[str, str],
        max_duration_s: float = 40.0,
        talkspurt_gap_s: float = 0.1,
    ) -> None:
        self.ws_url = ws_url
        self.headers = dict(headers)
        self.max_duration_s = max_duration_s
        self.gap = talkspurt_gap_s
        self.result = PageResult()
        self._cues = list(script)
        self._speech: deque[tuple[int, bytes]] = deque()  # (first frame, audio)
        self._speech_free = 0  # the first frame after the speech scheduled so far
        self._hangup_at: float | None = None
        self._t0 = 0.0
        self._play_end = 0.0
        self._queue: deque[tuple[float, float, int]] = deque()  # (start, end, bytes)
        self._pending: deque[tuple[float, MarkEvent]] = deque()  # (due, mark)

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    async def run(self) -> PageResult:
        ws = await connect(self.ws_url, additional_headers=self.headers, compression=None)
        try:
            await ws.send(json.dumps({"type": "start"}))
            self._t0 = asyncio.get_running_loop().time()
            sender = asyncio.create_task(self._send_loop(ws))
            receiver = asyncio.create_task(self._receive_loop(ws))
            try:
                await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sender, receiver):
                    task.cancel()
                await asyncio.gather(sender, receiver, return_exceptions=True)
            self.result.ended_by = self.result.ended_by or "server"
        finally:
            await ws.close()
        self.result.close_code = ws.close_code
        self.result.close_reason = ws.close_reason or ""
        return self.result

    # --- the microphone -----------------------------------------------------------------

    async def _send_loop(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        frame = 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                deadline = self._t0 + (frame + 1) * FRAME_S
                due = self._pending[0][0] + self._t0 if self._pending else math.inf
                wake = min(deadline, due)
                if wake > loop.time():
                    await asyncio.sleep(wake - loop.time())
                await self._echo_due_marks(ws, self.now())
                if loop.time() < deadline:
                    continue  # woke early to echo a mark on time
                self._schedule_cues(self.now(), frame)
                if self._hangup_at is not None and self.now() >= self._hangup_at:
                    self.result.ended_by = "hangup"
                    await ws.send(json.dumps({"type": "stop"}))
                    return
                if self.now() >= self.max_duration_s:
                    self.result.ended_by = "timeout"
                    return
                await ws.send(self._frame(frame))
                frame += 1

    def _frame(self, frame: int) -> bytes:
        while self._speech and frame >= self._speech[0][0] + _frames(self._speech[0][1]):
            self._speech.popleft()
        if self._speech and frame >= self._speech[0][0]:
            first, audio = self._speech[0]
            chunk = audio[(frame - first) * FRAME_BYTES : (frame - first + 1) * FRAME_BYTES]
            return chunk + SILENT_FRAME[len(chunk) :]
        return SILENT_FRAME

    def _schedule_cues(self, now: float, frame: int) -> None:
        spurts = self.result.talkspurts
        for cue in list(self._cues):
            if len(spurts) < cue.talkspurt:
                continue
            spurt = spurts[cue.talkspurt - 1]
            if cue.anchor == "end":
                if len(spurts) == cue.talkspurt and now - spurt.end <= self.gap:
                    continue  # still playing, or a gap too short to end it
                at = spurt.end + cue.delay_s
            else:
                at = spurt.start + cue.delay_s
            if now < at:
                continue
            self._cues.remove(cue)
            if isinstance(cue, HangupAfterAgentAudio):
                self._hangup_at = now
            else:
                first = max(frame, self._speech_free)
                self._speech.append((first, cue.audio))
                self._speech_free = first + _frames(cue.audio)

    # --- the speaker --------------------------------------------------------------------

    async def _receive_loop(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                now = self.now()
                if isinstance(raw, bytes):
                    self._play(now, len(raw))
                    continue
                message = json.loads(raw)
                if message.get("type") == "started":
                    self.result.call_id = str(message["call_id"])
                elif message.get("type") == "mark":
                    mark = MarkEvent(str(message.get("name", "")), now)
                    self.result.marks.append(mark)
                    self._pending.append((max(now, self._play_end), mark))
                elif message.get("type") == "clear":
                    await self._clear(ws, now)

    def _play(self, now: float, size: int) -> None:
        self.result.bytes_received += size
        start = max(now, self._play_end)
        spurts = self.result.talkspurts
        if not spurts or start - spurts[-1].end > self.gap:
            spurts.append(Talkspurt(start, start))
        end = start + size / SAMPLE_RATE
        spurts[-1].end = end
        spurts[-1].bytes += size
        self._play_end = end
        self._queue.append((start, end, size))
        while self._queue and self._queue[0][1] <= now:
            self._queue.popleft()

    async def _clear(self, ws: ClientConnection, now: float) -> None:
        self.result.clears.append(now)
        dropped = 0
        for start, end, size in self._queue:
            if end > now:
                dropped += size - min(size, round(max(0.0, now - start) * SAMPLE_RATE))
        self._queue.clear()
        if self._play_end > now:
            self._play_end = now
            spurt = self.result.talkspurts[-1]
            spurt.end = max(spurt.start, now)
            spurt.bytes -= dropped
        self.result.bytes_discarded += dropped
        while self._pending:
            _, mark = self._pending.popleft()
            mark.cleared = True
            await self._echo(ws, mark, now)

    async def _echo_due_marks(self, ws: ClientConnection, now: float) -> None:
        while self._pending and self._pending[0][0] <= now:
            _, mark = self._pending.popleft()
            await self._echo(ws, mark, now)

    @staticmethod
    async def _echo(ws: ClientConnection, mark: MarkEvent, now: float) -> None:
        mark.echoed = now
        await ws.send(json.dumps({"type": "mark", "name": mark.name}))
