"""The Deepgram SDK as both Deepgram adapters use it: one way to build a client, and the one
labelled place that reaches into the SDK's private internals for measured CPU savings.

Private internals used here, checked against deepgram-sdk 7.17.0 (websockets 17.4 under its
sockets); each has a fallback to the SDK's public behaviour when the internal is missing:

- `_freeze_headers`: the client's `_client_wrapper.get_headers`, computed once instead of
  per request. Fallback: the SDK's own per-request headers.
- `raw_socket`: a socket client's `_websocket` (the websockets connection under it), read by
  `listen_messages` to parse the listen socket's frames with orjson instead of the SDK's
  pydantic models, and by the speak socket pool to see a closed socket before using it.
  Fallback: the SDK's model iterator; a socket whose close is not seen early fails on its
  next send, which the speak pool already retries.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment

from config import Settings

log = logging.getLogger("ai_sdr." + __name__)

SAMPLE_RATE = 8000
"""Twilio audio: mu-law, 8 kHz, mono, so one byte is one sample."""


def build_deepgram_client(settings: Settings, **kwargs: Any) -> AsyncDeepgramClient:
    """One SDK client pointed at DEEPGRAM_BASE_URL for REST and its ws:// twin for sockets."""
    environment = DeepgramClientEnvironment(
        base=settings.DEEPGRAM_BASE_URL,
        production=settings.deepgram_ws_base,
        agent=settings.deepgram_ws_base,
        agent_rest=settings.DEEPGRAM_BASE_URL,
    )
    client = AsyncDeepgramClient(
        api_key=settings.DEEPGRAM_API_KEY, environment=environment, **kwargs
    )
    _freeze_headers(client)
    return client


# --- private SDK internals (deepgram-sdk 7.17.0) ---------------------------------------------


def _freeze_headers(client: AsyncDeepgramClient) -> None:
    """The SDK rebuilds its request headers for every request, reading its own version from
    the package metadata each time (`importlib.metadata.version`: 2.5% of the event loop at
    100 calls). They never change for a client: compute them once. The SDK reads them
    through the wrapper's `get_headers`, which is what this replaces."""
    wrapper = getattr(client, "_client_wrapper", None)
    if wrapper is None:  # another SDK layout: keep its own behaviour
        return
    headers = dict(wrapper.get_headers())
    wrapper.get_headers = lambda: dict(headers)


def raw_socket(conn: Any) -> Any | None:
    """The websockets connection under an SDK socket client, or None on an SDK without it."""
    return getattr(conn, "_websocket", None)


async def listen_messages(conn: Any) -> AsyncIterator[dict[str, Any]]:
    """The listen socket's JSON messages, as dicts. The SDK's own iterator builds each one
    into a pydantic model by trying every member of its response union in turn; at 100 calls
    that was 4-5% of the service's CPU for the five fields read here, so its socket's text
    frames are parsed directly (orjson). Binary frames (none on listen) and anything that is
    not a JSON object are skipped, as the SDK skips what it cannot parse."""
    raw = raw_socket(conn)
    if raw is None:  # an SDK without that attribute: take its models, as the wire's dicts
        async for model in conn:
            if hasattr(model, "model_dump"):
                yield model.model_dump(by_alias=True)
        return
    async for frame in raw:
        if isinstance(frame, bytes):
            continue
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            log.warning("deepgram listen: a message that is not JSON was skipped")
            continue
        if isinstance(message, dict):
            yield message
