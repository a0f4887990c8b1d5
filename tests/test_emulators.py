"""The wire emulators driven by the real vendor SDKs (twilio, deepgram-sdk, ollama), and the
TwilioCaller against a small Media Streams server written here. Assertions are on order,
content and sizes; time bounds are only timeouts."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core.api_error import ApiError
from ollama import AsyncClient, ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from emulators.__main__ import build, parse_args
from emulators.base import TIMINGS_PATH, ThreadedServer, async_wait_until, stop_all
from emulators.deepgram import DeepgramEmulator, expected_tts_bytes
from emulators.ollama import OllamaEmulator, Reply, split_tokens
from emulators.twilio_caller import (
    Dtmf,
    Hangup,
    Say,
    SayAfterAgentAudio,
    TwilioCaller,
)
from emulators.twilio_rest import TwilioRestEmulator
from utils import mulaw_decode, mulaw_encode

ACCOUNT = "AC" + "a" * 32
TOKEN = "emulator-token"
DG_KEY = "dg-key"
TO, FROM = "+14155550100", "+14155550199"
TWIML = "<Response><Connect><Stream url='wss://voice.example.test/media'/></Connect></Response>"


def tone(seconds: float, freq: float = 300.0, amplitude: int = 8000) -> bytes:
    t = np.arange(int(seconds * 8000)) / 8000
    return mulaw_encode((amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16))


def silence(seconds: float) -> bytes:
    return b"\xff" * int(seconds * 8000)


def rms(mulaw: bytes) -> float:
    pcm = mulaw_decode(mulaw).astype(np.float64)
    return float(np.sqrt(np.mean(pcm * pcm)))


# --- Twilio REST ----------------------------------------------------------------------------


@pytest.fixture
def twilio() -> Iterator[TwilioRestEmulator]:
    with TwilioRestEmulator(ACCOUNT, TOKEN) as emu:
        yield emu


def sdk_client(emu: TwilioRestEmulator, token: str = TOKEN, **kwargs: Any) -> Client:
    client = Client(ACCOUNT, token, **kwargs)
    client.api.base_url = emu.url
    return client


def test_twilio_call_lifecycle_and_sms_with_the_sdk(twilio: TwilioRestEmulator) -> None:
    client = sdk_client(twilio)
    call = client.calls.create(
        to=TO,
        from_=FROM,
        twiml=TWIML,
        status_callback="https://voice.example.test/status",
        status_callback_event=["initiated", "answered", "completed"],
        machine_detection="Enable",
    )
    assert re.fullmatch(r"CA[0-9a-f]{32}", call.sid)
    assert (call.status, call.to, call.from_formatted, call.account_sid) == (
        "queued",
        TO,
        FROM,
        ACCOUNT,
    )
    assert call.date_created is not None

    redirected = client.calls(call.sid).update(twiml="<Response><Say>Bye</Say></Response>")
    assert redirected.status == "queued"
    assert client.calls(call.sid).update(status="completed").status == "completed"
    assert client.calls(call.sid).fetch().status == "completed"

    sms = client.messages.create(to=TO, from_=FROM, body="Your meeting is booked.")
    assert re.fullmatch(r"SM[0-9a-f]{32}", sms.sid)
    assert (sms.status, sms.body) == ("queued", "Your meeting is booked.")

    (recorded,) = twilio.calls
    assert recorded["params"]["Twiml"] == TWIML
    assert recorded["twiml"] == "<Response><Say>Bye</Say></Response>"  # the current TwiML
    assert recorded["status_callback_event"] == ["initiated", "answered", "completed"]
    assert recorded["params"]["MachineDetection"] == "Enable"
    assert [u["params"] for u in twilio.call_updates] == [
        {"Twiml": "<Response><Say>Bye</Say></Response>"},
        {"Status": "completed"},
    ]
    assert twilio.messages[0]["params"]["Body"] == "Your meeting is booked."
    assert [r["status"] for r in twilio.requests] == [201, 200, 200, 200, 201]


def test_twilio_errors_have_twilio_codes(twilio: TwilioRestEmulator) -> None:
    client = sdk_client(twilio)

    def code_of(call: Any) -> tuple[int, int]:
        with pytest.raises(TwilioRestException) as info:
            call()
        return info.value.status, info.value.code

    assert code_of(lambda: client.calls.create(to="12", from_=FROM, twiml=TWIML)) == (400, 21211)
    assert code_of(lambda: client.calls.create(to=TO, from_="", twiml=TWIML)) == (400, 21213)
    assert code_of(lambda: client.calls.create(to=TO, from_=FROM)) == (400, 21205)
    assert code_of(lambda: client.messages.create(to=TO, body="x")) == (400, 21603)
    assert code_of(lambda: client.messages.create(to=TO, from_=FROM)) == (400, 21602)
    unknown = "CA" + "0" * 32
    assert code_of(lambda: client.calls(unknown).update(status="completed")) == (404, 20404)
    forged = sdk_client(twilio, token="wrong")
    assert code_of(lambda: forged.calls.create(to=TO, from_=FROM, twiml=TWIML)) == (401, 20003)

    twilio.fail_next(503, 20503, "Service unavailable")
    with pytest.raises(TwilioRestException) as info:
        client.messages.create(to=TO, from_=FROM, body="hi")
    assert (info.value.status, info.value.code) == (503, 20503)
    assert "Service unavailable" in info.value.msg
    assert client.messages.create(to=TO, from_=FROM, body="hi").status == "queued"
    assert twilio.calls == []


async def test_twilio_async_sdk_client(twilio: TwilioRestEmulator) -> None:
    http_client = AsyncTwilioHttpClient()
    try:
        client = sdk_client(twilio, http_client=http_client)
        call = await client.calls.create_async(to=TO, from_=FROM, url="https://x.test/twiml")
        updated = await client.calls(call.sid).update_async(status="completed")
    finally:
        await http_client.close()
    assert updated.status == "completed"
    assert twilio.calls[0]["url"] == "https://x.test/twiml"


class _WebhookSink(ThreadedServer):
    """Receives form POSTs the way the app's webhook routes would."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[dict[str, str], str]] = []

    def build_app(self) -> Starlette:
        async def hook(request: Request) -> PlainTextResponse:
            form = {k: str(v) for k, v in (await request.form()).items()}
            self.received.append((form, request.headers.get("x-twilio-signature", "")))
            return PlainTextResponse("ok")

        return Starlette(routes=[Route("/status", hook, methods=["POST"])])


