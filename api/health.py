"""`/health`: the parts and the live calls (`/metrics` is in `api.operator`).

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from api.deps import AdmissionDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(
    request: Request, settings: SettingsDep, admission: AdmissionDep
) -> dict[str, Any]:
    state = request.app.state
    database_ok, ollama_ok, chroma_ok = await asyncio.gather(
        state.db.ping(), state.llm.healthy(), state.knowledge.healthy()
    )
    checks = {
        "database": "ok" if database_ok else "down",
        "ollama": "ok" if ollama_ok else "unreachable",
        "twilio": "configured" if state.twilio.configured else "not_configured",
        "deepgram": "configured" if settings.DEEPGRAM_API_KEY else "not_configured",
        "chroma": "ok" if chroma_ok else "down",
    }
    calls = {
        "live": len(state.calls.active),
        "reserved": admission.reserved(),
        "limit": admission.limit or None,
    }
    return {"status": "ok" if database_ok else "degraded", "checks": checks, "calls": calls}
