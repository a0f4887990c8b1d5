"""The running service's parts, built from settings when the app starts and closed when it
stops: database, Twilio gateway, providers, knowledge base, post-call work, the campaign
dialer and the live call manager. Nothing here exists at import time, so each test gets its
own app and database.

Every part is published on `app.state` under one name, for `api.deps` to hand to routes.

Must not import: main.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from adapters.deepgram_stt import DeepgramSTT, StreamPolicy
from adapters.deepgram_tts import DeepgramStreamingTTS, build_tts
from adapters.netguard import guarded_client
from adapters.ollama import OllamaLLM
from adapters.telephony import TwilioGateway
from api.admission import OUTBOUND_HOLD_S, CallAdmission
from api.stream_binding import TOKEN_PARAMETER, StreamGuard, StreamTokens
from campaigns.dialer import Dialer
from campaigns.service import CampaignEvents
from config import Settings
from knowledge.parsing import DocumentParser
from knowledge.service import DocumentIngest, KnowledgeRetriever, parse_limits, start_knowledge
from pipeline.contracts import PipelineDeps
from pipeline.metrics import PipelineMetrics
from pipeline.vad import SileroModel, shared_batcher
from postcall.hooks import compose_hooks
from postcall.service import PostCall
from store.calls import SqlCallStore
from store.db import Database
from tools.runner import AgentTools
from voice_pipeline import CallManager


def configure_logging(level: str) -> None:
    """Our loggers at `level`; HTTP client loggers at WARNING, because they log full URLs
    (webhook and tool URLs may carry tokens) at INFO."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ai_sdr").setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access", "twilio.http_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@asynccontextmanager
async def running_services(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """Build every part, publish it on `app.state`, and close all of it on the way out."""
    metrics: PipelineMetrics = app.state.metrics
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    database = Database(settings.DATABASE_URL)
    await database.migrate()
    twilio = TwilioGateway(
        settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, settings.TWILIO_API_BASE_URL
    )
    llm, tts = OllamaLLM(settings), build_tts(settings)
    post_call = PostCall(settings, database.sessionmaker, llm, twilio)
    campaign_events = CampaignEvents(post_call.outbox)
    # the campaign's outcome first: the call's webhooks then go out with the contact moved
    call_hook = compose_hooks(campaign_events.on_call_event, post_call.hook)
    app.state.post_call, app.state.call_hook = post_call, call_hook
    app.state.campaign_events = campaign_events
    store = SqlCallStore(
        database.sessionmaker,
        call_hook,
        default_model=settings.OLLAMA_MODEL,
        fallback_line=settings.LLM_FALLBACK_LINE,
        live_events=post_call.live_events,
        commit_window_s=settings.DB_COMMIT_WINDOW_MS / 1000,
    )
    await asyncio.to_thread(SileroModel.load)  # load once, off the loop, before calls
    app.state.knowledge = knowledge = await start_knowledge(settings)  # same for MiniLM
    ingest = DocumentIngest(
        database.sessionmaker, knowledge, DocumentParser(parse_limits(settings))
    )
    await ingest.recover()
    app.state.ingest = ingest
    tools_http = guarded_client(allow_private=settings.ALLOW_PRIVATE_URLS)
    app.state.db, app.state.twilio, app.state.llm = database, twilio, llm
    tokens = StreamTokens(settings.STREAM_TOKEN_SECRET, settings.STREAM_TOKEN_TTL_S)
    app.state.stream_tokens = tokens
    app.state.call_store = store
    app.state.calls = calls = CallManager(
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
            metrics=metrics,
            vad_batcher=shared_batcher,
            vad_threshold=settings.VAD_THRESHOLD,
            end_of_speech_ms=settings.DEEPGRAM_ENDPOINTING_MS,
            finalize_after_ms=settings.EARLY_FINALIZE_MS,
            early_answers=settings.EARLY_ANSWERS,
            retriever=KnowledgeRetriever(
                knowledge,
                budget_s=settings.KNOWLEDGE_RETRIEVAL_BUDGET_MS / 1000,
                on_timeout=metrics.retrieval_timeouts.inc,
            ),
            tools=AgentTools(database.sessionmaker, twilio, settings, tools_http),
            stream_guard=StreamGuard(database.sessionmaker, tokens),
        )
    )
    app.state.admission = admission = CallAdmission(
        settings.MAX_CONCURRENT_CALLS, live=calls.active.keys
    )
    metrics.call_slots.set_function(admission.in_use)
    app.state.dialer = dialer = Dialer(
        database.sessionmaker,
        twilio,
        settings,
        admission,
        campaign_events,
        call_hook,
        live=calls.active.keys,
        ring_hold_s=OUTBOUND_HOLD_S,
        stream_parameters=lambda call_id: {
            "call_id": call_id,
            TOKEN_PARAMETER: tokens.mint(call_id, outbound=True),
        },
    )
    metrics.dialer_statements.set_function(lambda: dialer.statements)
    metrics.dialer_dials.set_function(lambda: dialer.dials)
    if isinstance(tts, DeepgramStreamingTTS):
        metrics.tts_sockets.set_function(lambda: tts.open_sockets)
        metrics.tts_rest_fallbacks.set_function(lambda: tts.rest_fallbacks)
        metrics.tts_inline_connects.set_function(lambda: tts.inline_connects)
    await post_call.start()
    await dialer.start()
    # Start-up loaded ~600k long-lived objects (torch, MiniLM, Chroma, Silero): move them
    # out of the collector's reach, or every full collection stalls all live calls for
    # 100-400 ms (measured by the benchmark).
    gc.collect()
    gc.freeze()
    lag_watch = asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag")
    try:
        yield
    finally:
        lag_watch.cancel()
        with suppress(asyncio.CancelledError):
            await lag_watch
        await dialer.aclose()
        await post_call.aclose()
        await tools_http.aclose()
        await ingest.aclose()
        await asyncio.to_thread(knowledge.close)
        await twilio.aclose()
        await llm.aclose()
        await tts.aclose()
        await database.aclose()
