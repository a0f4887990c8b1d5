"""The console's session cookie as a credential for `/v1`: its format, issuing its value
and reading it back. `/v1` accepts it beside Bearer keys (`api/deps.py`), and the console
(`console/`) signs people in and out with it, so it lives here, below both: imports point
one way, console -> api.

The cookie holds no key: only a fingerprint of it (an HMAC under `CONSOLE_SECRET`), checked
against the keys configured now on every request, so removing a key from `API_KEYS` signs
its sessions out. The payload is signed (itsdangerous, with its issue time) but not
encrypted, so it carries nothing secret besides the CSRF token, which only the pages of the
session's own origin can read. Every unsafe request made with the cookie carries that token,
in the `X-CSRF-Token` header (the API) or the `csrf_token` form field (the console's forms).

Must not import: twilio, deepgram, ollama, chromadb, fastapi, sqlalchemy, pipeline,
voice_pipeline, console.
Of ours, imports only: config.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import HTTPConnection

from config import Settings

SESSION_COOKIE = "ai_sdr_console"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_COOKIE_CHARS = 1024


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    key_id: str
    """A fingerprint of the API key signed in with (never the key)."""
    csrf: str


def serializer(settings: Settings, purpose: str) -> URLSafeTimedSerializer:
    """Signs and reads the console's cookies; `purpose` keeps one kind from passing for
    another."""
    return URLSafeTimedSerializer(settings.CONSOLE_SECRET, salt=f"ai-sdr-console-{purpose}")


def key_id(settings: Settings, api_key: str) -> str:
    digest = hmac.new(settings.CONSOLE_SECRET.encode(), api_key.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def matching_key_id(settings: Settings, supplied: str) -> str | None:
    """The fingerprint of `supplied` if it is one of the configured API keys."""
    for key in settings.API_KEYS:
        if hmac.compare_digest(supplied.encode(), key.encode()):
            return key_id(settings, key)
    return None


def session_cookie_value(settings: Settings, kid: str) -> str:
    """A new session for the key fingerprinted `kid`, with a fresh CSRF token."""
    return serializer(settings, "session").dumps({"k": kid, "c": secrets.token_urlsafe(32)})


def read_session(connection: HTTPConnection, settings: Settings) -> ConsoleSession | None:
    """The request's console session, if its cookie is signed by our secret, not expired,
    and made with a key that is still configured."""
    raw = connection.cookies.get(SESSION_COOKIE)
    if not raw or len(raw) > MAX_COOKIE_CHARS:
        return None
    max_age = int(settings.CONSOLE_SESSION_HOURS * 3600)
    try:
        data = serializer(settings, "session").loads(raw, max_age=max_age)
    except BadSignature:  # also expired (SignatureExpired is a BadSignature)
        return None
    if not isinstance(data, dict):
        return None
    kid, csrf = data.get("k"), data.get("c")
    if not isinstance(kid, str) or not isinstance(csrf, str) or not csrf:
        return None
    if not any(hmac.compare_digest(kid, key_id(settings, k)) for k in settings.API_KEYS):
        return None
    return ConsoleSession(key_id=kid, csrf=csrf)


def csrf_ok(expected: str, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(expected.encode(), str(supplied).encode())
