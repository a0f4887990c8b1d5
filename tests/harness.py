"""End-to-end harness: the real service on a real port with the wire emulators (Deepgram,
Ollama, Twilio REST) and scripted Twilio callers over real sockets.

    with LiveStack(tmp_path, ollama={"replies": [...]}) as stack:
        agent = await stack.create_agent(first_message="Hi!")
        call_id, result = await stack.inbound_call(agent, [Say(1.0, speech("hello"))])
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from twilio.request_validator import RequestValidator

from config import Settings
from emulators.base import ThreadedServer, async_wait_until
from emulators.deepgram import DeepgramEmulator
from emulators.ollama import OllamaEmulator
from emulators.twilio_caller import Action, CallerResult, TwilioCaller, new_sid
from emulators.twilio_dialplan import Answer, DialPlan
from emulators.twilio_rest import TwilioRestEmulator
from main import create_app
from tests.conftest import ACCOUNT_SID, API_KEY, AUTH_TOKEN, PUBLIC_BASE, make_settings

AGENT_NUMBER = "+14155550100"
CALLER_NUMBER = "+14155550199"


class AppServer(ThreadedServer):
    """The real FastAPI app under uvicorn in a thread, lifespan included."""

    name = "ai-sdr"
    ws_protocol = "api.media_ws:MediaStreamProtocol"  # as run.sh and the Dockerfile run it
    http_protocol = "api.http_protocol:HeadTimeoutProtocol"
    ws_max_size = 256 * 1024  # as run.sh: a media stream message is a few hundred bytes

    def __init__(self, settings: Settings, ws_protocol: str | None = None) -> None:
        super().__init__()
        self.app = create_app(settings)
        if ws_protocol is not None:
            self.ws_protocol = ws_protocol
        self._lifespan: Any = None

    def build_app(self) -> Any:
        return self.app

    def start(self, timeout: float = 30.0) -> AppServer:
        super().start(timeout)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.run_in_loop(self._lifespan.__aenter__(), timeout=timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._lifespan is not None and self.running:
            self.run_in_loop(self._lifespan.__aexit__(None, None, None), timeout=timeout)
            self._lifespan = None
        super().stop(timeout)


class LiveStack:
    def __init__(
        self,
        tmp_path: Path,
        *,
        deepgram: dict[str, Any] | None = None,
        ollama: dict[str, Any] | None = None,
        ws_protocol: str | None = None,
        **settings: Any,
    ) -> None:
        self.deepgram = DeepgramEmulator(api_key="dg-test-key", **(deepgram or {}))
        self.ollama = OllamaEmulator(**(ollama or {}))
        self.twilio = TwilioRestEmulator(ACCOUNT_SID, AUTH_TOKEN)
        self.tmp_path = tmp_path
        self.extra_settings = settings
        self.ws_protocol = ws_protocol  # None: the protocol run.sh uses
        self.server: AppServer | None = None
        self.settings: Settings | None = None
        self.stream_parameters: dict[str, dict[str, str]] = {}
        """Per call id, the `<Parameter>`s of the TwiML that opened its stream."""

    def __enter__(self) -> LiveStack:
        for emulator in (self.deepgram, self.ollama, self.twilio):
            emulator.start()
        self.settings = make_settings(
            self.tmp_path,
            DEEPGRAM_BASE_URL=self.deepgram.url,
            OLLAMA_HOST=self.ollama.url,
            TWILIO_API_BASE_URL=self.twilio.url,
            **self.extra_settings,
        )
        self.server = AppServer(self.settings, self.ws_protocol).start(
            timeout=90
        )  # a loaded 2-core box
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None and self.server is not None:
                self.assert_no_call_tasks()
        finally:
            if self.server is not None:
                self.server.stop()
        for emulator in (self.twilio, self.ollama, self.deepgram):
            emulator.stop()

    @property
    def app(self) -> Any:
        assert self.server is not None
        return self.server.app

    def api(self) -> httpx.AsyncClient:
        assert self.server is not None
        return httpx.AsyncClient(
            base_url=self.server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        )

    def llm_requests(self) -> list[tuple[str, list[str]]]:
        """Each chat request the Ollama emulator got: its outcome and its user messages."""
        return [
            (r.status, [m["content"] for m in r.body["messages"] if m["role"] == "user"])
            for r in self.ollama.requests
        ]

    async def metrics(self) -> str:
        """The service's Prometheus text."""
        async with self.api() as http:
            return (await http.get("/metrics")).text

    async def create_agent(self, **fields: Any) -> dict[str, Any]:
        body = {
            "name": "Live agent",
            "phone_number": AGENT_NUMBER,
            "first_message": "Hi, this is Acme. How can I help?",
            "silence_timeout_seconds": 30,
            **fields,
        }
        async with self.api() as http:
            response = await http.post("/v1/agents", json=body)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    async def answer_inbound(self, call_sid: str) -> str:
        """Twilio's voice webhook for an inbound call; returns our call id from the TwiML."""
        params = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": CALLER_NUMBER,
            "To": AGENT_NUMBER,
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        signature = RequestValidator(AUTH_TOKEN).compute_signature(
            PUBLIC_BASE + "/twilio/voice", params
        )
        async with self.api() as http:
            response = await http.post(
                "/twilio/voice", data=params, headers={"X-Twilio-Signature": signature}
            )
        assert response.status_code == 200, response.text
        parameters = stream_parameters(response.text)
        assert "call_id" in parameters, response.text
        self.stream_parameters[parameters["call_id"]] = parameters
        return parameters["call_id"]

    def dial_plan(self, default: Answer | None = None) -> DialPlan:
        """Make the Twilio emulator play the calls the service places (campaigns)."""
        assert self.server is not None
        plan = DialPlan(
            app_base=self.server.url,
            public_base=PUBLIC_BASE,
            media_url=self.server.ws_url + "/twilio/media",
            default=default,
        )
        self.twilio.dial_plan = plan
        return plan

    def caller(self, call_id: str, timeline: list[Action], **kwargs: Any) -> TwilioCaller:
        assert self.server is not None and self.settings is not None
        return TwilioCaller(
            self.server.ws_url + "/twilio/media",
            timeline,
            auth_token=AUTH_TOKEN,
            signed_url=self.settings.media_stream_url,
            account_sid=ACCOUNT_SID,
            custom_parameters=self.parameters_for(call_id),
            **kwargs,
        )

    async def inbound_call(
        self, timeline: list[Action], **caller_kwargs: Any
    ) -> tuple[str, CallerResult]:
        call_sid = caller_kwargs.pop("call_sid", None) or new_sid("CA")
        call_id = await self.answer_inbound(call_sid)
        result = await self.caller(call_id, timeline, call_sid=call_sid, **caller_kwargs).run()
        return call_id, result

    def parameters_for(self, call_id: str) -> dict[str, str]:
        """What Twilio would send back for `call_id`'s stream: from the voice webhook's
        TwiML, or an outbound call's TwiML as the Twilio emulator received it."""
        if call_id in self.stream_parameters:
            return self.stream_parameters[call_id]
        for call in self.twilio.calls:
            parameters = stream_parameters(call.get("twiml") or "")
            if parameters.get("call_id") == call_id:
                return parameters
        return {"call_id": call_id}

    async def call_detail(self, call_id: str, *, settled: bool = True) -> dict[str, Any]:
        """GET the call; with `settled`, wait until the pipeline has recorded its end."""
        async with self.api() as http:
            for _ in range(200):
                body = (await http.get(f"/v1/calls/{call_id}")).json()
                if not settled or body.get("ended_reason"):
                    return body  # type: ignore[no-any-return]
                await asyncio.sleep(0.05)
        raise AssertionError(f"call {call_id} never recorded its end: {body}")

    def when(
        self, condition: Callable[[], bool], action: Callable[[], object], timeout: float = 30.0
    ) -> asyncio.Task[None]:
        """A task that runs `action` (a fault to inject, say) once `condition` holds."""

        async def wait_then_act() -> None:
            async with asyncio.timeout(timeout):
                await async_wait_until(condition)
            action()

        return asyncio.create_task(wait_then_act())

    def active_calls(self) -> int:
        return len(self.app.state.calls.active)

    def call_tasks(self) -> list[str]:
        """Tasks on the server loop still running code of a call (pipeline or adapters)."""
        assert self.server is not None
        return self.server.run_in_loop(_call_tasks())

    def assert_no_call_tasks(self, grace_s: float = 2.0) -> None:
        """Fails if a finished call left a task behind (checked when the stack closes)."""
        deadline = time.monotonic() + grace_s
        while (leaked := self.call_tasks()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.active_calls() == 0:
            assert not leaked, f"calls leaked tasks: {leaked}"


def stream_parameters(twiml: str) -> dict[str, str]:
    """The `<Parameter>`s of a `<Stream>`, which Twilio sends back as `customParameters`."""
    return dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]*)"', twiml))


_ROOT = Path(__file__).resolve().parent.parent
_CALL_DIRS = (str(_ROOT / "pipeline"), str(_ROOT / "adapters"))
_NOT_PER_CALL = (str(_ROOT / "pipeline" / "metrics.py"),)  # the app's loop-lag watch
_CALL_MODULES = (str(_ROOT / "voice_pipeline.py"), str(_ROOT / "api" / "media_stream.py"))


def _is_call_code(filename: str) -> bool:
    if filename in _NOT_PER_CALL:
        return False
    return filename.startswith(_CALL_DIRS) or filename in _CALL_MODULES


async def _call_tasks() -> list[str]:
    leaked = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if not task.done() and code is not None and _is_call_code(code.co_filename):
            leaked.append(code.co_qualname)
    return leaked
