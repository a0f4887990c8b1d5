"""Operator endpoints: `/metrics`, and the API documentation (`/openapi.json`, `/docs`,
`/redoc`). With OPERATOR_ENDPOINTS=api_key they take the same Bearer API key as `/v1`;
with `open` (the default) anyone who reaches the port reads them, and in production the
service warns about that at startup.

Must not import the pipeline's internals, store/ or SQLAlchemy.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from api.deps import MetricsDep, require_api_key
from config import Settings

log = logging.getLogger("ai_sdr.operator")


def docs_urls(settings: Settings) -> dict[str, Any]:
    """FastAPI's own documentation routes: on when open, off (served here) when guarded."""
    if settings.OPERATOR_ENDPOINTS == "open":
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


def router_for(settings: Settings) -> APIRouter:
    guarded = settings.OPERATOR_ENDPOINTS == "api_key"
    router = APIRouter(
        tags=["operator"], dependencies=[Depends(require_api_key)] if guarded else []
    )
    router.add_api_route("/metrics", metrics, response_class=Response, methods=["GET"])
    if guarded:
        router.add_api_route("/openapi.json", openapi, include_in_schema=False)
        router.add_api_route("/docs", docs, include_in_schema=False)
        router.add_api_route("/redoc", redoc, include_in_schema=False)
    return router


def warn_if_open(settings: Settings) -> None:
    if settings.ENVIRONMENT == "production" and settings.OPERATOR_ENDPOINTS == "open":
        log.warning(
            "/metrics, /docs, /redoc and /openapi.json are open to anyone who reaches this "
            "port: set OPERATOR_ENDPOINTS=api_key, or keep the port off the public network"
        )


async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> JSONResponse:
    app: FastAPI = request.app
    return JSONResponse(app.openapi())


async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="AI SDR")


async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="AI SDR")
