"""Campaign state that follows calls: the `CallHook` part that turns a finished campaign
call into its attempt's outcome and the contact's next step (inside the transaction that
ends the call, so the two never disagree), the lifecycle moves, campaign webhooks, live
counters and the ETA.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from campaigns.policy import next_step, outcome_of
from campaigns.window import CallingWindow
from models import (
    Agent,
    Booking,
    Call,
    Campaign,
    CampaignAttempt,
    CampaignContact,
)
from postcall.hooks import after_commit
from postcall.outbox import Outbox
from postcall.report import call_record, iso
from utils import utcnow

log = logging.getLogger("ai_sdr.campaigns")

Clock = Callable[[], datetime]
DEFAULT_CALL_SECONDS = 60.0
"""Assumed length of a call for the ETA until the campaign's own calls say otherwise."""


class CampaignEvents:
    """The campaign side of the app: the call hook, outcomes and campaign webhooks.
    `clock` is shared with the dialer, so tests move both."""

    def __init__(self, outbox: Outbox | None, clock: Clock = utcnow) -> None:
        self.outbox = outbox
        self.clock = clock
        self.wake_dialer: Callable[[], None] = lambda: None

    async def on_call_event(self, session: AsyncSession, call: Call, event_name: str) -> None:
        """CallHook: an outbound call ended. A voicemail gets its own `call.voicemail`
        webhook; a campaign call's outcome moves its contact."""
        if event_name != "call.ended" or call.direction != "outbound":
            return
        outcome = outcome_of(call)
        if outcome == "voicemail" and self.outbox is not None:
            agent = await session.get(Agent, call.agent_id) if call.agent_id else None
            data = {"call": call_record(call, agent)}
            self.outbox.enqueue(session, call, agent, "call.voicemail", data)
        if call.contact_id is not None:
            await self.record_outcome(session, call.id, outcome)

    async def record_outcome(self, session: AsyncSession, call_id: str, outcome: str) -> bool:
        """Close the attempt of `call_id` with `outcome` and move its contact on (once:
        False if the attempt was already closed or is not a campaign attempt)."""
        now = self.clock()
        closed = await session.execute(
            update(CampaignAttempt)
            .where(CampaignAttempt.call_id == call_id, CampaignAttempt.outcome.is_(None))
            .values(outcome=outcome, ended_at=now)
            .returning(CampaignAttempt.contact_id, CampaignAttempt.number)
            .execution_options(synchronize_session=False)
        )
        row = closed.first()
        if row is None:
            return False
        contact = await session.get(CampaignContact, row.contact_id)
        campaign = await session.get(Campaign, contact.campaign_id) if contact else None
        if contact is None or campaign is None:
            return False
        contact.last_outcome = outcome
        contact.lease_until = None
        if contact.state != "dialing" or contact.attempts != row.number:
            return True  # a stale attempt (reconciled twice); the contact moved on already
        step = next_step(outcome, contact.attempts, campaign.retry_policy, now)
        final = step.state
        if step.state == "pending":
            at = _reopen(campaign, contact, step.at or now)
            if at is not None and campaign.status != "cancelled":
                contact.state, contact.next_attempt_at = "pending", at
                after_commit(session, self.wake_dialer)
                return True
            # no retry: cancelled, or no window before `end_at` (expired), or none at all
            if campaign.status == "cancelled":
                final = "cancelled"
            elif at is None and campaign.end_at is not None:
                final = "expired"
            else:
                final = outcome
        contact.state, contact.next_attempt_at = final, None
        after_commit(session, self.wake_dialer)
        return True

    async def emit(self, session: AsyncSession, campaign: Campaign, event_type: str) -> None:
        """A `campaign.*` webhook, in the caller's transaction (the outbox)."""
        if self.outbox is None:
            return
        agent = await session.get(Agent, campaign.agent_id)
        counts = await contact_counts(session, campaign.id)
        data = {"campaign": campaign_record(campaign), "contacts": counts}
        self.outbox.enqueue(session, None, agent, event_type, data)


def _reopen(campaign: Campaign, contact: CampaignContact, at: datetime) -> datetime | None:
    """When a retry due at `at` may be dialed: the contact's next window, None if that is
    past the campaign's `end_at`."""
    window = CallingWindow.from_dict(campaign.calling_window)
    opens = window.next_open(at, contact.timezone)
    if opens is None or (campaign.end_at is not None and opens >= campaign.end_at):
        return None
    return opens


