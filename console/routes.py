"""The console at `/console`, put together: each page module's routes, the static assets
and the redirect to the sign-in page. Pages are rendered on the server (Jinja2); the page
scripts (`static/console.js`) call the `/v1` API with the session cookie and the CSRF
header.

Every route but the sign-in page and the static assets needs a session: a page without one
redirects to the sign-in page, the live feed answers 401 and the browser call's socket
closes. Every response carries a Content-Security-Policy that allows no inline script or
style.

Must not import: twilio, deepgram, ollama, chromadb, sqlalchemy, adapters, pipeline,
voice_pipeline, runtime.
Of ours, imports only: console.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from console import agents, analytics, calls, sign_in, talk, webhooks
from console.web import HERE, SIGN_IN_URL, SignInRequired, redirect

ROUTERS: tuple[APIRouter, ...] = (
    sign_in.router,
    agents.router,
    talk.router,
    calls.router,
    analytics.router,
    webhooks.router,
)


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    return redirect(SIGN_IN_URL)


def install(app: FastAPI) -> None:
    """The console's routes, its static assets and the sign-in redirect, on `app`."""
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(SignInRequired, _sign_in_required)
