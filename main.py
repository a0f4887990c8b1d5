"""Application factory: composition only. The parts are built from settings when the app
starts (`runtime.services`), so nothing exists at import time and each test gets its own
app and database.

Run: `uvicorn main:create_app --factory` (see run.sh for the production flags).

Must not import: sqlalchemy, twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import (
    agents,
    analytics,
    bookings,
    calls,
    campaign_results,
    campaigns,
    dnc,
    health,
    knowledge,
    operator,
    twilio,
    twilio_amd,
    webhooks,
)
from api.errors import BodySizeLimit, install_error_handlers
from config import Settings
from console.routes import install as install_console
from pipeline.metrics import PipelineMetrics
from runtime.services import configure_logging, running_services


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.LOG_LEVEL)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_services(app, settings):
            yield

    app = FastAPI(
        title="AI SDR", version="0.1.0", lifespan=lifespan, **operator.docs_urls(settings)
    )
    app.state.settings = settings
    app.state.metrics = PipelineMetrics()
    install_error_handlers(app)
    uploads = {knowledge.UPLOAD_PATH: knowledge.upload_body_limit(settings.MAX_DOCUMENT_BYTES)}
    uploads |= {path: campaigns.UPLOAD_BYTES for path in campaigns.UPLOAD_PATHS}
    app.add_middleware(BodySizeLimit, max_bytes=settings.MAX_REQUEST_BYTES, routes=uploads)
    # webhooks first: /v1/calls/export must not be taken for /v1/calls/{call_id}
    routers = [webhooks, agents, calls, analytics, campaigns, campaign_results, dnc]
    for module in (*routers, knowledge, bookings, twilio, twilio_amd, health):
        app.include_router(module.router)
    app.include_router(operator.router_for(settings))
    operator.warn_if_open(settings)
    install_console(app)
    return app