async def test_twilio_status_callbacks_are_signed(twilio: TwilioRestEmulator) -> None:
    with _WebhookSink() as sink:
        client = sdk_client(twilio)
        sid = client.calls.create(
            to=TO, from_=FROM, twiml=TWIML, status_callback=sink.url + "/status"
        ).sid
        public = "https://voice.example.test/status"
        assert await twilio.notify_call_status(sid, "ringing") is None  # not subscribed
        response = await twilio.notify_call_status(sid, "completed", signed_url=public)
        assert response is not None and response.status_code == 200
        extra = twilio.call_status_params(sid, "in-progress")
        twilio.post_status_callback(sink.url + "/status", extra)
    (form, signature), (form2, signature2) = sink.received
    assert form["CallSid"] == sid and form["CallStatus"] == "completed"
    assert RequestValidator(TOKEN).validate(public, form, signature)
    assert RequestValidator(TOKEN).validate(sink.url + "/status", form2, signature2)
    assert (twilio.get_call(sid) or {}).get("status") == "completed"


# --- Deepgram listen ------------------------------------------------------------------------


@pytest.fixture
def deepgram() -> Iterator[DeepgramEmulator]:
    with DeepgramEmulator(
        api_key=DG_KEY, listen_script=["hello there friend", "second line"]
    ) as emu:
        yield emu


_dg_http: list[httpx.AsyncClient] = []


def dg_client(emu: DeepgramEmulator, key: str = DG_KEY) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(
        base=emu.url, production=emu.ws_url, agent=emu.ws_url, agent_rest=emu.url
    )
    http = httpx.AsyncClient(timeout=60)
    _dg_http.append(http)
    return AsyncDeepgramClient(api_key=key, environment=env, httpx_client=http)


@pytest.fixture(autouse=True)
async def _close_dg_clients() -> AsyncIterator[None]:
    """Every Deepgram client a test made is closed in that test's loop."""
    yield
    while _dg_http:
        await _dg_http.pop().aclose()


LISTEN = {
    "model": "nova-3",
    "encoding": "mulaw",
    "sample_rate": 8000,
    "interim_results": True,
    "endpointing": 300,
    "utterance_end_ms": 1000,
    "vad_events": True,
}


async def send_audio(conn: Any, audio: bytes, speedup: float = 4.0) -> None:
    """20 ms frames, `speedup` times faster than real time."""
    for i in range(0, len(audio), 160):
        await conn.send_media(audio[i : i + 160])
        await asyncio.sleep(0.02 / speedup)


async def read_all(conn: Any, into: list[Any]) -> None:
    async for message in conn:
        into.append(message)


def kinds(messages: list[Any]) -> list[str]:
    out = []
    for m in messages:
        if m.type == "Results":
            out.append("Final" if m.is_final else "Interim")
        else:
            out.append(m.type)
    return out


