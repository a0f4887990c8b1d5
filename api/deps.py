"""The API's shared dependencies, as `Annotated` aliases: the database session, settings,
the app's services, the API key check, pagination and one `get_or_404`.

Routers take what they need from here and never read `app.state` themselves.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from adapters.telephony import TwilioGateway
from api.admission import CallAdmission
from api.errors import APIError, not_found
from api.stream_binding import StreamTokens
from config import Settings
from models import Agent
from pipeline.metrics import PipelineMetrics
from store.db import Database

_bearer = HTTPBearer(auto_error=False)
Row = TypeVar("Row")


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    database: Database = request.app.state.db
    async with database.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_twilio(request: Request) -> TwilioGateway:
    twilio: TwilioGateway = request.app.state.twilio
    return twilio


TwilioDep = Annotated[TwilioGateway, Depends(get_twilio)]


def get_admission(request: Request) -> CallAdmission:
    admission: CallAdmission = request.app.state.admission
    return admission


AdmissionDep = Annotated[CallAdmission, Depends(get_admission)]


def get_stream_tokens(request: Request) -> StreamTokens:
    tokens: StreamTokens = request.app.state.stream_tokens
    return tokens


StreamTokensDep = Annotated[StreamTokens, Depends(get_stream_tokens)]


def get_metrics(request: Request) -> PipelineMetrics:
    metrics: PipelineMetrics = request.app.state.metrics
    return metrics


MetricsDep = Annotated[PipelineMetrics, Depends(get_metrics)]


def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "unauthorized", "missing Bearer API key in the Authorization header")
    supplied = credentials.credentials.encode()
    if not any(hmac.compare_digest(supplied, key.encode()) for key in settings.API_KEYS):
        raise APIError(401, "unauthorized", "invalid API key")


async def get_or_404(session: AsyncSession, model: type[Row], ident: str, kind: str) -> Row:
    """The row of `model` with primary key `ident`, or a 404 naming `kind`."""
    row = await session.get(model, ident)
    if row is None:
        raise not_found(kind, ident)
    return row


async def get_agent(agent_id: str, session: SessionDep) -> Agent:
    return await get_or_404(session, Agent, agent_id, "agent")


AgentDep = Annotated[Agent, Depends(get_agent)]


class Pagination:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> None:
        self.limit, self.offset = limit, offset


PageDep = Annotated[Pagination, Depends()]


async def paginate(
    session: AsyncSession, query: Select[Any], page: Pagination
) -> tuple[list[Any], int]:
    total = await session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = await session.scalars(query.limit(page.limit).offset(page.offset))
    return list(rows), int(total or 0)


def page_of(items: list[Any], total: int, page: Pagination) -> dict[str, Any]:
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}
