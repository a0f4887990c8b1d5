"""Reconciliation for the dialer: a dialing contact whose claim (`lease_until`) lapsed is
checked with Twilio. A call that ended while its callbacks were lost (a crash, a restart,
another replica's) ends here through the app's call hook, as if its callback had come; one
still up gets a new lease; a claim whose dial never got a call sid is looked up at Twilio
by number, and goes back to `pending` if Twilio has no such call.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.telephony import TelephonyError, TwilioGateway
from campaigns.policy import outcome_of
from campaigns.service import CampaignEvents
from models import TERMINAL_STATUSES, Call, CampaignAttempt, CampaignContact
from store.calls import CallHook, apply_status

log = logging.getLogger("ai_sdr.dialer")

NOT_DIALED = "not_dialed"
"""`last_outcome` of a claim whose dial never reached Twilio (the process died first)."""
DIAL_SETTLED_S = 30.0
"""After this long a claim's create request has ended one way or the other (the gateway
gives Twilio 10 s): a claim with no call at Twilio by then was never dialed. Before it,
the replica that claimed it may still be waiting for Twilio's answer."""


class Reconciler:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        twilio: TwilioGateway,
        events: CampaignEvents,
        hook: CallHook,
        *,
        lease: timedelta,
        live: Callable[[], Collection[str]],
        release: Callable[[str], None],
        wake: Callable[[], None],
    ) -> None:
        self.sessionmaker = sessionmaker
        self.twilio = twilio
        self.events = events
        self.hook = hook
        self.lease = lease
        self.live = live
        self.release = release
        self.wake = wake
        self.statements = 0

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.events.clock

    async def reconcile(self, now: datetime, dialing: Collection[str] = ()) -> None:
        """Dialing contacts whose lease lapsed: find out from Twilio what their call did.
        `dialing`: calls this process is still placing (their sid is on its way)."""
        async with self.sessionmaker() as session:
            self.statements += 1
            lapsed = list(
                await session.execute(
                    select(CampaignContact.id, CampaignContact.phone, CampaignAttempt)
                    .join(
                        CampaignAttempt,
                        and_(
                            CampaignAttempt.contact_id == CampaignContact.id,
                            CampaignAttempt.number == CampaignContact.attempts,
                        ),
                    )
                    .where(CampaignContact.state == "dialing", CampaignContact.lease_until <= now)
                    .limit(50)
                )
            )
        live = set(self.live())
        for contact_id, phone, attempt in lapsed:
            if attempt.call_id and (attempt.call_id in live or attempt.call_id in dialing):
                await self._extend(contact_id, now)
                continue
            try:
                await self._reconcile_one(contact_id, phone, attempt, now)
            except TelephonyError as exc:
                log.warning("reconcile %s: Twilio unreachable (%s)", attempt.call_id, exc.code)
                await self._extend(contact_id, now)

    async def _extend(self, contact_id: str, now: datetime) -> None:
        async with self.sessionmaker() as session, session.begin():
            self.statements += 1
            await session.execute(
                update(CampaignContact)
                .where(CampaignContact.id == contact_id, CampaignContact.state == "dialing")
                .values(lease_until=now + self.lease)
                .execution_options(synchronize_session=False)
            )

    async def _reconcile_one(
        self, contact_id: str, phone: str, attempt: CampaignAttempt, now: datetime
    ) -> None:
        sid = attempt.twilio_call_sid
        if sid is None:
            found = await self.twilio.find_calls(
                to=phone, since=attempt.started_at - timedelta(seconds=5)
            )
            known = await self._known_sids([c.sid for c in found])
            adopted = next((c for c in found if c.sid not in known), None)
            if adopted is None:
                if now - attempt.started_at < timedelta(seconds=DIAL_SETTLED_S):
                    await self._extend(contact_id, now)  # its create request may be in flight
                    return
                await self._not_dialed(contact_id, attempt)
                return
            sid = adopted.sid
        fetched = await self.twilio.fetch_call(sid)
        async with self.sessionmaker() as session, session.begin():
            self.statements += 3
            call = await session.get(Call, attempt.call_id) if attempt.call_id else None
            if call is None:
                return
            if call.twilio_call_sid is None:
                call.twilio_call_sid = sid
                await session.execute(
                    update(CampaignAttempt)
                    .where(CampaignAttempt.id == attempt.id)
                    .values(twilio_call_sid=sid)
                )
            if fetched.answered_by and not call.answered_by:
                call.answered_by = fetched.answered_by
            if fetched.status not in TERMINAL_STATUSES and call.status not in TERMINAL_STATUSES:
                await session.execute(
                    update(CampaignContact)
                    .where(CampaignContact.id == contact_id, CampaignContact.state == "dialing")
                    .values(lease_until=now + self.lease)
                )
                return
            self.release(call.id)
            if fetched.status == "completed" and (fetched.duration or 0) > 0:
                apply_status(call, "in-progress")  # Twilio says it was answered
            if apply_status(call, fetched.status, duration=fetched.duration):
                call.ended_reason = call.ended_reason or "customer-ended-call"
                await session.flush()
                await self.hook(session, call, "call.ended")  # closes the attempt too
            await self.events.record_outcome(session, call.id, outcome_of(call))
        log.info("reconciled campaign call %s from Twilio: %s", attempt.call_id, fetched.status)

    async def _known_sids(self, sids: list[str]) -> set[str]:
        if not sids:
            return set()
        async with self.sessionmaker() as session:
            self.statements += 1
            return set(
                await session.scalars(
                    select(Call.twilio_call_sid).where(Call.twilio_call_sid.in_(sids))
                )
            )

    async def _not_dialed(self, contact_id: str, attempt: CampaignAttempt) -> None:
        """Twilio never got the dial: the contact goes back to the queue (the attempt
        still counts, so the limit holds however often this happens)."""
        async with self.sessionmaker() as session, session.begin():
            self.statements += 3
            await session.execute(
                update(CampaignAttempt)
                .where(CampaignAttempt.id == attempt.id, CampaignAttempt.outcome.is_(None))
                .values(outcome=NOT_DIALED, ended_at=self.clock())
            )
            call = await session.get(Call, attempt.call_id) if attempt.call_id else None
            if call is not None and call.status not in TERMINAL_STATUSES:
                call.status, call.ended_reason = "failed", "not-dialed"
                call.ended_at = self.clock()
            await session.execute(
                update(CampaignContact)
                .where(CampaignContact.id == contact_id, CampaignContact.state == "dialing")
                .values(
                    state="pending",
                    lease_until=None,
                    last_outcome=NOT_DIALED,
                    next_attempt_at=self.clock(),
                )
            )
        if attempt.call_id:
            self.release(attempt.call_id)
        self.wake()
