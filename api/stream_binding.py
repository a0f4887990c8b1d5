"""Binding a Media Stream to its call. Twilio signs the WebSocket upgrade over the URL only,
and the URL is the same for every call, so the signature alone proves nothing about which
call a stream is for. The TwiML that opens a stream therefore carries a per-call token as a
`<Parameter>` (`stream_token`), and `StreamGuard` checks the stream's `start` before the
pipeline reads or writes anything:

- the token: HMAC-SHA256 over the call id, the call's Twilio CallSid and an expiry, keyed by
  STREAM_TOKEN_SECRET (a random per-process key when unset). Outbound TwiML is written before
  Twilio names the call, so an outbound token binds the call id and expiry only, and lives
  longer (`OUTBOUND_RING_S`: the callee's phone rings first);
- `start.callSid` is the call's Twilio SID in the database;
- the call is not over, and no stream has started for it (single use: the first stream
  writes `stream_sid`; `CallManager` refuses a second one while the first is starting).

Any failure closes the socket with 1008.

Must not import the pipeline's internals (only its contracts) or a vendor SDK.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from models import TERMINAL_STATUSES, Call
from pipeline.contracts import StreamStart

log = logging.getLogger("ai_sdr.stream_binding")

TOKEN_PARAMETER = "stream_token"
OUTBOUND_RING_S = 600.0


class StreamTokens:
    """Mints and checks stream tokens: `<expiry unix seconds>.<hex HMAC>`."""

    def __init__(
        self, secret: str, ttl_s: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = secret.encode() if secret else secrets.token_bytes(32)
        self.ttl_s = ttl_s
        self.clock = clock

    def mint(self, call_id: str, call_sid: str = "", *, outbound: bool = False) -> str:
        """`call_sid` is empty for an outbound call, whose TwiML precedes its SID."""
        lifetime = self.ttl_s + (OUTBOUND_RING_S if outbound else 0.0)
        expiry = int(self.clock() + lifetime)
        return f"{expiry}.{self._mac(call_id, call_sid, expiry)}"

    def check(self, token: str, call_id: str, call_sid: str) -> str | None:
        """None when `token` is this call's and unexpired; otherwise why not."""
        expiry_text, _, mac = token.partition(".")
        if not expiry_text.isdigit() or not mac:
            return "malformed token"
        if not hmac.compare_digest(mac, self._mac(call_id, call_sid, int(expiry_text))):
            return "token does not match the call"
        if int(expiry_text) < self.clock():
            return "token expired"
        return None

    def _mac(self, call_id: str, call_sid: str, expiry: int) -> str:
        message = f"{call_id}\n{call_sid}\n{expiry}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


class StreamGuard:
    """The pipeline's `StreamGuard` over the `calls` table."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], tokens: StreamTokens
    ) -> None:
        self.sessionmaker = sessionmaker
        self.tokens = tokens

    async def refusal(self, start: StreamStart) -> str | None:
        """None when the stream may run for its call; otherwise why it may not (logged by
        the caller; nothing is written here)."""
        call_id = start.parameters.get("call_id", "")
        token = start.parameters.get(TOKEN_PARAMETER, "")
        if not call_id or not token:
            return "no call_id or stream_token parameter"
        async with self.sessionmaker() as session:
            call = await session.scalar(select(Call).where(Call.id == call_id))
        if call is None:
            return "unknown call"
        bound_sid = "" if call.direction == "outbound" else (call.twilio_call_sid or "")
        if (why := self.tokens.check(token, call.id, bound_sid)) is not None:
            return why
        if call.direction == "web":  # a browser test call: no telephony call behind it
            if start.call_sid:
                return "a browser call names no callSid"
        elif not call.twilio_call_sid or start.call_sid != call.twilio_call_sid:
            return "callSid is not the call's"
        if call.status in TERMINAL_STATUSES or call.ended_reason is not None:
            return "the call is over"
        if call.stream_sid is not None:
            return "the call already had a stream"
        return None