def campaign_record(campaign: Campaign) -> dict[str, Any]:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "agent_id": campaign.agent_id,
        "status": campaign.status,
        "started_at": iso(campaign.started_at),
        "ended_at": iso(campaign.ended_at),
    }


# --- reading ----------------------------------------------------------------------------


async def contact_counts(session: AsyncSession, campaign_id: str) -> dict[str, int]:
    rows = await session.execute(
        select(CampaignContact.state, func.count())
        .where(CampaignContact.campaign_id == campaign_id)
        .group_by(CampaignContact.state)
    )
    return {state: int(count) for state, count in rows.all()}


async def outcome_counts(session: AsyncSession, campaign_id: str) -> dict[str, int]:
    rows = await session.execute(
        select(CampaignAttempt.outcome, func.count())
        .where(CampaignAttempt.campaign_id == campaign_id, CampaignAttempt.outcome.is_not(None))
        .group_by(CampaignAttempt.outcome)
    )
    return {str(outcome): int(count) for outcome, count in rows.all()}


async def live_counters(session: AsyncSession, campaign: Campaign, now: datetime) -> dict[str, Any]:
    """What `GET /v1/campaigns/{id}` reports beside the settings."""
    contacts = await contact_counts(session, campaign.id)
    outcomes = await outcome_counts(session, campaign.id)
    attempts = sum(outcomes.values()) + contacts.get("dialing", 0)
    calls = select(Call.id).where(Call.campaign_id == campaign.id).scalar_subquery()
    meetings = await session.scalar(
        select(func.count()).select_from(Booking).where(Booking.call_id.in_(calls))
    )
    durations = await session.execute(
        select(func.avg(Call.duration_seconds), func.count(Call.duration_seconds)).where(
            Call.campaign_id == campaign.id, Call.duration_seconds.is_not(None)
        )
    )
    avg_duration, _n = durations.one()
    scores = [
        a.get("lead_score")
        for a in await session.scalars(
            select(Call.analysis).where(Call.campaign_id == campaign.id, Call.analysis.is_not(None))
        )
        if isinstance(a, dict)
    ]
    numeric = [float(s) for s in scores if isinstance(s, int | float)]
    remaining = contacts.get("pending", 0) + contacts.get("dialing", 0)
    eta_s = _eta_seconds(campaign, remaining, float(avg_duration or DEFAULT_CALL_SECONDS), now)
    return {
        "contacts": contacts,
        "contacts_total": sum(contacts.values()),
        "attempts": attempts,
        "calls_in_progress": contacts.get("dialing", 0),
        "outcomes": {
            "answered": outcomes.get("answered", 0),
            "voicemail": outcomes.get("voicemail", 0),
            "no_answer": outcomes.get("no_answer", 0),
            "busy": outcomes.get("busy", 0),
            "failed": outcomes.get("failed", 0),
            "invalid": outcomes.get("invalid", 0),
            "opted_out": outcomes.get("opted_out", 0),
            "meetings_booked": int(meetings or 0),
        },
        "average_lead_score": round(sum(numeric) / len(numeric), 1) if numeric else None,
        "eta_seconds": None if eta_s is None else round(eta_s),
        "eta_at": None if eta_s is None else iso(now + timedelta(seconds=eta_s)),
    }


def _eta_seconds(campaign: Campaign, remaining: int, call_s: float, now: datetime) -> float | None:
    """Time to dial what is left: the slower of the pacing and the concurrency, plus the
    wait for the window to open (in the campaign's fallback timezone)."""
    if campaign.status in ("completed", "cancelled") or remaining == 0:
        return 0.0 if campaign.status != "draft" else None
    pace_s = remaining / max(campaign.calls_per_second, 1e-6)
    talk_s = remaining * call_s / max(campaign.max_concurrent_calls, 1)
    window = CallingWindow.from_dict(campaign.calling_window)
    opens = window.next_open(now, window.timezone)
    wait_s = (opens - now).total_seconds() if opens is not None else 0.0
    return wait_s + max(pace_s, talk_s)