async def test_listen_segments_a_tone_burst_into_a_scripted_utterance(
    deepgram: DeepgramEmulator,
) -> None:
    messages: list[Any] = []
    audio = silence(0.3) + tone(0.8) + silence(1.5)
    async with dg_client(deepgram).listen.v1.connect(**LISTEN) as conn:
        reader = asyncio.create_task(read_all(conn, messages))
        await send_audio(conn, audio)
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 10)

    sequence = kinds(messages)
    assert sequence[0] == "SpeechStarted"
    assert sequence[-3:] == ["Final", "UtteranceEnd", "Metadata"]
    assert set(sequence[1:-3]) == {"Interim"}
    assert messages[0].timestamp == pytest.approx(0.3, abs=0.03)
    interims = [m.channel.alternatives[0].transcript for m in messages[1:-3]]
    assert all("hello there friend".startswith(t) and t for t in interims)
    final = messages[-3]
    assert final.is_final and final.speech_final and not final.from_finalize
    alternative = final.channel.alternatives[0]
    assert alternative.transcript == "hello there friend"
    assert [w.word for w in alternative.words] == ["hello", "there", "friend"]
    assert final.start == pytest.approx(0.3, abs=0.03)
    assert final.start + final.duration == pytest.approx(1.1, abs=0.03)
    assert alternative.words[-1].end == pytest.approx(1.1, abs=0.03)
    assert messages[-2].last_word_end == pytest.approx(1.1, abs=0.03)
    assert messages[-1].duration == pytest.approx(len(audio) / 8000)

    async with asyncio.timeout(5):  # recorded by the server thread just after it closes
        await async_wait_until(lambda: deepgram.listen_connections[0].close_reason is not None)
    (record,) = deepgram.listen_connections
    assert record.audio_bytes == len(audio)
    assert record.query["endpointing"] == "300" and record.query["vad_events"] == "true"
    assert record.close_reason == "close_stream"
    assert record.utterances == ["hello there friend"]
    assert [c["type"] for c in record.controls] == ["CloseStream"]


async def test_listen_finalize_flushes_once(deepgram: DeepgramEmulator) -> None:
    messages: list[Any] = []
    params = {**LISTEN, "endpointing": 500}
    async with dg_client(deepgram).listen.v1.connect(**params) as conn:
        reader = asyncio.create_task(read_all(conn, messages))
        # speaker pauses (shorter than endpointing), client finalizes: speech_final
        await send_audio(conn, silence(0.2) + tone(0.5) + silence(0.1))
        await conn.send_finalize()
        await send_audio(conn, silence(0.8))
        # speaker still talking when finalized: not speech_final, and no second final
        await send_audio(conn, tone(0.4))
        await conn.send_finalize()
        await send_audio(conn, tone(0.2) + silence(0.8))
        await conn.send_keep_alive()
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 10)

    finals = [m for m in messages if m.type == "Results" and m.is_final]
    assert [f.channel.alternatives[0].transcript for f in finals] == [
        "hello there friend",
        "second line",
    ]
    assert [(f.from_finalize, f.speech_final) for f in finals] == [(True, True), (True, False)]
    assert kinds(messages).count("SpeechStarted") == 2
    (record,) = deepgram.listen_connections
    assert [c["type"] for c in record.controls] == [
        "Finalize",
        "Finalize",
        "KeepAlive",
        "CloseStream",
    ]


async def test_listen_voice_resuming_just_after_a_finalize_continues_the_line(
    deepgram: DeepgramEmulator,
) -> None:
    """A Finalize at a pause inside a sentence: the line's words go out in that final, the
    rest of the sentence is an empty segment, and the next utterance gets the next line."""
    messages: list[Any] = []
    async with dg_client(deepgram).listen.v1.connect(**LISTEN) as conn:
        reader = asyncio.create_task(read_all(conn, messages))
        await send_audio(conn, silence(0.2) + tone(0.5) + silence(0.2))
        await conn.send_finalize()
        await send_audio(conn, tone(0.4) + silence(1.2) + tone(0.4) + silence(0.8))
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 10)

    finals = [m for m in messages if m.type == "Results" and m.is_final]
    transcripts = [f.channel.alternatives[0].transcript for f in finals]
    assert transcripts == ["hello there friend", "", "second line"]
    assert finals[0].from_finalize and not finals[1].from_finalize
    (record,) = deepgram.listen_connections
    assert record.utterances == ["hello there friend", "", "second line"]


