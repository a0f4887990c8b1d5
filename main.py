"""Application factory: composition only. Builds settings-dependent parts (database, Twilio
gateway, providers, knowledge base) in the lifespan, so nothing exists at import time and each
test gets its own app and database.

Run: `uvicorn main:create_app --factory`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

import routes_twilio
import routes_v1
from call_store import SqlCallStore
from config import Settings
from db import Database
from errors import install_error_handlers
from telephony import TwilioGateway
from voice_pipeline import CallManager

log = logging.getLogger("ai_sdr")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        database = Database(settings.DATABASE_URL)
        await database.migrate()
        twilio = TwilioGateway(
            settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, settings.TWILIO_API_BASE_URL
        )
        app.state.db = database
        app.state.twilio = twilio
        app.state.calls = CallManager(SqlCallStore(database.sessionmaker))
        try:
            yield
        finally:
            await twilio.aclose()
            await database.aclose()

    app = FastAPI(title="AI SDR", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(routes_v1.router)
    app.include_router(routes_twilio.router)

    @app.get("/health", tags=["health"])
    async def health(request: Request) -> dict[str, Any]:
        return await _health(request.app, settings)

    return app


async def _health(app: FastAPI, settings: Settings) -> dict[str, Any]:
    database_ok = await app.state.db.ping()
    checks = {
        "database": "ok" if database_ok else "down",
        "twilio": "configured" if app.state.twilio.configured else "not_configured",
        "deepgram": "configured" if settings.DEEPGRAM_API_KEY else "not_configured",
    }
    return {"status": "ok" if database_ok else "degraded", "checks": checks}
