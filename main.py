"""Application factory: composition only. Builds settings-dependent parts (database, Twilio
gateway, providers, knowledge base) in the lifespan, so nothing exists at import time and each
test gets its own app and database.

Run: `uvicorn main:create_app --factory`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response

import routes_bookings
import routes_knowledge
import routes_twilio
import routes_v1
import routes_webhooks
from admission import CallAdmission
from call_store import SqlCallStore
from config import Settings
from db import Database
from errors import BodySizeLimit, install_error_handlers
from knowledge_service import KnowledgeRetriever, start_knowledge
from llm_ollama import OllamaLLM
from metrics import PipelineMetrics
from netguard import PublicOnlyTransport
from post_call import PostCall
from stt_deepgram import DeepgramSTT, StreamPolicy
from telephony import TwilioGateway
from tools import AgentTools
from tts_deepgram import DeepgramStreamingTTS, build_tts
from vad import SileroModel, shared_batcher
from voice_pipeline import CallManager, PipelineDeps

log = logging.getLogger("ai_sdr")


def configure_logging(level: str) -> None:
    """Our loggers at `level`; HTTP client loggers at WARNING, because they log full URLs
    (webhook and tool URLs may carry tokens) at INFO."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ai_sdr").setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access", "twilio.http_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.LOG_LEVEL)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        database = Database(settings.DATABASE_URL)
        await database.migrate()
        twilio = TwilioGateway(
            settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, settings.TWILIO_API_BASE_URL
        )
        llm, tts = OllamaLLM(settings), build_tts(settings)
        post_call = PostCall(settings, database.sessionmaker, llm, twilio)
        app.state.post_call, app.state.call_hook = post_call, post_call.hook
        store = SqlCallStore(
            database.sessionmaker,
            post_call.hook,
            default_model=settings.OLLAMA_MODEL,
            fallback_line=settings.LLM_FALLBACK_LINE,
            live_events=post_call.live_events,
            commit_window_s=settings.DB_COMMIT_WINDOW_MS / 1000,
        )
        await asyncio.to_thread(SileroModel.load)  # load once, off the loop, before calls
        app.state.knowledge = knowledge = await start_knowledge(settings)  # same for MiniLM
        tools_http = httpx.AsyncClient(
            transport=PublicOnlyTransport(allow_private=settings.ALLOW_PRIVATE_URLS)
        )
        app.state.db, app.state.twilio, app.state.llm = database, twilio, llm
        app.state.call_store = store
        app.state.calls = CallManager(
            PipelineDeps(
                # 200 ms per send (Deepgram asks for 20-250 ms): a tenth of the frames. The
                # turn's final does not wait for it (Finalize flushes at the pause), only
                # interim results do, by up to 180 ms. While the caller is quiet (from the
                # end of a turn to the next speech onset, which sends at once) 500 ms:
                # nothing there waits to be transcribed, and each send is a syscall
                stt=DeepgramSTT(settings, policy=StreamPolicy(batch_ms=200, quiet_batch_ms=500)),
                llm=llm,
                tts=tts,
                store=store,
                control=twilio,
                metrics=app.state.metrics,
                vad_batcher=shared_batcher,
                vad_threshold=settings.VAD_THRESHOLD,
                end_of_speech_ms=settings.DEEPGRAM_ENDPOINTING_MS,
                finalize_after_ms=settings.EARLY_FINALIZE_MS,
                early_answers=settings.EARLY_ANSWERS,
                retriever=KnowledgeRetriever(knowledge),
                tools=AgentTools(database.sessionmaker, twilio, settings, tools_http),
            )
        )
        calls: CallManager = app.state.calls
        app.state.admission = admission = CallAdmission(
            settings.MAX_CONCURRENT_CALLS, live=calls.active.keys
        )
        app.state.metrics.call_slots.set_function(admission.in_use)
        if isinstance(tts, DeepgramStreamingTTS):
            app.state.metrics.tts_sockets.set_function(lambda: tts.open_sockets)
            app.state.metrics.tts_rest_fallbacks.set_function(lambda: tts.rest_fallbacks)
            app.state.metrics.tts_inline_connects.set_function(lambda: tts.inline_connects)
        await post_call.start()
        # Start-up loaded ~600k long-lived objects (torch, MiniLM, Chroma, Silero): move them
        # out of the collector's reach, or every full collection stalls all live calls for
        # 100-400 ms (measured by the benchmark).
        gc.collect()
        gc.freeze()
        lag_watch = asyncio.create_task(app.state.metrics.watch_loop_lag(), name="loop-lag")
        try:
            yield
        finally:
            lag_watch.cancel()
            with suppress(asyncio.CancelledError):
                await lag_watch
            await post_call.aclose()
            await tools_http.aclose()
            await asyncio.to_thread(knowledge.close)
            await twilio.aclose()
            await llm.aclose()
            await tts.aclose()
            await database.aclose()

    app = FastAPI(title="AI SDR", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = PipelineMetrics()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.MAX_REQUEST_BYTES)
    # before routes_v1: /v1/calls/export must not be taken for /v1/calls/{call_id}
    app.include_router(routes_webhooks.router)
    app.include_router(routes_v1.router)
    app.include_router(routes_knowledge.router)
    app.include_router(routes_bookings.router)
    app.include_router(routes_twilio.router)

    @app.get("/health", tags=["health"])
    async def health(request: Request) -> dict[str, Any]:
        return await _health(request.app, settings)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _health(app: FastAPI, settings: Settings) -> dict[str, Any]:
    database_ok, ollama_ok, chroma_ok = await asyncio.gather(
        app.state.db.ping(), app.state.llm.healthy(), app.state.knowledge.healthy()
    )
    checks = {
        "database": "ok" if database_ok else "down",
        "ollama": "ok" if ollama_ok else "unreachable",
        "twilio": "configured" if app.state.twilio.configured else "not_configured",
        "deepgram": "configured" if settings.DEEPGRAM_API_KEY else "not_configured",
        "chroma": "ok" if chroma_ok else "down",
    }
    admission: CallAdmission = app.state.admission
    calls = {
        "live": len(app.state.calls.active),
        "reserved": admission.reserved(),
        "limit": admission.limit or None,
    }
    return {"status": "ok" if database_ok else "degraded", "checks": checks, "calls": calls}