async def test_listen_no_utterance_end_while_a_finalized_voice_goes_on(
    deepgram: DeepgramEmulator,
) -> None:
    """A Finalize while the caller is talking cuts the utterance; the words that follow
    (short gaps only) are still words: UtteranceEnd waits for 1 s after the voice ends."""
    messages: list[Any] = []
    talking = (tone(0.3) + silence(0.08)) * 5
    async with dg_client(deepgram).listen.v1.connect(**LISTEN) as conn:
        reader = asyncio.create_task(read_all(conn, messages))
        await send_audio(conn, silence(0.2) + tone(0.5))
        await conn.send_finalize()
        await send_audio(conn, talking + silence(1.5))
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 10)

    voice_end = 0.7 + len(talking) / 8000 - 0.08
    ends = [m for m in messages if m.type == "UtteranceEnd"]
    assert len(ends) == 1
    assert ends[0].last_word_end == pytest.approx(voice_end, abs=0.03)


async def test_listen_scripts_keyed_by_tag_for_concurrent_calls() -> None:
    script = {"call-a": ["I am caller A."], "call-b": ["I am caller B."], "*": ["Anyone."]}
    with DeepgramEmulator(listen_script=script) as emu:

        async def transcribe(tag: str | None) -> list[str]:
            messages: list[Any] = []
            params = {**LISTEN, "tag": tag} if tag else LISTEN
            async with dg_client(emu).listen.v1.connect(**params) as conn:
                reader = asyncio.create_task(read_all(conn, messages))
                await send_audio(conn, tone(0.3) + silence(0.5), speedup=8)
                await conn.send_close_stream()
                await asyncio.wait_for(reader, 10)
            return [m.channel.alternatives[0].transcript for m in messages if m.type == "Results"]

        a, b, other = await asyncio.gather(
            transcribe("call-a"), transcribe("call-b"), transcribe(None)
        )
    assert (a[-1], b[-1], other[-1]) == ("I am caller A.", "I am caller B.", "Anyone.")
    assert sorted(r.tags[0] if r.tags else "" for r in emu.listen_connections) == [
        "",
        "call-a",
        "call-b",
    ]


async def test_listen_closes_idle_sockets_unless_kept_alive() -> None:
    with DeepgramEmulator(idle_timeout_s=0.4) as emu:
        async with dg_client(emu).listen.v1.connect(**LISTEN) as conn:
            for _ in range(5):
                await conn.send_keep_alive()
                await asyncio.sleep(0.2)
            assert emu.live_listen_count == 1
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
        assert "net0001" in info.value.rcvd.reason.lower()
        (record,) = emu.listen_connections
        assert record.close_reason == "idle_timeout"
        assert [c["type"] for c in record.controls] == ["KeepAlive"] * 5
        assert record.sent == []


async def test_listen_rejects_a_bad_key_and_bad_parameters(deepgram: DeepgramEmulator) -> None:
    with pytest.raises(ApiError) as info:
        async with dg_client(deepgram, key="wrong").listen.v1.connect(**LISTEN):
            pass
    assert info.value.status_code == 401
    with pytest.raises(ApiError) as info:
        async with dg_client(deepgram).listen.v1.connect(**{**LISTEN, "endpointing": "soon"}):
            pass
    assert info.value.status_code == 400
    assert deepgram.listen_connects == 0


async def test_listen_drop_then_refuse_then_reconnect(deepgram: DeepgramEmulator) -> None:
    client = dg_client(deepgram)
    async with client.listen.v1.connect(**LISTEN) as conn:
        await send_audio(conn, silence(0.2))
        await async_wait_until(lambda: deepgram.listen_connections[0].audio_bytes == 1600)
        assert deepgram.drop_listen_connections(refuse_for_s=0.5) == 1
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(conn.recv(), 5)
        assert info.value.rcvd is None  # no close frame: a network drop
    with pytest.raises(ApiError) as refused:
        async with client.listen.v1.connect(**LISTEN):
            pass
    assert refused.value.status_code == 503
    await asyncio.sleep(0.6)
    async with client.listen.v1.connect(**LISTEN) as conn:
        await conn.send_close_stream()
        assert (await asyncio.wait_for(conn.recv(), 5)).type == "Metadata"
    # the server thread records the close just after sending Metadata
    async with asyncio.timeout(5):
        await async_wait_until(lambda: deepgram.listen_connections[-1].close_reason is not None)
    records = deepgram.listen_connections
    assert [r.close_reason for r in records] == ["dropped", "close_stream"]
    assert (deepgram.listen_connects, deepgram.listen_refused) == (2, 1)


# --- Deepgram speak -------------------------------------------------------------------------


