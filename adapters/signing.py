"""Signing of the requests we send to customers' URLs (webhooks and custom HTTP tools), so a
receiver can check they came from us:

    X-Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + signed bytes)>

The signed bytes are the exact body sent (or the query string of a request without one).

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
Of ours, imports only: nothing.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Webhook-Signature"


def signature(secret: str, signed: bytes, timestamp: int) -> str:
    """The `X-Webhook-Signature` value for `signed` sent at `timestamp` (unix seconds)."""
    message = f"{timestamp}.".encode() + signed
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"
