"""The console's sign-in and sign-out pages: an API key in a form (with its own CSRF
token) becomes the session cookie; signing out drops it.

Must not import: twilio, deepgram, ollama, chromadb, sqlalchemy, adapters, pipeline,
voice_pipeline, runtime.
Of ours, imports only: api, config, console.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from api.console_session import csrf_ok, matching_key_id, read_session
from api.deps import SettingsDep
from api.errors import APIError
from config import Settings
from console.session import (
    CSRF_FIELD,
    end_session,
    set_sign_in_cookie,
    sign_in_csrf_ok,
    sign_in_token,
    start_session,
)
from console.web import SIGN_IN_URL, Signed, redirect, render

router = APIRouter(prefix="/console", include_in_schema=False)
HOME_URL = "/console/calls"


@router.get("")
async def console_home(request: Request, settings: SettingsDep) -> Response:
    return redirect(SIGN_IN_URL if read_session(request, settings) is None else HOME_URL)


@router.get("/sign-in")
async def sign_in_page(request: Request, settings: SettingsDep) -> Response:
    return _sign_in_form(request, settings)


def _sign_in_form(
    request: Request, settings: Settings, error: str | None = None, status_code: int = 200
) -> Response:
    token, cookie = sign_in_token(request, settings)
    response = render(
        request,
        "sign_in.html",
        {"sign_in_csrf": token, "error": error, "section": "sign-in"},
        status_code,
    )
    if cookie is not None:
        set_sign_in_cookie(response, request, cookie)
    return response


@router.post("/sign-in")
async def sign_in(
    request: Request,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    if not sign_in_csrf_ok(request, settings, csrf_token):
        return _sign_in_form(request, settings, "The form expired: please sign in again.", 403)
    kid = matching_key_id(settings, api_key.strip())
    if kid is None:
        return _sign_in_form(request, settings, "That API key is not valid.", 401)
    response = redirect(HOME_URL)
    start_session(response, request, settings, kid)
    return response


@router.post("/sign-out")
async def sign_out(
    request: Request, signed: Signed, csrf_token: Annotated[str, Form(max_length=200)] = ""
) -> Response:
    if not csrf_ok(signed.csrf, csrf_token):
        raise APIError(403, "csrf_failed", f"missing or invalid {CSRF_FIELD}")
    response = redirect(SIGN_IN_URL)
    end_session(response, request)
    return response