async def speak(emu: DeepgramEmulator, text: str, **params: Any) -> bytes:
    options = {"model": "aura-2-thalia-en", "encoding": "mulaw", "sample_rate": 8000}
    options.update(params)
    audio = b""
    async for chunk in dg_client(emu).speak.v1.audio.generate(text=text, **options):
        audio += chunk
    return audio


async def test_speak_rest_returns_non_silent_audio_sized_by_text(
    deepgram: DeepgramEmulator,
) -> None:
    short, long = "Hello.", "Hello, this is Acme calling about your demo request."
    raw_short = await speak(deepgram, short, container="none")
    raw_long = await speak(deepgram, long, container="none")
    assert len(raw_short) == expected_tts_bytes(short) == round(len(short) * 65 * 8)
    assert len(raw_long) == expected_tts_bytes(long)
    assert rms(raw_long) > 1000

    wav = await speak(deepgram, short, container="wav")
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    fmt_code, channels, rate = struct.unpack("<HHI", wav[20:28])
    assert (fmt_code, channels, rate) == (7, 1, 8000)
    assert wav[44:] == raw_short
    assert await speak(deepgram, short) == wav  # mulaw defaults to a WAV container

    with pytest.raises(ApiError) as info:
        await speak(deepgram, short, encoding="opus", container="none")
    assert info.value.status_code == 400
    assert deepgram.speak_texts == [short, long, short, short]


async def test_speak_rest_faults(deepgram: DeepgramEmulator) -> None:
    deepgram.fail_next_speak(1, status=503)
    with pytest.raises(ApiError) as info:
        await speak(deepgram, "Hi.", container="none")
    assert info.value.status_code == 503

    text = "A long enough answer to be cut off in the middle of streaming."
    deepgram.drop_next_speak(after_bytes=3200)
    received = 0
    # the body ends short of its chunked framing: ReadError on aiohttp's transport (the
    # SDK's default client once httpx-aiohttp is installed), RemoteProtocolError on httpx's
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        async for chunk in dg_client(deepgram).speak.v1.audio.generate(
            text=text, encoding="mulaw", sample_rate=8000, container="none"
        ):
            received += len(chunk)
    assert 3200 <= received < expected_tts_bytes(text)
    assert len(await speak(deepgram, "Hi.", container="none")) == expected_tts_bytes("Hi.")


async def test_speak_websocket_flush_and_clear(deepgram: DeepgramEmulator) -> None:
    from deepgram.speak.v1.types import SpeakV1Text

    params = {"model": "aura-2-thalia-en", "encoding": "mulaw", "sample_rate": 8000}
    audio, events = 0, []
    async with dg_client(deepgram).speak.v1.connect(**params) as tts:
        await tts.send_text(SpeakV1Text(type="Speak", text="Sure, "))
        await tts.send_text(SpeakV1Text(type="Speak", text="one moment."))
        await tts.send_flush()
        async for message in tts:
            if isinstance(message, bytes):
                audio += len(message)
                continue
            events.append((message.type, getattr(message, "sequence_id", None)))
            if message.type == "Flushed":
                break
        assert audio == expected_tts_bytes("Sure, one moment.")

        await tts.send_text(SpeakV1Text(type="Speak", text="word " * 200))
        await tts.send_flush()
        cut = 0
        async for message in tts:
            if isinstance(message, bytes):
                cut += len(message)
                if cut >= 1600:
                    await tts.send_clear()
                continue
            events.append((message.type, getattr(message, "sequence_id", None)))
            if message.type == "Cleared":
                break
        await tts.send_close()
    assert events == [("Metadata", None), ("Flushed", 0), ("Cleared", 2)]
    assert cut < expected_tts_bytes("word " * 200)
    requests = deepgram.speak_requests
    assert [r.text for r in requests] == ["Sure, one moment.", "word " * 200]
    assert requests[1].cancelled and requests[0].transport == "ws"


# --- Ollama ---------------------------------------------------------------------------------


@pytest.fixture
def ollama() -> Iterator[OllamaEmulator]:
    replies = [
        "Hi! Is now a good time?",
        Reply("Let me book that.", tool_calls=[{"name": "book_meeting", "arguments": {"t": 9}}]),
    ]
    with OllamaEmulator(replies=replies, ttft_ms=30, tokens_per_s=200) as emu:
        yield emu


def ollama_client(emu: OllamaEmulator, timeout: float = 5.0) -> AsyncClient:
    return AsyncClient(host=emu.url, timeout=httpx.Timeout(timeout, connect=2))


USER = {"role": "user", "content": "hello"}


async def chat_parts(client: AsyncClient, messages: list[dict], **kwargs: Any) -> list[Any]:
    stream = await client.chat(model="llama3.2", messages=messages, stream=True, **kwargs)
    return [part async for part in stream]


