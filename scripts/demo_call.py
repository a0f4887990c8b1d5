"""Places one simulated inbound call on a running service (see scripts/demo.sh): creates a
demo agent, answers Twilio's voice webhook, streams a caller's spoken audio over the Media
Streams WebSocket, and prints what the agent said and the stored transcript.

Of ours, imports only: emulators.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import httpx
from twilio.request_validator import RequestValidator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulators.audio import synth_speech
from emulators.twilio_caller import Hangup, SayAfterAgentAudio, TwilioCaller, new_sid

BASE = os.environ.get("PUBLIC_BASE_URL", "http://127.0.0.1:8000")
TOKEN = os.environ["TWILIO_AUTH_TOKEN"]
HEADERS = {"Authorization": f"Bearer {os.environ.get('API_KEYS', 'dev-key').split(',')[0]}"}
AGENT_NUMBER = "+15550100100"


async def wait_for_service(http: httpx.AsyncClient) -> None:
    for _ in range(120):
        try:
            if (await http.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the service did not come up; see data/demo/service.log")


async def main() -> None:
    async with httpx.AsyncClient(base_url=BASE, headers=HEADERS, timeout=10) as http:
        await wait_for_service(http)
        agents = (await http.get("/v1/agents")).json()["items"]
        if not any(a["phone_number"] == AGENT_NUMBER for a in agents):
            await http.post(
                "/v1/agents",
                json={
                    "name": "Demo SDR",
                    "phone_number": AGENT_NUMBER,
                    "first_message": "Hi, this is Acme. How can I help you today?",
                    "end_call_phrases": ["goodbye"],
                },
            )
        call_sid = new_sid("CA")
        form = {
            "CallSid": call_sid,
            "From": "+15550100999",
            "To": AGENT_NUMBER,
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        signature = RequestValidator(TOKEN).compute_signature(BASE + "/twilio/voice", form)
        twiml = (
            await http.post("/twilio/voice", data=form, headers={"X-Twilio-Signature": signature})
        ).text
        parameters = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]*)"', twiml))
        call_id = parameters["call_id"]
        stream_url = re.search(r'<Stream url="([^"]+)"', twiml).group(1)  # type: ignore[union-attr]
        print(f"call {call_id}: the caller is speaking...")
        caller = TwilioCaller(
            stream_url,
            [
                SayAfterAgentAudio(
                    1, 0.5, synth_speech("Hi, I'd like to hear about your pricing."), anchor="end"
                ),
                SayAfterAgentAudio(2, 0.5, synth_speech("Thanks, goodbye."), anchor="end"),
                Hangup(40),
            ],
            auth_token=TOKEN,
            call_sid=call_sid,
            custom_parameters=parameters,
        )
        result = await caller.run()
        print(
            f"greeting heard after {result.greeting_latency:.2f} s; "
            f"voice-to-voice per turn: {[round(t or 0, 2) for t in result.turn_latencies()]} s"
        )
        await asyncio.sleep(1)
        call = (await http.get(f"/v1/calls/{call_id}")).json()
        for turn in call["turns"]:
            print(f"  {turn['role']:>9}: {turn['text']}")
        print(f"ended: {call['ended_reason']}")


if __name__ == "__main__":
    asyncio.run(main())
