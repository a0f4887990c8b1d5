"""A PDF bomb uploaded during a live call does not slow the call: parsing runs in the parse
worker process (niced, killed on its deadline), never on the event loop or its threads.
The same scripted call runs quiet, then with three bombs uploaded as it starts; the
caller's voice-to-voice (end of speech to the agent's audio, as the caller heard it) is
compared through the real server over real sockets."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import httpx
import pytest

from emulators.audio import synth_speech
from emulators.twilio_caller import CallerResult, Hangup, SayAfterAgentAudio
from tests.harness import LiveStack
from tests.test_ingest import bomb_pdf

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What does the pro plan cost?",
    "Does it include support?",
    "Can I cancel any time?",
    "How long is the trial?",
]
REPLIES = ["It is forty nine dollars a month.", "Yes, email support.", "Yes.", "Two weeks."]


async def _call(stack: LiveStack, lines: list[bytes]) -> CallerResult:
    timeline = [SayAfterAgentAudio(n + 1, 0.4, line, anchor="end") for n, line in enumerate(lines)]
    _, result = await stack.inbound_call([*timeline, Hangup(30.0)], max_duration_s=35)
    return result


def _voice_to_voice(result: CallerResult) -> float:
    latencies = [t for t in result.turn_latencies() if t is not None]
    assert len(latencies) == len(QUESTIONS), result
    return statistics.median(latencies)


@pytest.mark.timeout(300)
async def test_a_pdf_bomb_during_a_call_leaves_its_voice_to_voice_alone(
    tmp_path: Path, embedding_model: None
) -> None:
    lines = [synth_speech(q) for q in QUESTIONS]
    bomb = bomb_pdf(300_000)  # 7 KB that inflate to 2.4 M characters of text
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": QUESTIONS * 2},
        ollama={"replies": REPLIES * 2},
        DOCUMENT_PARSE_TIMEOUT_S=60.0,
    ) as stack:
        agent = await stack.create_agent()
        quiet = await _call(stack, lines)
        async with stack.api() as http:
            path = f"/v1/agents/{agent['id']}/documents"

            async def upload(n: int) -> httpx.Response:
                files = {"file": (f"bomb{n}.pdf", bomb + b"%" * n, "application/pdf")}
                return await http.post(path, files=files, timeout=300)

            uploads = [asyncio.ensure_future(upload(n)) for n in range(3)]
            loaded = await _call(stack, lines)
            answers = await asyncio.gather(*uploads)

    assert [r.status_code for r in answers] == [413] * 3, [r.text for r in answers]
    quiet_ms, loaded_ms = _voice_to_voice(quiet) * 1000, _voice_to_voice(loaded) * 1000
    print(f"voice-to-voice median: quiet {quiet_ms:.0f} ms, with three bombs {loaded_ms:.0f} ms")
    assert loaded_ms - quiet_ms < 50, (quiet_ms, loaded_ms)
