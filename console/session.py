"""The console's sign-in: a signed, HttpOnly, SameSite=Strict session cookie and its CSRF
token.

Signing in with an API key sets the cookie. The cookie holds no key: only a fingerprint of
it (an HMAC under `CONSOLE_SECRET`), checked against the keys configured now on every
request, so removing a key from `API_KEYS` signs its sessions out. The payload is signed
(itsdangerous, with its issue time) but not encrypted, so it carries nothing secret
besides the CSRF token, which only the pages of the session's own origin can read.

CSRF: every unsafe request made with the cookie carries the session's token, in the
`csrf_token` form field or the `X-CSRF-Token` header. The sign-in form, before there is a
session, is covered by a short-lived signed pre-session cookie holding its own token
(double submit).

Must not import FastAPI routes, SQLAlchemy, the pipeline or other project modules except
`config`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import HTTPConnection
from starlette.responses import Response

from config import Settings

SESSION_COOKIE = "ai_sdr_console"
SIGN_IN_COOKIE = "ai_sdr_console_sign_in"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SIGN_IN_TTL_S = 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    key_id: str
    """A fingerprint of the API key signed in with (never the key)."""
    csrf: str


def _serializer(settings: Settings, purpose: str) -> URLSafeTimedSerializer:
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


def read_session(connection: HTTPConnection, settings: Settings) -> ConsoleSession | None:
    """The request's console session, if its cookie is signed by our secret, not expired,
    and made with a key that is still configured."""
    raw = connection.cookies.get(SESSION_COOKIE)
    if not raw or len(raw) > 1024:
        return None
    max_age = int(settings.CONSOLE_SESSION_HOURS * 3600)
    try:
        data = _serializer(settings, "session").loads(raw, max_age=max_age)
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


def _secure(connection: HTTPConnection) -> bool:
    """Cookies are `Secure` when the page came over https (uvicorn's --proxy-headers makes
    the scheme right behind a TLS proxy)."""
    return connection.url.scheme in ("https", "wss")


def start_session(
    response: Response, connection: HTTPConnection, settings: Settings, kid: str
) -> None:
    token = _serializer(settings, "session").dumps({"k": kid, "c": secrets.token_urlsafe(32)})
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.CONSOLE_SESSION_HOURS * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(connection),
    )
    response.delete_cookie(SIGN_IN_COOKIE, path="/console")


def end_session(response: Response, connection: HTTPConnection) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(connection)
    )


# --- the sign-in form's CSRF (no session yet) -------------------------------------------


def sign_in_token(connection: HTTPConnection, settings: Settings) -> tuple[str, str | None]:
    """The sign-in form's token, and a new pre-session cookie value when there is none
    valid yet (to set on the response)."""
    raw = connection.cookies.get(SIGN_IN_COOKIE)
    if raw and len(raw) <= 512:
        try:
            token = _serializer(settings, "sign-in").loads(raw, max_age=SIGN_IN_TTL_S)
        except BadSignature:
            token = None
        if isinstance(token, str) and token:
            return token, None
    token = secrets.token_urlsafe(32)
    return token, _serializer(settings, "sign-in").dumps(token)


def set_sign_in_cookie(response: Response, connection: HTTPConnection, value: str) -> None:
    response.set_cookie(
        SIGN_IN_COOKIE,
        value,
        max_age=SIGN_IN_TTL_S,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_secure(connection),
    )


def sign_in_csrf_ok(connection: HTTPConnection, settings: Settings, supplied: str | None) -> bool:
    raw = connection.cookies.get(SIGN_IN_COOKIE)
    if not raw or len(raw) > 512:
        return False
    try:
        token = _serializer(settings, "sign-in").loads(raw, max_age=SIGN_IN_TTL_S)
    except BadSignature:
        return False
    return isinstance(token, str) and csrf_ok(token, supplied)
