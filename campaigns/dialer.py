"""The dialer: dials campaign contacts from the database, durably.

Everything it knows is in the database, so a restart loses nothing and several replicas
can run it at once:

- Pacing: a campaign's `next_dial_at` is moved forward by a conditional UPDATE (compare
  and set on the old value); whoever wins owns those dial slots.
- Claim: `UPDATE campaign_contacts SET state='dialing' ... WHERE id IN (...) AND
  state='pending' RETURNING ...` in the transaction that also writes each attempt row
  (`(contact_id, number)` unique) and its call row. A contact another replica claimed
  first is simply not returned.
- Lease: a dialing contact's `lease_until` says when to check on its call. Whoever finds
  it lapsed asks Twilio (`calls(sid).fetch()`) and applies what Twilio says: a call that
  ended while its callbacks were lost (a crash, a restart) ends here, one still up gets a
  new lease. A claim whose dial never got a call sid is looked up at Twilio by number; if
  Twilio has none, the contact goes back to `pending`.

Limits applied together on each pass: each contact's local calling window, the
campaign's `max_concurrent_calls` (its dialing contacts) and `calls_per_second`, the
process's `MAX_CONCURRENT_CALLS` less `CAMPAIGN_INBOUND_RESERVE` (through `CallAdmission`),
each contact's retry delay and attempt limit, and no number with two calls at once across
campaigns. The clock is injected (`CampaignEvents.clock`), so window tests need no waiting.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from adapters.telephony import TelephonyError, TwilioGateway, stream_twiml
from campaigns.policy import outcome_of_error
from campaigns.reconcile import Reconciler
from campaigns.service import CampaignEvents
from campaigns.window import CallingWindow
from config import Settings
from models import (
    Agent,
    Call,
    Campaign,
    CampaignAttempt,
    CampaignContact,
)
from postcall.hooks import TaskSet
from store.calls import CallHook, apply_status
from utils import mask_phone, new_id

log = logging.getLogger("ai_sdr.dialer")


@dataclass(slots=True)
class _Claimed:
    contact_id: str
    phone: str
    call_id: str
    attempt: int
    at: datetime


class CallSlots(Protocol):
    """The process's call slots (`api.admission.CallAdmission`)."""

    limit: int

    def try_admit(self, call_id: str, hold_s: float) -> bool: ...
    def release(self, call_id: str) -> None: ...
    def in_use(self) -> int: ...


