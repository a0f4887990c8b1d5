"""Twilio's side of a bidirectional Media Stream, as a WebSocket client: a scripted phone
caller for tests and benchmarks (PROTOCOLS A2-A4).

It signs the upgrade with X-Twilio-Signature, sends `connected` and `start`, then one
20 ms inbound `media` frame on an absolute 20 ms schedule (silence when the script has
nothing to say). Outbound audio from the app is queued and "played" against the caller's
own clock at 8000 bytes/s; a `mark` is echoed only once all audio queued before it has
played, and `clear` drops unplayed audio and echoes pending marks at once, as Twilio does.
Everything heard is recorded with monotonic times relative to the moment `start` was sent.

Light enough for 200 concurrent callers in one process: two tasks per call, payloads
pre-encoded when speech is scheduled, no per-frame numpy or JSON encoding.

Of ours, imports only: emulators, utils.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from utils import FRAME_BYTES, MULAW_SILENCE, SAMPLE_RATE

FRAME_S = FRAME_BYTES / SAMPLE_RATE
SILENCE_PAYLOAD = base64.b64encode(bytes([MULAW_SILENCE]) * FRAME_BYTES).decode()
_MEDIA = (
    '{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":'
    '{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
)


# --- timeline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    """Caller audio (8 kHz mu-law) starting `at` seconds after `start`. Speech that would
    overlap earlier speech starts when that ends."""

    at: float
    audio: bytes
    label: str = ""


@dataclass(frozen=True)
class SayAfterAgentAudio:
    """Caller audio starting `delay_s` after the `talkspurt`-th agent talkspurt (1 = the
    first, usually the greeting) starts being heard, or ends if `anchor="end"`."""

    talkspurt: int
    delay_s: float
    audio: bytes
    label: str = ""
    anchor: str = "start"


@dataclass(frozen=True)
class Dtmf:
    at: float
    digit: str


@dataclass(frozen=True)
class Hangup:
    """Send `stop` and close the socket `at` seconds after `start`."""

    at: float


@dataclass(frozen=True)
class HangupAfterAgentAudio:
    talkspurt: int
    delay_s: float
    anchor: str = "start"


Action = Say | SayAfterAgentAudio | Dtmf | Hangup | HangupAfterAgentAudio


# --- results ----------------------------------------------------------------------------------


@dataclass
class Talkspurt:
    """Agent audio heard without a gap longer than `talkspurt_gap_s`."""

    start: float
    end: float
    bytes: int = 0


@dataclass
class SpeechSegment:
    start: float
    end: float
    bytes: int
    label: str = ""


@dataclass
class MarkEvent:
    name: str
    received: float
    echoed: float | None = None
    cleared: bool = False
    """Echoed because of a `clear`: the audio before it was not all heard."""


@dataclass
class CallerResult:
    """Times are seconds after `start` was sent (monotonic clock)."""

    account_sid: str
    call_sid: str
    stream_sid: str
    started_at: float = 0.0
    """Wall-clock time.time() when `start` was sent."""
    ended_by: str = ""
    """"hangup", "server", "timeout", "connect_error" or "error"."""
    duration: float = 0.0
    close_code: int | None = None
    close_reason: str = ""
    media: list[tuple[float, int]] = field(default_factory=list)
    """Every outbound media message received: (arrival time, bytes)."""
    talkspurts: list[Talkspurt] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    clears_before_media: list[int] = field(default_factory=list)
    """Per media message, how many clears had arrived before it: the order of the two kinds
    of message, which arrival times cannot always give (the event loop's clock has a
    millisecond resolution, and one socket read can hold both)."""
    marks: list[MarkEvent] = field(default_factory=list)
    speech: list[SpeechSegment] = field(default_factory=list)
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    bytes_received: int = 0
    bytes_played: int = 0
    bytes_discarded: int = 0
    """Dropped unplayed by `clear`."""
    bytes_unplayed: int = 0
    """Still queued when the call ended."""
    frames_sent: int = 0
    errors: list[str] = field(default_factory=list)
    received_audio: bytearray | None = None
    """All outbound audio received, when the caller was made with keep_audio=True."""

    @property
    def greeting_latency(self) -> float | None:
        """From `start` to the first agent audio heard."""
        return self.talkspurts[0].start if self.talkspurts else None

    def turn_latencies(self) -> list[float | None]:
        """Per caller utterance: end of speech to the start of the next agent talkspurt."""
        out: list[float | None] = []
        for seg in self.speech:
            nxt = next((t for t in self.talkspurts if t.start >= seg.end - 1e-6), None)
            out.append(None if nxt is None else nxt.start - seg.end)
        return out

    def barge_in_latencies(self) -> list[float | None]:
        """Per caller utterance: speech onset to the first `clear` received before the
        next utterance starts (None: the agent never cleared)."""
        out: list[float | None] = []
        for i, seg in enumerate(self.speech):
            until = self.speech[i + 1].start if i + 1 < len(self.speech) else math.inf
            hit = next((c for c in self.clears if seg.start <= c < until), None)
            out.append(None if hit is None else hit - seg.start)
        return out


# --- the caller -------------------------------------------------------------------------------


@dataclass
class _Segment:
    start_frame: int
    payloads: list[str]


@dataclass
class _Chunk:
    start: float
    end: float
    size: int


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _payloads(audio: bytes) -> list[str]:
    pad = (-len(audio)) % FRAME_BYTES
    audio = audio + bytes([MULAW_SILENCE]) * pad
    return [
        base64.b64encode(audio[i : i + FRAME_BYTES]).decode()
        for i in range(0, len(audio), FRAME_BYTES)
    ]


class TwilioCaller:
    """One scripted call. `await caller.run()` connects, plays the timeline and returns a
    CallerResult when the caller hangs up, the server closes, or `max_duration_s` passes.

    `signed_url` is the public `wss://` URL the app validates the signature against
    (default: `ws_url`); no signature header is sent without `auth_token`.
    """

    def __init__(
        self,
        ws_url: str,
        timeline: Iterable[Action] = (),
        *,
        auth_token: str | None = None,
        signed_url: str | None = None,
        account_sid: str | None = None,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        custom_parameters: dict[str, str] | None = None,
        max_duration_s: float = 120.0,
        talkspurt_gap_s: float = 0.1,
        keep_audio: bool = False,
        connect_timeout_s: float = 10.0,
        return_marks: bool = True,
    ) -> None:
        """`return_marks=False`: a peer that never sends marks back (Twilio returns each as
        its audio plays; a media proxy may drop them), so the service must go by its clock."""
        self.ws_url = ws_url
        self.return_marks = return_marks
        self.timeline = list(timeline)
        self.auth_token = auth_token
        self.signed_url = signed_url or ws_url
        self.custom_parameters = {k: str(v) for k, v in (custom_parameters or {}).items()}
        self.max_duration_s = max_duration_s
        self.gap = talkspurt_gap_s
        self.connect_timeout_s = connect_timeout_s
        self.result = CallerResult(
            account_sid=account_sid or new_sid("AC"),
            call_sid=call_sid or new_sid("CA"),
            stream_sid=stream_sid or new_sid("MZ"),
            received_audio=bytearray() if keep_audio else None,
        )
        self._t0 = 0.0
        self._seq = 0
        self._next_frame = 0
        self._speech_free_frame = 0
        self._segments: deque[_Segment] = deque()
        self._timed: list[Say | Dtmf | Hangup] = sorted(
            (a for a in self.timeline if isinstance(a, Say | Dtmf | Hangup)), key=lambda a: a.at
        )
        self._anchored: list[SayAfterAgentAudio | HangupAfterAgentAudio] = [
            a for a in self.timeline if isinstance(a, SayAfterAgentAudio | HangupAfterAgentAudio)
        ]
        self._hangup_at: float | None = None
        self._end_time: float | None = None
        self._play_end = 0.0
        self._queue: deque[_Chunk] = deque()
        self._pending_marks: deque[tuple[float, MarkEvent]] = deque()

    # --- clock --------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since `start` was sent."""
        return asyncio.get_running_loop().time() - self._t0

    # --- run ----------------------------------------------------------------------------

    async def run(self) -> CallerResult:
        headers = {}
        if self.auth_token:
            validator = RequestValidator(self.auth_token)
            headers["X-Twilio-Signature"] = validator.compute_signature(self.signed_url, {})
        try:
            ws = await connect(
                self.ws_url,
                additional_headers=headers,
                compression=None,
                open_timeout=self.connect_timeout_s,
                ping_interval=None,
                max_size=2**22,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            self.result.ended_by = "connect_error"
            self.result.errors.append(_describe_connect_error(exc))
            return self.result
        try:
            await self._converse(ws)
        except ConnectionClosed:
            self.result.ended_by = "server"  # closed before the stream started
        finally:
            await ws.close()
            self._finish_accounting()
        return self.result

    async def _converse(self, ws: ClientConnection) -> None:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(self._start_message())
        self._t0 = asyncio.get_running_loop().time()
        self.result.started_at = time.time()
        sender = asyncio.create_task(self._send_loop(ws))
        receiver = asyncio.create_task(self._receive_loop(ws))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not self.result.ended_by:
                crashed = sender.done() and not sender.cancelled() and sender.exception()
                self.result.ended_by = "error" if crashed else "server"
                sender.cancel()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(receiver), 2.0)
        finally:
            for task in (sender, receiver):
                task.cancel()
            outcomes = await asyncio.gather(sender, receiver, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                self.result.errors.append(f"{type(outcome).__name__}: {outcome}")
        self.result.close_code = ws.close_code
        self.result.close_reason = ws.close_reason or ""

    def _start_message(self) -> str:
        r = self.result
        self._seq = 1
        return json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": r.stream_sid,
                "start": {
                    "streamSid": r.stream_sid,
                    "accountSid": r.account_sid,
                    "callSid": r.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": self.custom_parameters,
                    "mediaFormat": {
                        "encoding": "audio/x-mulaw",
                        "sampleRate": SAMPLE_RATE,
                        "channels": 1,
                    },
                },
            }
        )

    # --- sending ------------------------------------------------------------------------

    async def _send_loop(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send_frames(ws)

    async def _send_frames(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        frame = 0
        while True:
            deadline = self._t0 + (frame + 1) * FRAME_S
            wake = min(deadline, self._t0 + self._next_mark_due())
            if wake > loop.time():
                await asyncio.sleep(wake - loop.time())
            now = self.now()
            await self._echo_due_marks(ws, now)
            if loop.time() < deadline:
                continue  # woke early to echo a mark on time
            await self._run_due_actions(ws, now)
            if self._hangup_at is not None or now >= self.max_duration_s:
                await self._hang_up(ws, now)
                return
            self._next_frame = frame + 1
            self._seq += 1
            sid, payload = self.result.stream_sid, self._payload(frame)
            await ws.send(_MEDIA % (self._seq, sid, frame + 1, frame * 20, payload))
            self.result.frames_sent += 1
            frame += 1

    def _next_mark_due(self) -> float:
        return self._pending_marks[0][0] if self._pending_marks else math.inf

    def _payload(self, frame: int) -> str:
        segments = self._segments
        while segments and frame >= segments[0].start_frame + len(segments[0].payloads):
            segments.popleft()
        if segments and frame >= segments[0].start_frame:
            return segments[0].payloads[frame - segments[0].start_frame]
        return SILENCE_PAYLOAD

    async def _run_due_actions(self, ws: ClientConnection, now: float) -> None:
        self._trigger_end_anchors(now)
        while self._timed and self._timed[0].at <= now:
            action = self._timed.pop(0)
            if isinstance(action, Say):
                self._schedule_speech(action.at, action.audio, action.label)
            elif isinstance(action, Dtmf):
                await self._send_dtmf(ws, now, action.digit)
            elif isinstance(action, Hangup) and self._hangup_at is None:
                self._hangup_at = now

    def _schedule_speech(self, at: float, audio: bytes, label: str) -> None:
        wanted = math.ceil(at / FRAME_S - 1e-6)
        start_frame = max(wanted, self._next_frame, self._speech_free_frame)
        payloads = _payloads(audio)
        self._segments.append(_Segment(start_frame, payloads))
        self._speech_free_frame = start_frame + len(payloads)
        start = start_frame * FRAME_S
        self.result.speech.append(
            SpeechSegment(start, start + len(audio) / SAMPLE_RATE, len(audio), label)
        )

    def _schedule(self, action: Action, at: float) -> None:
        """Queue an anchored action once its anchor time is known."""
        if isinstance(action, SayAfterAgentAudio):
            self._insert_timed(Say(at, action.audio, action.label))
        else:
            self._insert_timed(Hangup(at))

    def _insert_timed(self, action: Say | Hangup) -> None:
        self._timed.append(action)
        self._timed.sort(key=lambda a: a.at)

    def _trigger_end_anchors(self, now: float) -> None:
        spurts = self.result.talkspurts
        for action in list(self._anchored):
            if action.anchor != "end" or len(spurts) < action.talkspurt:
                continue
            spurt = spurts[action.talkspurt - 1]
            ended = len(spurts) > action.talkspurt or now - spurt.end > self.gap
            if ended:
                self._anchored.remove(action)
                self._schedule(action, spurt.end + action.delay_s)

    def _trigger_start_anchors(self, index: int, start: float) -> None:
        for action in list(self._anchored):
            if action.anchor == "start" and action.talkspurt == index:
                self._anchored.remove(action)
                self._schedule(action, start + action.delay_s)

    async def _send_dtmf(self, ws: ClientConnection, now: float, digit: str) -> None:
        self._seq += 1
        message = {
            "event": "dtmf",
            "sequenceNumber": str(self._seq),
            "streamSid": self.result.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
        await ws.send(json.dumps(message))
        self.result.dtmf.append((now, digit))

    async def _hang_up(self, ws: ClientConnection, now: float) -> None:
        self.result.ended_by = "hangup" if self._hangup_at is not None else "timeout"
        self._seq += 1
        stop = {
            "event": "stop",
            "sequenceNumber": str(self._seq),
            "streamSid": self.result.stream_sid,
            "stop": {"accountSid": self.result.account_sid, "callSid": self.result.call_sid},
        }
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(stop))
        self._end_time = now
        await ws.close()

    async def _send_mark(self, ws: ClientConnection, mark: MarkEvent, now: float) -> None:
        self._seq += 1
        message = {
            "event": "mark",
            "sequenceNumber": str(self._seq),
            "streamSid": self.result.stream_sid,
            "mark": {"name": mark.name},
        }
        mark.echoed = now
        await ws.send(json.dumps(message))

    async def _echo_due_marks(self, ws: ClientConnection, now: float) -> None:
        while self._pending_marks and self._pending_marks[0][0] <= now:
            _, mark = self._pending_marks.popleft()
            await self._send_mark(ws, mark, now)

    # --- receiving and playback ---------------------------------------------------------

    async def _receive_loop(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                await self._on_message(ws, raw)

    async def _on_message(self, ws: ClientConnection, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
            event = message.get("event")
        except (ValueError, AttributeError):
            self.result.errors.append(f"unparseable message: {str(raw)[:80]!r}")
            return
        if event not in ("media", "mark", "clear"):
            return
        if message.get("streamSid") != self.result.stream_sid:
            self.result.errors.append(f"{event} with wrong streamSid {message.get('streamSid')!r}")
            return
        now = self.now()
        if event == "media":
            self._on_media(now, message)
        elif event == "mark":
            await self._on_mark(ws, now, str((message.get("mark") or {}).get("name", "")))
        else:
            await self._on_clear(ws, now)

    def _on_media(self, now: float, message: dict[str, Any]) -> None:
        try:
            audio = base64.b64decode((message.get("media") or {})["payload"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            self.result.errors.append("media without a valid base64 payload")
            return
        self.result.media.append((now, len(audio)))
        self.result.clears_before_media.append(len(self.result.clears))
        self.result.bytes_received += len(audio)
        if self.result.received_audio is not None:
            self.result.received_audio += audio
        if audio:
            self._enqueue(now, len(audio))

    def _enqueue(self, now: float, size: int) -> None:
        start = max(now, self._play_end)
        spurts = self.result.talkspurts
        if not spurts or start - spurts[-1].end > self.gap:
            spurts.append(Talkspurt(start, start))
            self._trigger_start_anchors(len(spurts), start)
        end = start + size / SAMPLE_RATE
        spurts[-1].end = end
        spurts[-1].bytes += size
        self._play_end = end
        self._queue.append(_Chunk(start, end, size))
        while self._queue and self._queue[0].end <= now:
            self._queue.popleft()

    async def _on_mark(self, ws: ClientConnection, now: float, name: str) -> None:
        mark = MarkEvent(name, now)
        self.result.marks.append(mark)
        if not self.return_marks:
            return
        if self._play_end <= now:
            await self._send_mark(ws, mark, now)
        else:
            self._pending_marks.append((self._play_end, mark))

    async def _on_clear(self, ws: ClientConnection, now: float) -> None:
        self.result.clears.append(now)
        self.result.bytes_discarded += self._truncate(now)
        while self._pending_marks:
            _, mark = self._pending_marks.popleft()
            mark.cleared = True
            await self._send_mark(ws, mark, now)

    def _truncate(self, at: float) -> int:
        """Drop audio not yet played at `at`; returns the bytes dropped."""
        dropped = 0
        for chunk in self._queue:
            if chunk.end <= at:
                continue
            played = max(0.0, at - chunk.start)
            dropped += chunk.size - min(chunk.size, round(played * SAMPLE_RATE))
        self._queue.clear()
        if self._play_end > at:
            self._play_end = at
            spurt = self.result.talkspurts[-1]
            spurt.end = max(spurt.start, at)
            spurt.bytes -= dropped
        return dropped

    def _finish_accounting(self) -> None:
        end = self._end_time if self._end_time is not None else self.now()
        r = self.result
        r.duration = end
        r.bytes_unplayed = self._truncate(end)
        r.bytes_played = r.bytes_received - r.bytes_discarded - r.bytes_unplayed


def _describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"upgrade rejected with HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}"


async def run_callers(callers: Iterable[TwilioCaller]) -> list[CallerResult]:
    """Run callers concurrently; results in the same order."""
    return list(await asyncio.gather(*(c.run() for c in callers)))