async def test_ollama_streams_scripted_text_and_tool_calls(ollama: OllamaEmulator) -> None:
    client = ollama_client(ollama)
    parts = await chat_parts(client, [USER])
    assert [p.message.content for p in parts[:-1]] == split_tokens("Hi! Is now a good time?")
    assert "".join(p.message.content for p in parts) == "Hi! Is now a good time?"
    final = parts[-1]
    assert final.done and final.done_reason == "stop" and final.eval_count == 6
    assert all(not p.done for p in parts[:-1])

    second_turn = [USER, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "9"}]
    parts = await chat_parts(client, second_turn, tools=[])
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("book_meeting", {"t": 9})
    ]
    assert "".join(p.message.content for p in parts) == "Let me book that."
    assert ollama.request_bodies[1]["messages"] == second_turn
    assert [r.status for r in ollama.requests] == ["completed", "completed"]

    whole = await client.chat(model="llama3.2:latest", messages=[USER], stream=False)
    assert whole.message.content == "Hi! Is now a good time?" and whole.done


async def test_ollama_json_format(ollama: OllamaEmulator) -> None:
    ollama.set_replies([Reply(json={"outcome": "booked", "score": 4})])
    response = await ollama_client(ollama).chat(
        model="llama3.2", messages=[USER], stream=False, format={"type": "object"}
    )
    assert json.loads(response.message.content or "") == {"outcome": "booked", "score": 4}


async def test_ollama_errors(ollama: OllamaEmulator) -> None:
    client = ollama_client(ollama)
    with pytest.raises(ResponseError) as info:
        stream = await client.chat(model="nope", messages=[USER], stream=True)
        async for _ in stream:
            pass
    assert info.value.status_code == 404 and "not found" in info.value.error

    ollama.set_fault("http500", count=1)
    with pytest.raises(ResponseError) as info:
        await chat_parts(client, [USER])
    assert info.value.status_code == 500

    ollama.set_fault("midstream_error", count=1)
    seen: list[str] = []
    with pytest.raises(ResponseError) as info:
        stream = await client.chat(model="llama3.2", messages=[USER], stream=True)
        async for part in stream:
            seen.append(part.message.content or "")
    assert info.value.status_code == -1
    assert seen == split_tokens("Hi! Is now a good time?")[:3]
    assert len(await chat_parts(client, [USER])) == 7  # faults were for one request each


async def test_ollama_stall_and_cancellation_stop_generation(ollama: OllamaEmulator) -> None:
    ollama.set_fault("stall", count=1)
    with pytest.raises(httpx.ReadTimeout):
        await chat_parts(ollama_client(ollama, timeout=0.3), [USER])
    await async_wait_until(lambda: ollama.cancellations == 1)
    assert ollama.active_generations == 0

    ollama.set_replies(["word " * 400])
    ollama.config.tokens_per_s = 50
    received: list[str] = []

    async def consume() -> None:
        stream = await ollama_client(ollama).chat(model="llama3.2", messages=[USER], stream=True)
        async for part in stream:
            received.append(part.message.content or "")

    task = asyncio.create_task(consume())
    await async_wait_until(lambda: len(received) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await async_wait_until(lambda: ollama.cancellations == 2)
    assert ollama.active_generations == 0
    record = ollama.requests[-1]
    assert record.status == "cancelled" and 3 <= record.tokens_sent < 400


async def test_ollama_tags_version_show(ollama: OllamaEmulator) -> None:
    client = ollama_client(ollama)
    assert [m.model for m in (await client.list()).models] == ["llama3.2:latest"]
    details = (await client.show("llama3.2")).details
    assert details is not None and details.family == "llama"
    async with httpx.AsyncClient(base_url=ollama.url) as http:
        assert (await http.get("/api/version")).json() == {"version": "0.12.3"}
        assert (await http.post("/api/show", json={"model": "x"})).status_code == 404


# --- /emulator/timings ---------------------------------------------------------------------


async def timings(emu: ThreadedServer, **params: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=emu.url, timeout=5) as http:
        response = await http.get(TIMINGS_PATH, params=params)
        response.raise_for_status()
        return dict(response.json())


async def test_timings_show_each_request_late_by_at_least_its_configured_delay(
    ollama: OllamaEmulator, deepgram: DeepgramEmulator
) -> None:
    ollama.config.ttft_ms = 80
    deepgram.config.tts_first_byte_ms = 60
    started = time.monotonic()
    await chat_parts(ollama_client(ollama), [USER])
    await speak(deepgram, "Hello.", container="none")
    done = time.monotonic()

    [llm] = (await timings(ollama))["llm"]
    [tts] = (await timings(deepgram))["tts"]
    assert set(await timings(ollama)) == {"llm"} and set(await timings(deepgram)) == {"tts"}
    assert llm["configured_ms"] == 80 and tts["configured_ms"] == 60
    for row in (llm, tts):
        assert started < row["received"] < row["first"] < done
        # libuv's timers count whole milliseconds, so a sleep may end up to 1 ms early
        assert (row["first"] - row["received"]) * 1000 >= row["configured_ms"] - 1

    # a second request each; `since` keeps only what was received after it
    await chat_parts(ollama_client(ollama), [USER])
    await speak(deepgram, "Again.", container="none")
    assert len((await timings(ollama, since=started))["llm"]) == 2
    [newer_llm] = (await timings(ollama, since=llm["received"]))["llm"]
    [newer_tts] = (await timings(deepgram, since=tts["received"]))["tts"]
    assert newer_llm["received"] > llm["first"] and newer_tts["received"] > tts["first"]
    assert (await timings(deepgram, since=time.monotonic()))["tts"] == []
    assert (await timings(deepgram, since=started, until=done))["tts"] == [tts]

    # requests that sent nothing (a failed speak, a non-streamed chat) are not timed
    deepgram.fail_next_speak(1, status=503)
    with pytest.raises(ApiError):
        await speak(deepgram, "Hi.", container="none")
    await ollama_client(ollama).chat(model="llama3.2", messages=[USER], stream=False)
    assert len((await timings(deepgram))["tts"]) == 2
    assert len((await timings(ollama))["llm"]) == 2
    async with httpx.AsyncClient(base_url=ollama.url) as http:
        assert (await http.get(TIMINGS_PATH, params={"since": "x"})).status_code == 400


# --- TwilioCaller ---------------------------------------------------------------------------


def media(stream_sid: str, audio: bytes) -> str:
    payload = base64.b64encode(audio).decode()
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})


