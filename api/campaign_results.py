"""`GET /v1/campaigns/{id}/results?format=csv`: one row per contact, streamed in pages of
500 contacts, with its variables, metadata, final outcome, attempt count and the analysis
columns of its best call. Free text is neutralised for spreadsheets.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.campaigns import CampaignDep
from api.deps import require_api_key
from api.webhooks import safe_cell
from models import Call, CampaignAttempt, CampaignContact

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["campaigns"])

RESULT_COLUMNS = [
    "contact_id",
    "phone",
    "timezone",
    "state",
    "final_outcome",
    "attempts",
    "best_call_id",
    "call_duration_seconds",
    "lead_score",
    "summary",
    "sentiment",
    "meeting_booked",
]
_RANK = {"answered": 0, "opted_out": 1, "voicemail": 2}


@router.get("/campaigns/{campaign_id}/results")
async def campaign_results(
    campaign: CampaignDep,
    request: Request,
    format: Literal["csv"] = "csv",
) -> StreamingResponse:
    """One row per contact, streamed: its variables and metadata, final outcome, attempt
    count and the analysis columns of its best call (answered before voicemail...)."""
    sessionmaker = request.app.state.db.sessionmaker
    filename = f"campaign-{campaign.id}-results.csv"
    return StreamingResponse(
        _result_rows(sessionmaker, campaign.id),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def _result_rows(sessionmaker: Any, campaign_id: str) -> AsyncIterator[str]:
    async with sessionmaker() as session:
        variable_names: set[str] = set()
        metadata_names: set[str] = set()
        for variables, metadata in await session.execute(
            select(CampaignContact.variables, CampaignContact.contact_metadata).where(
                CampaignContact.campaign_id == campaign_id
            )
        ):
            variable_names.update(variables or {})
            metadata_names.update(metadata or {})
        var_cols, meta_cols = sorted(variable_names), sorted(metadata_names)
        header = (
            RESULT_COLUMNS + [f"var.{n}" for n in var_cols] + [f"metadata.{n}" for n in meta_cols]
        )
        yield _csv_line(header)
        offset = 0
        while True:
            contacts = list(
                await session.scalars(
                    select(CampaignContact)
                    .where(CampaignContact.campaign_id == campaign_id)
                    .order_by(CampaignContact.line, CampaignContact.id)
                    .limit(500)
                    .offset(offset)
                )
            )
            if not contacts:
                return
            offset += len(contacts)
            calls = await _best_calls(session, [c.id for c in contacts])
            chunk = io.StringIO()
            writer = csv.writer(chunk)
            for contact in contacts:
                writer.writerow(_result_row(contact, calls.get(contact.id), var_cols, meta_cols))
            yield chunk.getvalue()


async def _best_calls(session: AsyncSession, contact_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    rows = await session.execute(
        select(CampaignAttempt.contact_id, CampaignAttempt.outcome, Call)
        .join(Call, Call.id == CampaignAttempt.call_id)
        .where(CampaignAttempt.contact_id.in_(contact_ids))
    )
    best: dict[str, tuple[Any, ...]] = {}
    for contact_id, outcome, call in rows:
        rank = _RANK.get(outcome or "", 9)
        if contact_id not in best or rank < best[contact_id][0]:
            best[contact_id] = (rank, call)
    return best


def _result_row(
    contact: CampaignContact,
    best: tuple[Any, ...] | None,
    var_cols: list[str],
    meta_cols: list[str],
) -> list[Any]:
    call: Call | None = best[1] if best else None
    analysis = (call.analysis or {}) if call is not None else {}
    return [
        contact.id,
        contact.phone,
        contact.timezone,
        contact.state,
        contact.last_outcome if contact.state in ("pending", "dialing") else contact.state,
        contact.attempts,
        call.id if call else "",
        call.duration_seconds if call and call.duration_seconds is not None else "",
        analysis.get("lead_score", ""),
        _cell(analysis.get("summary")),
        _cell(analysis.get("sentiment")),
        analysis.get("meeting_booked", ""),
        *[_cell((contact.variables or {}).get(n)) for n in var_cols],
        *[_cell((contact.contact_metadata or {}).get(n)) for n in meta_cols],
    ]


def _cell(value: Any) -> Any:
    """Free text neutralised for spreadsheets (a leading `=` is no formula); numbers kept."""
    if value is None:
        return ""
    return safe_cell(value) if isinstance(value, str) else value


def _csv_line(values: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue()
