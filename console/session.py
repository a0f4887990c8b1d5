"""Signing in to the console and out: the session cookie on the response (its value and
how it is read are `api/console_session.py`'s), and the sign-in form's own CSRF.

The session cookie is HttpOnly, SameSite=Strict, and Secure when the page came over https.
The sign-in form, before there is a session, is covered by a short-lived signed
pre-session cookie holding its own token (double submit).

Must not import: twilio, deepgram, ollama, chromadb, sqlalchemy, adapters, pipeline,
voice_pipeline, runtime.
Of ours, imports only: api, config.
"""

from __future__ import annotations

import secrets

from itsdangerous import BadSignature
from starlette.requests import HTTPConnection
from starlette.responses import Response

from api.console_session import SESSION_COOKIE, csrf_ok, serializer, session_cookie_value
from config import Settings

SIGN_IN_COOKIE = "ai_sdr_console_sign_in"
CSRF_FIELD = "csrf_token"
SIGN_IN_TTL_S = 3600
MAX_SIGN_IN_COOKIE_CHARS = 512


def _secure(connection: HTTPConnection) -> bool:
    """Cookies are `Secure` when the page came over https (uvicorn's --proxy-headers makes
    the scheme right behind a TLS proxy)."""
    return connection.url.scheme in ("https", "wss")


def start_session(
    response: Response, connection: HTTPConnection, settings: Settings, kid: str
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie_value(settings, kid),
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


def _sign_in_cookie_token(connection: HTTPConnection, settings: Settings) -> str | None:
    raw = connection.cookies.get(SIGN_IN_COOKIE)
    if not raw or len(raw) > MAX_SIGN_IN_COOKIE_CHARS:
        return None
    try:
        token = serializer(settings, "sign-in").loads(raw, max_age=SIGN_IN_TTL_S)
    except BadSignature:
        return None
    return token if isinstance(token, str) and token else None


def sign_in_token(connection: HTTPConnection, settings: Settings) -> tuple[str, str | None]:
    """The sign-in form's token, and a new pre-session cookie value when there is none
    valid yet (to set on the response)."""
    token = _sign_in_cookie_token(connection, settings)
    if token is not None:
        return token, None
    token = secrets.token_urlsafe(32)
    return token, serializer(settings, "sign-in").dumps(token)


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
    token = _sign_in_cookie_token(connection, settings)
    return token is not None and csrf_ok(token, supplied)
