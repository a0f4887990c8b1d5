"""What follows a call's state changes, composed for the app: the webhook outbox and
dispatcher, post-call analysis and inbound recording, joined into the one `CallHook` that
`SqlCallStore` and the Twilio status callback call inside their transactions.

The hook runs the analyser before the outbox, so `call.ended` is written knowing whether
the analysis is pending or skipped.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.telephony import TelephonyError, TwilioGateway
from config import Settings
from models import Agent, Call
from pipeline.providers import LLMProvider
from postcall.analysis import CallAnalyser
from postcall.dispatcher import WebhookDispatcher
from postcall.hooks import TaskSet, after_commit, compose_hooks
from postcall.outbox import Outbox
from postcall.report import load_agent
from store.calls import LIVE_EVENTS

log = logging.getLogger("ai_sdr.post_call")


class InboundRecording:
    """Starts a Twilio recording when an inbound call's stream starts, if the agent records
    calls (outbound calls ask for it when they are created). Runs after the commit, never
    inside the transaction: it is a network call."""

    def __init__(self, twilio: TwilioGateway, status_callback: str) -> None:
        self.twilio = twilio
        self.status_callback = status_callback
        self._tasks = TaskSet("recording")

    async def on_call_event(self, session: AsyncSession, call: Call, event_name: str) -> None:
        if event_name != "call.started" or call.direction != "inbound" or not call.twilio_call_sid:
            return
        agent = await load_agent(session, call)
        if agent is None or not agent.recording_enabled:
            return
        call_id, call_sid = call.id, call.twilio_call_sid
        after_commit(session, lambda: self._tasks.spawn(call_id, self._start(call_id, call_sid)))

    async def _start(self, call_id: str, call_sid: str) -> None:
        try:
            await self.twilio.start_recording(call_sid, self.status_callback)
        except TelephonyError as exc:
            log.warning("call %s: could not start recording (Twilio %s)", call_id, exc.code)

    async def aclose(self) -> None:
        await self._tasks.aclose()


class PostCall:
    """Owns the post-call components; `start()` and `aclose()` in the app lifespan."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        llm: LLMProvider,
        twilio: TwilioGateway,
    ) -> None:
        self.dispatcher = WebhookDispatcher(sessionmaker, settings)
        self.outbox = Outbox(settings, wake=self.dispatcher.wake)
        self.analyser = CallAnalyser(sessionmaker, llm, self.outbox, settings)
        self.recording = InboundRecording(twilio, settings.public_url("/twilio/recording"))
        self.hook = compose_hooks(
            self.analyser.on_call_event, self.outbox.on_call_event, self.recording.on_call_event
        )

    def live_events(self, agent: Agent) -> set[str]:
        """The live-call events (`store.calls.LIVE_EVENTS`) these hooks act on for `agent`:
        only the outbox acts on them, when the agent's webhook asked for them."""
        if not self.outbox.url_for(agent):
            return set()
        return {event for event in LIVE_EVENTS if self.outbox.wants(agent, event)}

    async def start(self) -> None:
        await self.dispatcher.start()
        await self.analyser.start()

    async def aclose(self) -> None:
        await self.analyser.aclose()
        await self.recording.aclose()
        await self.dispatcher.aclose()
