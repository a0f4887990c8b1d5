"""The do-not-call list: adding a number also suppresses its pending campaign contacts, in
the caller's transaction; `OPTED_OUT` is the `ended_reason` of a call whose callee asked to
go on it.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import phonenumbers
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from models import CampaignContact, DncEntry

OPTED_OUT = "opted-out"


def normalise(raw: str, region: str) -> str:
    """E.164 for `raw` (a national number is read in `region`), or ValueError."""
    raw = raw.strip()
    try:
        parsed = phonenumbers.parse(raw, None if raw.startswith("+") else region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number ({exc})") from None
    if not phonenumbers.is_possible_number(parsed):
        raise ValueError("not a possible phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


async def add_to_dnc(
    session: AsyncSession,
    phone: str,
    reason: str | None,
    *,
    source: str = "api",
    call_id: str | None = None,
) -> DncEntry:
    """Put `phone` on the list (kept as it was if already there) and suppress its
    pending campaign contacts."""
    entry = await session.get(DncEntry, phone)
    if entry is None:
        entry = DncEntry(phone=phone, reason=reason, source=source, call_id=call_id)
        session.add(entry)
    await session.execute(
        update(CampaignContact)
        .where(CampaignContact.phone == phone, CampaignContact.state == "pending")
        .values(state="suppressed", next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    return entry
