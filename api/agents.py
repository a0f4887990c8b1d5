"""`/v1/agents`: create, list, read, update and delete the agents a CRM configures.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from adapters.netguard import check_public_url
from api.deps import (
    AgentDep,
    PageDep,
    SessionDep,
    SettingsDep,
    page_of,
    paginate,
    require_api_key,
)
from api.errors import APIError
from config import Settings
from models import Agent
from schemas import AGENT_DEFAULTS, AgentCreate, AgentRead, AgentUpdate, HttpTool, Page

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _check_urls(body: AgentCreate | AgentUpdate, settings: Settings) -> None:
    """Every outbound URL of the agent (webhook receiver, HTTP tools) passes the SSRF guard
    at create and update; delivery checks the resolved addresses again."""
    urls = [("webhook_url", body.webhook_url)]
    urls += [
        (f"tools.{index}.url", tool.url)
        for index, tool in enumerate(body.tools or [])
        if isinstance(tool, HttpTool)
    ]
    for field, url in urls:
        if url is None:
            continue
        try:
            check_public_url(str(url), settings.ALLOW_PRIVATE_URLS)
        except ValueError as exc:
            raise APIError(422, "validation_error", f"{field}: {exc}", field) from None


def _agent_values(body: AgentCreate | AgentUpdate, *, partial: bool) -> dict[str, Any]:
    values = body.model_dump(mode="json", exclude_unset=partial, exclude_none=not partial)
    if not partial:
        values = {**AGENT_DEFAULTS, **values}
    return values


async def _commit_agent(session: AsyncSession, agent: Agent) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise APIError(
            409, "conflict", "phone_number is already assigned to another agent", "phone_number"
        ) from None
    await session.refresh(agent)


@router.post("/agents", status_code=201, response_model=AgentRead)
async def create_agent(body: AgentCreate, session: SessionDep, settings: SettingsDep) -> Agent:
    _check_urls(body, settings)
    agent = Agent(**_agent_values(body, partial=False))
    session.add(agent)
    await _commit_agent(session, agent)
    return agent


@router.get("/agents", response_model=Page[AgentRead])
async def list_agents(session: SessionDep, page: PageDep) -> dict[str, Any]:
    items, total = await paginate(session, select(Agent).order_by(Agent.created_at, Agent.id), page)
    return page_of(items, total, page)


@router.get("/agents/{agent_id}", response_model=AgentRead)
async def read_agent(agent: AgentDep) -> Agent:
    return agent


@router.patch("/agents/{agent_id}", response_model=AgentRead)
async def update_agent(
    body: AgentUpdate, agent: AgentDep, session: SessionDep, settings: SettingsDep
) -> Agent:
    _check_urls(body, settings)
    for key, value in _agent_values(body, partial=True).items():
        if value is None and key in AGENT_DEFAULTS:
            raise APIError(422, "validation_error", f"{key}: may not be null", key)
        if value is None and key == "name":
            raise APIError(422, "validation_error", "name: may not be null", "name")
        setattr(agent, key, value)
    await _commit_agent(session, agent)
    return agent


@router.delete("/agents/{agent_id}", status_code=204)
async def delete_agent(agent: AgentDep, session: SessionDep, request: Request) -> Response:
    await session.delete(agent)
    await session.commit()
    knowledge = getattr(request.app.state, "knowledge", None)
    if knowledge is not None:
        await knowledge.delete_agent(agent.id)
    return Response(status_code=204)