def control(stream_sid: str, event: str, **body: Any) -> str:
    return json.dumps({"event": event, "streamSid": stream_sid, **body})


class MediaStreamApp:
    """A tiny app side of a Media Stream: records what the caller sends, and plays a
    script of outbound messages triggered by the caller's own events."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.headers: dict[str, str] = {}
        self.loop = asyncio.get_running_loop()
        self.first_speech_at: float | None = None

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.headers = dict(ws.request.headers)
        async for raw in ws:
            message = json.loads(raw)
            self.messages.append(message)
            await self.on_message(ws, message)

    async def on_message(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        pass


@pytest.fixture
async def serve_app() -> AsyncIterator[Any]:
    servers = []

    async def start(app: MediaStreamApp) -> str:
        server = await serve(app.handler, "127.0.0.1", 0)
        servers.append(server)
        return f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/media"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


class PlaybackApp(MediaStreamApp):
    """Greets with 0.5 s + mark, then after that mark queues 2 s + mark and clears 0.3 s
    later."""

    async def on_message(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        sid = message.get("streamSid", "")
        if message["event"] == "start":
            await ws.send(media(sid, tone(0.5)))
            await ws.send(control(sid, "mark", mark={"name": "greeting"}))
        elif message["event"] == "mark" and message["mark"]["name"] == "greeting":
            for i in range(0, 16000, 160):
                await ws.send(media(sid, tone(2.0)[i : i + 160]))
            await ws.send(control(sid, "mark", mark={"name": "answer"}))
            await asyncio.sleep(0.3)
            await ws.send(control(sid, "clear"))


async def test_caller_plays_in_real_time_and_honours_marks_and_clear(serve_app: Any) -> None:
    app = PlaybackApp()
    url = await serve_app(app)
    public = "wss://voice.example.test/media"
    caller = TwilioCaller(
        url,
        [Say(0.1, tone(0.2), "hi"), Dtmf(0.3, "7"), Hangup(1.5)],
        auth_token=TOKEN,
        signed_url=public,
        custom_parameters={"lead_id": "42"},
    )
    result = await asyncio.wait_for(caller.run(), 10)

    assert RequestValidator(TOKEN).validate(public, {}, app.headers["x-twilio-signature"])
    connected, start = app.messages[:2]
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["start"]["customParameters"] == {"lead_id": "42"}
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }
    assert re.fullmatch(r"MZ[0-9a-f]{32}", start["streamSid"])
    assert re.fullmatch(r"CA[0-9a-f]{32}", start["start"]["callSid"])
    sequence = [int(m["sequenceNumber"]) for m in app.messages[1:]]
    assert sequence == list(range(1, len(sequence) + 1))
    inbound = [m for m in app.messages if m["event"] == "media"]
    assert [int(m["media"]["chunk"]) for m in inbound] == list(range(1, len(inbound) + 1))
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in inbound)
    spoken = [
        i for i, m in enumerate(inbound) if rms(base64.b64decode(m["media"]["payload"])) > 500
    ]
    assert spoken == list(range(5, 15))  # 0.1 s to 0.3 s
    assert [m["dtmf"]["digit"] for m in app.messages if m["event"] == "dtmf"] == ["7"]
    assert app.messages[-1]["event"] == "stop"
    assert app.messages[-1]["stop"]["callSid"] == start["start"]["callSid"]

    greeting, answer = result.marks
    assert (greeting.name, greeting.cleared, answer.name, answer.cleared) == (
        "greeting",
        False,
        "answer",
        True,
    )
    (spurt,) = result.talkspurts  # the answer follows the greeting without a gap
    assert greeting.echoed is not None and greeting.echoed >= spurt.start + 0.5 - 0.001
    (clear_at,) = result.clears
    assert answer.echoed == clear_at and spurt.end == pytest.approx(clear_at)
    assert result.bytes_received == 4000 + 16000
    assert 0 < result.bytes_discarded < 16000
    assert result.bytes_played == 20000 - result.bytes_discarded
    assert spurt.bytes == result.bytes_played
    # the answer starts when the greeting has played or when it arrives, whichever is later
    answer_start = max(result.media[1][0], spurt.start + 0.5)
    assert result.bytes_played == pytest.approx(4000 + (clear_at - answer_start) * 8000, abs=2)
    assert result.ended_by == "hangup" and result.errors == []
    assert [s.label for s in result.speech] == ["hi"]
    assert result.greeting_latency == spurt.start


class BargeInApp(MediaStreamApp):
    """Talks for 2 s; clears as soon as a caller frame is loud; closes on the next mark."""

    async def on_message(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        sid = message.get("streamSid", "")
        if message["event"] == "start":
            await ws.send(media(sid, tone(2.0)))
            await ws.send(control(sid, "mark", mark={"name": "long"}))
        elif message["event"] == "media" and self.first_speech_at is None:
            if rms(base64.b64decode(message["media"]["payload"])) > 500:
                self.first_speech_at = self.loop.time()
                await ws.send(control(sid, "clear"))
        elif message["event"] == "mark":
            await ws.close()


async def test_caller_barges_in_relative_to_agent_audio(serve_app: Any) -> None:
    app = BargeInApp()
    url = await serve_app(app)
    timeline = [SayAfterAgentAudio(1, 0.4, tone(0.3), "stop please")]
    result = await asyncio.wait_for(TwilioCaller(url, timeline).run(), 10)

    (spurt,) = result.talkspurts
    (speech,) = result.speech
    assert speech.start == pytest.approx(spurt.start + 0.4, abs=0.021)
    (barge_in,) = result.barge_in_latencies()
    assert barge_in is not None and barge_in >= 0
    assert result.marks[0].cleared
    assert result.ended_by == "server"
    assert result.bytes_discarded > 0
    assert result.turn_latencies() == [None]


async def test_caller_reports_rejected_upgrade() -> None:
    async def reject(connection: ServerConnection, request: Any) -> Any:
        return connection.respond(403, "forbidden\n")

    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=reject) as server:
        port = server.sockets[0].getsockname()[1]
        result = await TwilioCaller(f"ws://127.0.0.1:{port}/media").run()
    assert result.ended_by == "connect_error"
    assert "403" in result.errors[0]


# --- python -m emulators --------------------------------------------------------------------


def test_main_builds_emulators_from_flags_and_config(tmp_path: Any) -> None:
    config = tmp_path / "emulators.json"
    config.write_text(json.dumps({"ollama": {"replies": ["From the file."], "ttft_ms": 5}}))
    ports = ["--twilio-port", "0", "--deepgram-port", "0", "--ollama-port", "0"]
    args = parse_args([*ports, "--config", str(config), "--listen-line", "Yes."])
    emulators = build(args)
    try:
        for emu in emulators.values():
            emu.start()
        body = {"model": "llama3.2", "messages": [USER], "stream": False}
        reply = httpx.post(emulators["ollama"].url + "/api/chat", json=body, timeout=5).json()
        assert reply["message"]["content"] == "From the file."
        assert emulators["deepgram"].config.listen_script == ["Yes."]
        assert emulators["ollama"].config.ttft_ms == 5
    finally:
        stop_all(list(emulators.values()))
    assert not any(emu.running for emu in emulators.values())
