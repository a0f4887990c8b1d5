"""What every console page shares: the templates, the security headers (a CSP with no
inline script or style), the session requirement (`Signed`: a page without a session
redirects to the sign-in page), rendering, redirects, the not-found page and form-value
parsing.

Must not import: twilio, deepgram, ollama, chromadb, sqlalchemy, adapters, pipeline,
voice_pipeline, runtime.
Of ours, imports only: api, config.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.console_session import ConsoleSession, read_session
from api.deps import SettingsDep
from api.errors import APIError

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
PAGE_SIZE = 50
SIGN_IN_URL = "/console/sign-in"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; worker-src 'self'; font-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class SignInRequired(Exception):
    """A page was asked for without a session: redirect to the sign-in page."""


def console_session(request: Request, settings: SettingsDep) -> ConsoleSession:
    session = read_session(request, settings)
    if session is None:
        raise SignInRequired
    return session


Signed = Annotated[ConsoleSession, Depends(console_session)]


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def page(request: Request, signed: ConsoleSession, name: str, **context: Any) -> Response:
    return render(request, name, {"csrf": signed.csrf, "section": name.split("_")[0], **context})


def redirect(url: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response


def not_found(request: Request, signed: ConsoleSession, kind: str, ident: str) -> Response:
    return render(
        request,
        "not_found.html",
        {"csrf": signed.csrf, "section": "", "kind": kind, "ident": ident},
        status_code=404,
    )


def parse_day(value: str | None, field: str) -> date | None:
    """A filter's `YYYY-MM-DD`, or None when empty; a 422 naming the field otherwise."""
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise APIError(
            422, "validation_error", f"{field}: not a date (YYYY-MM-DD)", field
        ) from None
