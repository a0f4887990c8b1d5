"""The console in a real browser (Debian's chromium through Playwright) against the real
service and the wire emulators: sign in, create an agent, upload a document and ask it a
question; a browser test call from a fake microphone (an espeak-made wav) with a barge-in;
the call in the list and its detail timeline; a webhook redelivery. A screenshot of each
page goes to the test's tmp dir."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path
from typing import Any

import pytest

from emulators.audio import silence, synth_speech
from tests.browser import FAKE_MICROPHONE_ARGS, chromium, needs_chromium
from tests.conftest import API_KEY
from tests.harness import LiveStack
from utils import mulaw_decode

pytestmark = [needs_chromium, pytest.mark.slow, pytest.mark.timeout(240)]

FIRST_SENTENCE = "Sure, happy to help."
LONG_ANSWER = (
    f"{FIRST_SENTENCE} We are open from nine in the morning until six in the evening, Monday "
    "to Friday, and from ten until two on Saturdays. You can also reach us online at any "
    "time, and we answer within a day."
)
"""Two chunks: the short first sentence (1.3 s of the emulator's voice), then the rest."""
TTS_MS_PER_CHAR = 65.0  # the Deepgram emulator's default voice


def _fake_microphone(path: Path) -> Path:
    """A question at 5 s (after the greeting has played), then, while the long answer plays
    (about 3 to 5 s into it, past its first sentence), speech again: the barge-in. A 16-bit
    8 kHz wav Chromium plays once as its microphone."""
    audio = (
        silence(5.0)
        + synth_speech("what are your opening hours")
        + silence(7.0)
        + synth_speech("wait, stop, I have another question")
        + silence(8.0)
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(mulaw_decode(audio).astype("<i2").tobytes())
    return path


async def _talk_state(page: Any, condition: Any, timeout_s: float) -> dict[str, Any]:
    """Poll the page's `window.__talk` (a function call: the page's CSP forbids the string
    evaluation `wait_for_function` would use) until `condition` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        talk = await page.evaluate("() => window.__talk || null")
        if talk is not None and condition(talk):
            return dict(talk)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the page's call state never got there: {talk}")
        await asyncio.sleep(0.1)


async def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    await page.screenshot(path=str(tmp_path / f"console-{name}.png"), full_page=True)


async def test_console_in_a_real_browser(tmp_path):
    wav = _fake_microphone(tmp_path / "caller.wav")
    with LiveStack(
        tmp_path,
        deepgram={
            "listen_script": ["what are your opening hours", "wait stop I have another question"]
        },
        ollama={"replies": [LONG_ANSWER, "Of course, go ahead."]},
    ) as stack:
        assert stack.server is not None
        base = stack.server.url
        args = [*FAKE_MICROPHONE_ARGS, f"--use-file-for-fake-audio-capture={wav}%noloop"]
        async with chromium(tmp_path / "profile", extra_args=args) as context:
            page = await context.new_page()  # type: ignore[attr-defined]
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # sign in
            await page.goto(base + "/console/calls")
            assert page.url.endswith("/console/sign-in")
            await _screenshot(page, tmp_path, "sign-in")
            await page.fill("#api_key", API_KEY)
            await page.click("button[type=submit]")
            await page.wait_for_url("**/console/calls")

            # create an agent: first an invalid value, shown inline in the API's words
            await page.goto(base + "/console/agents/new")
            await page.fill("#f-name", "Browser agent")
            await page.fill("#f-first_message", "Hi, this is Acme. How can I help?")
            await page.fill("#f-temperature", "7")
            await page.click("#agent-form button[type=submit]")
            error = page.locator("#err-temperature")
            await error.wait_for(state="visible")
            assert "less than or equal to 2" in (await error.inner_text())
            await page.fill("#f-temperature", "0.4")
            await page.click("#agent-form button[type=submit]")
            await page.wait_for_url("**/console/agents/agt_*")
            agent_id = page.url.rsplit("/", 1)[-1]

            # upload a document and ask it a question
            doc = tmp_path / "hours.md"
            doc.write_text("# Opening hours\n\nAcme is open from 9am to 6pm, Monday to Friday.\n")
            await page.set_input_files("#document-file", str(doc))
            await page.click("#upload-form button[type=submit]")
            await page.locator("#documents tbody tr").first.wait_for()
            await page.fill("#question", "When are you open?")
            await page.click("#ask-form button[type=submit]")
            passage = page.locator("#passages li.passage").first
            await passage.wait_for()
            assert "9am to 6pm" in await passage.inner_text()
            await _screenshot(page, tmp_path, "agent")

            # a browser test call: greeting plays, question, long answer, barge-in
            await page.goto(f"{base}/console/agents/{agent_id}/talk")
            await page.click("#call-start")
            await _talk_state(page, lambda t: t.get("callId") is not None, 10)
            await _talk_state(page, lambda t: t["audibleMs"] > 1000, 20)  # the greeting played
            await page.locator("#transcript li.user").first.wait_for(timeout=20000)
            talk = await _talk_state(page, lambda t: len(t["clearedAtMs"]) > 0, 30)  # barge-in
            assert talk["framesSent"] > 100 and talk["framesReceived"] > 10
            # marks echoed as their audio played: the greeting's, the first sentence's
            assert talk["marks"] > 0, talk
            await page.get_by_text("Of course, go ahead.").wait_for(timeout=20000)
            transcript = await page.locator("#transcript").inner_text()
            assert "what are your opening hours" in transcript
            await _screenshot(page, tmp_path, "talk")
            await page.click("#call-hangup")
            call_id = talk["callId"]
            detail = await stack.call_detail(call_id)
            assert detail["direction"] == "web"
            answers = [t for t in detail["turns"] if t["role"] == "assistant"]
            cut = [t for t in answers if t["interrupted"]]
            assert answers[0]["text"] == "Hi, this is Acme. How can I help?"  # heard in full
            assert len(cut) == 1, detail["turns"]
            heard = cut[0]["text"]
            # exactly what the page played, judged by its marks: the first sentence (its
            # mark came back) and the played share of the next, to the page's own count
            assert heard.startswith(FIRST_SENTENCE) and len(heard) > len(FIRST_SENTENCE) + 10
            assert LONG_ANSWER.startswith(heard) and len(heard) < len(LONG_ANSWER)
            greeting_ms, answer_ms = talk["talkspurtsMs"][0], talk["clearedAtMs"][0]
            spoken = (answer_ms - greeting_ms) / TTS_MS_PER_CHAR
            assert abs(len(heard) - spoken) < 15, (heard, spoken, talk)

            # the call in the list, its timeline and latency bars
            await page.goto(base + "/console/calls")
            await page.locator(f"#row-{call_id}").wait_for()
            await _screenshot(page, tmp_path, "calls")
            await page.goto(f"{base}/console/calls/{call_id}")
            assert await page.locator("#timeline .turn.user").count() >= 1
            assert await page.locator("#latency .latency-bar").count() >= 1
            await _screenshot(page, tmp_path, "call")

            # analytics and webhooks pages render
            await page.goto(base + "/console/analytics")
            await _screenshot(page, tmp_path, "analytics")
            await page.goto(base + "/console/webhooks")
            await _screenshot(page, tmp_path, "webhooks")
            assert not errors, errors
