"""`/v1/dnc`: the do-not-call list. Add numbers one at a time or as a CSV (a `phone`
column, an optional `reason`), list them, remove them. A number on it is never dialed:
`POST /v1/calls` answers 409 `dnc`, campaigns import it as `suppressed` and the dialer
suppresses pending contacts it reaches.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from starlette.datastructures import UploadFile

from api.deps import PageDep, SessionDep, SettingsDep, page_of, paginate, require_api_key
from api.errors import APIError, not_found
from campaigns.contacts import ImportError_, parse_csv
from campaigns.schemas import DncIn, DncRead
from models import DncEntry
from schemas import Page
from tools.dnc import add_to_dnc, normalise

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["dnc"])


@router.post("/dnc", status_code=201, response_model=DncRead)
async def add_number(body: DncIn, session: SessionDep, settings: SettingsDep) -> DncEntry:
    try:
        phone = normalise(body.phone, settings.DEFAULT_PHONE_REGION)
    except ValueError as exc:
        raise APIError(422, "validation_error", f"phone: {exc}", "phone") from None
    entry = await add_to_dnc(session, phone, body.reason)
    await session.commit()
    return entry


@router.post("/dnc/import", status_code=201)
async def import_numbers(
    request: Request, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """A CSV (multipart `file`, or a text/csv body) with a phone column and an optional
    `reason` column; bad rows are reported by line and skipped."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=5)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError(
                    422, "validation_error", "file: a CSV file field named 'file'", "file"
                )
            data = await upload.read()
        finally:
            await form.close()
    elif media_type in ("text/csv", "application/csv"):
        data = await request.body()
    else:
        raise APIError(
            415,
            "unsupported_media_type",
            f"content-type: {media_type or 'none'} is not accepted; send text/csv or "
            "multipart/form-data with a 'file' field",
            "content-type",
        )
    try:
        rows = parse_csv(data)
    except ImportError_ as exc:
        raise APIError(422, "invalid_csv", f"file: {exc}", "file") from None
    added, errors = 0, []
    for row in rows:
        try:
            phone = normalise(row.phone, settings.DEFAULT_PHONE_REGION)
        except ValueError as exc:
            errors.append({"line": row.line, "phone": row.phone[:40], "reason": f"phone: {exc}"})
            continue
        reason = str(row.variables.get("reason", "")).strip()[:500] or None
        await add_to_dnc(session, phone, reason, source="csv")
        added += 1
    await session.commit()
    return {"received": len(rows), "added": added, "errors": errors}


@router.get("/dnc", response_model=Page[DncRead])
async def list_numbers(
    session: SessionDep,
    page: PageDep,
    phone: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    query = select(DncEntry).order_by(DncEntry.created_at.desc(), DncEntry.phone)
    if phone:
        query = query.where(DncEntry.phone == phone.strip())
    items, total = await paginate(session, query, page)
    return page_of(items, total, page)


@router.delete("/dnc/{phone}", status_code=204)
async def remove_number(phone: str, session: SessionDep, settings: SettingsDep) -> Response:
    try:
        key = normalise(phone, settings.DEFAULT_PHONE_REGION)
    except ValueError:
        raise not_found("number", phone) from None
    entry = await session.get(DncEntry, key)
    if entry is None:
        raise not_found("number", phone)
    await session.delete(entry)
    await session.commit()
    return Response(status_code=204)
