"""The console's agent pages: the list, and the create/edit form (every field, with help
text; the page script saves through `/v1/agents` and shows the API's errors inline) with
the agent's knowledge documents and the question box.

Must not import: twilio, deepgram, ollama, chromadb, adapters, pipeline, voice_pipeline,
runtime.
Of ours, imports only: api, config, console, models, schemas.
"""

from __future__ import annotations

import json
from typing import Any, get_args

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from api.deps import SessionDep
from console.web import Signed, not_found, page
from models import Agent, Document
from schemas import AGENT_DEFAULTS, WebhookEventName

router = APIRouter(prefix="/console", include_in_schema=False)

WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEventName)

AGENT_FIELDS: list[dict[str, Any]] = [
    {"name": "name", "kind": "text", "help": "Shown in the console and in reports."},
    {"name": "system_prompt", "kind": "textarea", "help": "Instructions; {{variables}} fill."},
    {"name": "first_message", "kind": "textarea", "help": "The greeting; {{variables}} fill."},
    {
        "name": "first_message_mode",
        "kind": "select",
        "options": ["assistant_speaks_first", "wait_for_caller"],
        "help": "Who speaks first.",
    },
    {"name": "voice", "kind": "text", "help": "Deepgram Aura voice, e.g. aura-2-thalia-en."},
    {"name": "language", "kind": "text", "help": "BCP-47 language, e.g. en-US, or multi."},
    {"name": "llm_model", "kind": "text", "help": "Ollama model; empty: the service default."},
    {"name": "temperature", "kind": "number", "step": "0.1", "help": "0 to 2."},
    {"name": "max_call_seconds", "kind": "number", "help": "10 to 14400."},
    {"name": "silence_timeout_seconds", "kind": "number", "step": "0.5", "help": "2 to 300."},
    {"name": "min_interrupt_speech_ms", "kind": "number", "help": "Speech that pauses the agent."},
    {"name": "min_interrupt_words", "kind": "number", "help": "Words that make it a barge-in."},
    {"name": "end_call_phrases", "kind": "lines", "help": "One per line: the agent hangs up."},
    {"name": "backchannel_phrases", "kind": "lines", "help": "One per line: never interrupt."},
    {"name": "fallback_line", "kind": "text", "help": "Said when the LLM fails."},
    {"name": "phone_number", "kind": "text", "help": "E.164 number that reaches this agent."},
    {"name": "transfer_number", "kind": "text", "help": "E.164 number for transfers."},
    {"name": "webhook_url", "kind": "text", "help": "https URL for call reports."},
    {
        "name": "webhook_events",
        "kind": "checks",
        "options": WEBHOOK_EVENTS,
        "help": "Events to send (started, ended, analyzed are always sent).",
    },
    {"name": "recording_enabled", "kind": "bool", "help": "Record calls through Twilio."},
    {"name": "tools", "kind": "json", "help": "JSON list of tools."},
    {"name": "variables", "kind": "json", "help": "JSON object of template variables."},
    {"name": "calendar", "kind": "json", "help": "JSON object: timezone, working hours..."},
    {"name": "analysis_schema", "kind": "json", "help": "JSON schema of extracted data."},
]


def _field_values(agent: Agent | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in AGENT_FIELDS:
        name = spec["name"]
        value = getattr(agent, name) if agent is not None else AGENT_DEFAULTS.get(name)
        if spec["kind"] == "lines":
            value = "\n".join(value or [])
        elif spec["kind"] == "json":
            value = json.dumps(value if value is not None else {}, indent=2)
        values[name] = value if value is not None else ""
    return values


@router.get("/agents")
async def agents_page(request: Request, signed: Signed, session: SessionDep) -> Response:
    agents = list(await session.scalars(select(Agent).order_by(Agent.created_at, Agent.id)))
    return page(request, signed, "agents.html", agents=agents)


@router.get("/agents/new")
async def new_agent_page(request: Request, signed: Signed) -> Response:
    return page(
        request,
        signed,
        "agent_edit.html",
        agent=None,
        fields=AGENT_FIELDS,
        values=_field_values(None),
    )


@router.get("/agents/{agent_id}")
async def agent_page(
    agent_id: str, request: Request, signed: Signed, session: SessionDep
) -> Response:
    agent = await session.get(Agent, agent_id)
    if agent is None:
        return not_found(request, signed, "agent", agent_id)
    documents = list(
        await session.scalars(
            select(Document).where(Document.agent_id == agent.id).order_by(Document.created_at)
        )
    )
    return page(
        request,
        signed,
        "agent_edit.html",
        agent=agent,
        fields=AGENT_FIELDS,
        values=_field_values(agent),
        documents=documents,
    )