class Dialer:
    """`start()` in the app lifespan, `aclose()` at shutdown, `wake()` after a change that
    may make a dial due (a campaign started, a slot freed)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        twilio: TwilioGateway,
        settings: Settings,
        admission: CallSlots,
        events: CampaignEvents,
        hook: CallHook,
        live: Callable[[], Collection[str]],
        *,
        ring_hold_s: float,
        stream_parameters: Callable[[str], dict[str, str]],
    ) -> None:
        """`ring_hold_s`: how long a dialed call holds its process slot before its stream
        starts (`api.admission.OUTBOUND_HOLD_S`). `stream_parameters`: the `<Parameter>`s
        of a call's stream TwiML (its id and stream token, `api.stream_binding`)."""
        self.sessionmaker = sessionmaker
        self.twilio = twilio
        self.settings = settings
        self.admission = admission
        self.events = events
        self.hook = hook
        self.live = live
        self.tick_s = settings.CAMPAIGN_TICK_MS / 1000
        self.lease = timedelta(seconds=settings.CAMPAIGN_LEASE_S)
        self.ring_hold_s = ring_hold_s
        self.stream_parameters = stream_parameters
        self._statements = 0
        self.dials = 0
        self._wake = asyncio.Event()
        self._dials = TaskSet("campaign-dial")
        self._task: asyncio.Task[None] | None = None
        events.wake_dialer = self.wake
        self.reconciler = Reconciler(
            sessionmaker,
            twilio,
            events,
            hook,
            lease=self.lease,
            live=live,
            release=admission.release,
            wake=self.wake,
        )

    @property
    def statements(self) -> int:
        """Database statements the dialer ran (for the benchmark)."""
        return self._statements + self.reconciler.statements

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.events.clock

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="campaign-dialer")

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._dials.aclose()  # a claim cut short is reconciled when its lease lapses

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # the database may be briefly locked; never stop dialing
                log.exception("dialer pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()

    # --- one pass -----------------------------------------------------------------------

    async def tick(self) -> None:
        now = self.clock()
        async with self.sessionmaker() as session:
            self._statements += 1
            running = list(
                await session.scalars(select(Campaign).where(Campaign.status == "running"))
            )
        for campaign in running:
            if campaign.start_at is not None and campaign.start_at > now:
                continue
            await self._campaign_pass(campaign, now)
        await self.reconciler.reconcile(now, dialing=self._dials.keys())

    async def _campaign_pass(self, campaign: Campaign, now: datetime) -> None:
        if campaign.end_at is not None and now >= campaign.end_at:
            await self._expire(campaign.id, now)
        async with self.sessionmaker() as session:
            self._statements += 1
            counts = dict(
                (
                    await session.execute(
                        select(CampaignContact.state, func.count())
                        .where(
                            CampaignContact.campaign_id == campaign.id,
                            CampaignContact.state.in_(("pending", "dialing")),
                        )
                        .group_by(CampaignContact.state)
                    )
                ).all()
            )
        if not counts:
            await self._complete(campaign.id)
            return
        free = min(campaign.max_concurrent_calls - counts.get("dialing", 0), self._process_free())
        if free > 0 and counts.get("pending", 0) > 0:
            await self._dial_due(campaign, now, free)

    def _process_free(self) -> int:
        """Outbound slots this process may take: MAX_CONCURRENT_CALLS less the inbound
        reserve less what is up (0 = no process limit)."""
        limit = self.admission.limit
        if not limit:
            return 1_000_000
        return limit - self.settings.CAMPAIGN_INBOUND_RESERVE - self.admission.in_use()

    async def _dial_due(self, campaign: Campaign, now: datetime, free: int) -> None:
        interval = 1.0 / max(campaign.calls_per_second, 1e-6)
        base = max(campaign.next_dial_at or now, now)
        horizon = now + timedelta(seconds=self.tick_s)
        if base >= horizon:
            return  # the next slot is after this pass
        slots = min(free, max(1, math.ceil((horizon - base).total_seconds() / interval)))
        window = CallingWindow.from_dict(campaign.calling_window)
        claimed = await self._claim(campaign, window, now, base, interval, slots)
        for item in claimed:
            self._dials.spawn(item.call_id, self._dial(campaign, item))

    async def _claim(
        self,
        campaign: Campaign,
        window: CallingWindow,
        now: datetime,
        base: datetime,
        interval: float,
        slots: int,
    ) -> list[_Claimed]:
        async with self.sessionmaker() as session, session.begin():
            self._statements += 1
            busy = aliased(CampaignContact)
            candidates = list(
                await session.execute(
                    select(CampaignContact.id, CampaignContact.phone, CampaignContact.timezone)
                    .where(
                        CampaignContact.campaign_id == campaign.id,
                        CampaignContact.state == "pending",
                        CampaignContact.next_attempt_at <= now,
                        # no number with two calls at once, whichever campaign holds it
                        ~exists().where(
                            and_(busy.phone == CampaignContact.phone, busy.state == "dialing")
                        ),
                    )
                    .order_by(CampaignContact.next_attempt_at, CampaignContact.id)
                    .limit(slots * 2 + 8)
                )
            )
            chosen: list[str] = []
            for contact_id, _phone, tz in candidates:
                if len(chosen) < slots and window.is_open(now, tz):
                    chosen.append(contact_id)
                elif not window.is_open(now, tz):
                    await self._reschedule(session, campaign, contact_id, window, now, tz)
            if not chosen:
                return []
            # pacing slots first: a replica that lost this race claims nothing
            self._statements += 2
            moved = await session.execute(
                update(Campaign)
                .where(
                    Campaign.id == campaign.id,
                    Campaign.status == "running",
                    Campaign.next_dial_at.is_(None)
                    if campaign.next_dial_at is None
                    else Campaign.next_dial_at == campaign.next_dial_at,
                )
                .values(next_dial_at=base + timedelta(seconds=interval * len(chosen)))
                .returning(Campaign.id)
                .execution_options(synchronize_session=False)
            )
            if moved.first() is None:
                return []
            rows = (
                await session.execute(
                    update(CampaignContact)
                    .where(CampaignContact.id.in_(chosen), CampaignContact.state == "pending")
                    .values(
                        state="dialing",
                        attempts=CampaignContact.attempts + 1,
                        lease_until=now + self.lease,
                        updated_at=now,
                    )
                    .returning(
                        CampaignContact.id,
                        CampaignContact.phone,
                        CampaignContact.attempts,
                        CampaignContact.variables,
                        CampaignContact.contact_metadata,
                    )
                    .execution_options(synchronize_session=False)
                )
            ).all()
            agent = await session.get(Agent, campaign.agent_id)
            claimed: list[_Claimed] = []
            for index, row in enumerate(sorted(rows, key=lambda r: chosen.index(r.id))):
                call_id = new_id("call")
                if agent is None or not self.admission.try_admit(call_id, self.ring_hold_s):
                    await self._unclaim(session, row.id)
                    continue
                session.add(self._call_row(campaign, agent, row, call_id))
                session.add(
                    CampaignAttempt(
                        campaign_id=campaign.id,
                        contact_id=row.id,
                        number=row.attempts,
                        call_id=call_id,
                        started_at=now,
                    )
                )
                at = base + timedelta(seconds=interval * index)
                claimed.append(_Claimed(row.id, row.phone, call_id, row.attempts, at))
            self._statements += 2 * len(claimed)
        return claimed

    def _call_row(self, campaign: Campaign, agent: Agent, row: Any, call_id: str) -> Call:
        variables = {**agent.variables, **campaign.variables, **row.variables}
        return Call(
            id=call_id,
            agent_id=agent.id,
            direction="outbound",
            from_number=self._from_number(campaign, agent),
            to_number=row.phone,
            status="queued",
            variables=variables,
            call_metadata=dict(row.contact_metadata or {}),
            campaign_id=campaign.id,
            contact_id=row.id,
        )

    def _from_number(self, campaign: Campaign, agent: Agent) -> str:
        return campaign.from_number or agent.phone_number or self.settings.TWILIO_DEFAULT_FROM or ""

    async def _unclaim(self, session: AsyncSession, contact_id: str) -> None:
        """The process had no slot after all (an inbound call took it): back to pending."""
        await session.execute(
            update(CampaignContact)
            .where(CampaignContact.id == contact_id, CampaignContact.state == "dialing")
            .values(state="pending", attempts=CampaignContact.attempts - 1, lease_until=None)
            .execution_options(synchronize_session=False)
        )

    async def _reschedule(
        self,
        session: AsyncSession,
        campaign: Campaign,
        contact_id: str,
        window: CallingWindow,
        now: datetime,
        tz: str,
    ) -> None:
        """A due contact whose local window is shut waits for it to open (or expires)."""
        opens = window.next_open(now, tz)
        values: dict[str, Any]
        if opens is None or (campaign.end_at is not None and opens >= campaign.end_at):
            values = {"state": "expired", "next_attempt_at": None}
        else:
            values = {"next_attempt_at": opens}
        self._statements += 1
        await session.execute(
            update(CampaignContact)
            .where(CampaignContact.id == contact_id, CampaignContact.state == "pending")
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    # --- one dial -----------------------------------------------------------------------

    async def _dial(self, campaign: Campaign, item: _Claimed) -> None:
        delay = (item.at - self.clock()).total_seconds()
        if delay > 0:
            await asyncio.sleep(min(delay, 5.0))
        self.dials += 1
        settings = self.settings
        async with self.sessionmaker() as session:
            agent = await session.get(Agent, campaign.agent_id)
        record = bool(agent and agent.recording_enabled)
        detect = bool(agent and (agent.voicemail or {}).get("detect", True))
        try:
            created = await self.twilio.create_call(
                to=item.phone,
                from_=self._from_number(campaign, agent) if agent else "",
                twiml=stream_twiml(settings.media_stream_url, self.stream_parameters(item.call_id)),
                status_callback=settings.public_url("/twilio/status"),
                record=record,
                recording_status_callback=settings.public_url("/twilio/recording"),
                amd_callback=settings.public_url("/twilio/amd") if detect else "",
            )
        except TelephonyError as exc:
            self.admission.release(item.call_id)
            await self._refused(item, exc)
            return
        except BaseException:
            self.admission.release(item.call_id)
            raise
        async with self.sessionmaker() as session, session.begin():
            self._statements += 2
            await session.execute(
                update(Call)
                .where(Call.id == item.call_id, Call.twilio_call_sid.is_(None))
                .values(twilio_call_sid=created.sid)
            )
            await session.execute(
                update(CampaignAttempt)
                .where(CampaignAttempt.call_id == item.call_id)
                .values(twilio_call_sid=created.sid)
            )

    async def _refused(self, item: _Claimed, exc: TelephonyError) -> None:
        outcome = outcome_of_error(exc.code)
        log.info(
            "campaign dial %s to %s refused by Twilio (code %s): %s",
            item.call_id,
            mask_phone(item.phone),
            exc.code,
            outcome,
        )
        async with self.sessionmaker() as session, session.begin():
            self._statements += 4
            call = await session.get(Call, item.call_id)
            if call is None:
                return
            call.error_message = f"Twilio error {exc.code}: {exc.message}"
            call.ended_reason = "failed"
            apply_status(call, "failed")
            await session.flush()
            await self.hook(session, call, "call.ended")

    # --- completion, expiry, reconciliation ---------------------------------------------

    async def _complete(self, campaign_id: str) -> None:
        async with self.sessionmaker() as session, session.begin():
            self._statements += 1
            done = await session.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id, Campaign.status == "running")
                .values(status="completed", ended_at=self.clock())
                .returning(Campaign.id)
                .execution_options(synchronize_session=False)
            )
            if done.first() is None:
                return
            campaign = await session.get(Campaign, campaign_id)
            if campaign is not None:
                await self.events.emit(session, campaign, "campaign.completed")
        log.info("campaign %s completed", campaign_id)

    async def _expire(self, campaign_id: str, now: datetime) -> None:
        async with self.sessionmaker() as session, session.begin():
            self._statements += 1
            await session.execute(
                update(CampaignContact)
                .where(
                    CampaignContact.campaign_id == campaign_id,
                    CampaignContact.state == "pending",
                )
                .values(state="expired", next_attempt_at=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
