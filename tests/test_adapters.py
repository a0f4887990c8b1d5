"""Vendor adapters against the wire emulators, with the real deepgram-sdk and ollama clients.

Times asserted are audio time (bytes sent / 8000), never wall-clock speed. "Speech" is a
numpy tone burst: the Deepgram emulator segments by energy and gives each utterance the
next line of its script.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deepgram.core.unchecked_base_model import construct_type
from deepgram.listen.v1.socket_client import V1SocketClientResponse

from adapters.deepgram import listen_messages
from adapters.deepgram_stt import DeepgramStream, DeepgramSTT, StreamPolicy
from adapters.deepgram_tts import DeepgramStreamingTTS, DeepgramTTS
from adapters.http import provider_http_transport
from adapters.ollama import OllamaLLM
from config import Settings
from emulators.base import async_wait_until
from emulators.deepgram import DeepgramEmulator, ListenRecord, expected_tts_bytes
from emulators.ollama import OllamaEmulator, Reply
from pipeline.providers import (
    LLMDelta,
    LLMError,
    LLMModelNotFound,
    LLMTimeout,
    LLMUnavailable,
    SpeechStarted,
    STTError,
    STTEvent,
    ToolCall,
    Transcript,
    TTSError,
    UtteranceEnd,
)
from tests.conftest import make_settings
from utils import mulaw_encode

DG_KEY = "dg-test-key"
FRAME = 160
"""Twilio's 20 ms mu-law frame."""
PACE_S = 0.005
"""Wall-clock gap between 20 ms frames: audio flows at 4x real time."""
TIME_TOLERANCE = 0.05


# --- audio -----------------------------------------------------------------------------------


def tone(seconds: float, freq: float = 440.0, level: float = 0.3) -> bytes:
    t = np.arange(int(seconds * 8000)) / 8000
    return mulaw_encode(np.round(level * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16))


def silence(seconds: float) -> bytes:
    return mulaw_encode(np.zeros(int(seconds * 8000), dtype=np.int16))


async def stream_audio(stream: DeepgramStream, audio: bytes, pace_s: float = PACE_S) -> None:
    for i in range(0, len(audio), FRAME):
        await stream.send_audio(audio[i : i + FRAME])
        await asyncio.sleep(pace_s)


async def closed_listens(deepgram: DeepgramEmulator) -> list[ListenRecord]:
    """The listen connections once the emulator's server thread has recorded how each one
    closed: it does so just after the socket closes, so the client can be first."""
    async with asyncio.timeout(5):
        await async_wait_until(
            lambda: all(r.close_reason is not None for r in deepgram.listen_connections)
        )
    return deepgram.listen_connections


async def collect(
    stream: DeepgramStream, until: Callable[[STTEvent], bool], limit_s: float = 5.0
) -> list[STTEvent]:
    events: list[STTEvent] = []
    async with asyncio.timeout(limit_s), contextlib.aclosing(stream.events()) as iterator:
        async for event in iterator:
            events.append(event)
            if until(event):
                return events
    raise AssertionError(f"stream ended before the expected event: {events}")


def is_speech_final(event: STTEvent) -> bool:
    return isinstance(event, Transcript) and event.speech_final


def finals(events: list[STTEvent]) -> list[Transcript]:
    return [e for e in events if isinstance(e, Transcript) and e.is_final]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def no_tasks_left() -> AsyncIterator[None]:
    """Stricter than the shared leak guard: no grace period. Each adapter must have stopped
    every task it started by the time its context, generator or call has ended.

    The one exception is the loop's own `aclose()` of async generators abandoned *inside*
    httpx/ollama/deepgram after the response was closed (e.g. `aiter_lines()` left behind
    when an error line ends ollama's stream): those must merely finish promptly."""
    yield
    for _ in range(3):  # let already-finished tasks run their done-callbacks
        await asyncio.sleep(0)
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    ours = [t for t in left if type(t.get_coro()).__name__ != "async_generator_athrow"]
    assert not ours, f"tasks left running: {ours}"
    if left:
        _, pending = await asyncio.wait(left, timeout=1.0)
        assert not pending, f"generator finalizers stuck: {pending}"


@pytest.fixture
def deepgram() -> Iterator[DeepgramEmulator]:
    with DeepgramEmulator(api_key=DG_KEY, tts_first_byte_ms=20, tts_speed=50.0) as emulator:
        yield emulator


@pytest.fixture
def ollama_emu() -> Iterator[OllamaEmulator]:
    with OllamaEmulator(ttft_ms=20, tokens_per_s=400) as emulator:
        yield emulator


def dg_settings(tmp_path: Path, emulator: DeepgramEmulator, **overrides: object) -> Settings:
    values = {"DEEPGRAM_BASE_URL": emulator.url, "DEEPGRAM_API_KEY": DG_KEY, **overrides}
    return make_settings(tmp_path, **values)


TTSAdapter = DeepgramTTS | DeepgramStreamingTTS


@pytest.fixture(params=["rest", "ws"])
async def tts(
    request: pytest.FixtureRequest, tmp_path: Path, deepgram: DeepgramEmulator
) -> AsyncIterator[TTSAdapter]:
    """Each text-to-speech test runs on both transports, against the same emulator."""
    settings = dg_settings(tmp_path, deepgram)
    adapter: TTSAdapter = (
        DeepgramTTS(settings) if request.param == "rest" else DeepgramStreamingTTS(settings)
    )
    yield adapter
    await adapter.aclose()


@pytest.fixture
async def ws_tts(tmp_path: Path, deepgram: DeepgramEmulator) -> AsyncIterator[DeepgramStreamingTTS]:
    """A small pool without spares, so which socket serves a request is deterministic."""
    adapter = DeepgramStreamingTTS(
        dg_settings(tmp_path, deepgram), max_sockets=2, flush_limit=3, spare_sockets=0
    )
    yield adapter
    await adapter.aclose()


def llm_for(tmp_path: Path, host: str, **overrides: object) -> OllamaLLM:
    return OllamaLLM(make_settings(tmp_path, OLLAMA_HOST=host, **overrides))


@pytest.fixture
async def llm(tmp_path: Path, ollama_emu: OllamaEmulator) -> AsyncIterator[OllamaLLM]:
    adapter = llm_for(tmp_path, ollama_emu.url, OLLAMA_FIRST_TOKEN_TIMEOUT_S=0.5)
    yield adapter
    await adapter.aclose()


# --- speech to text --------------------------------------------------------------------------


async def test_stt_speech_gives_onset_interims_final_and_utterance_end(tmp_path, deepgram):
    deepgram.set_listen_script(["Hi, this is Sam."])
    clock = itertools.count(1000).__next__
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), clock=clock)
    async with stt.open(language="en-US", tag="call-1") as stream:
        await stream_audio(stream, silence(0.3) + tone(1.0) + silence(1.5))
        events = await collect(stream, lambda e: isinstance(e, UtteranceEnd))

    kinds = [type(e) for e in events]
    onset, utterance_end = events[0], events[-1]
    assert isinstance(onset, SpeechStarted) and isinstance(utterance_end, UtteranceEnd)
    assert onset.timestamp == pytest.approx(0.3, abs=TIME_TOLERANCE)
    interims = [e for e in events if isinstance(e, Transcript) and not e.is_final]
    assert interims and all(e.text for e in interims)
    (final,) = finals(events)
    assert (final.text, final.speech_final, final.from_finalize) == (
        "Hi, this is Sam.",
        True,
        False,
    )
    assert final.start == pytest.approx(0.3, abs=TIME_TOLERANCE)
    assert final.end == pytest.approx(1.3, abs=TIME_TOLERANCE)
    assert kinds.index(Transcript) < kinds.index(UtteranceEnd) == len(events) - 1
    assert utterance_end.last_word_end == pytest.approx(1.3, abs=TIME_TOLERANCE)
    received = [e.received_at for e in events]
    assert received == sorted(received) and received[0] >= 1000  # the injected clock

    (record,) = await closed_listens(deepgram)
    assert record.query == {
        "model": "nova-3",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "channels": "1",
        "language": "en-US",
        "interim_results": "true",
        "endpointing": "300",
        "utterance_end_ms": "1000",
        "vad_events": "true",
        "smart_format": "true",
        "punctuate": "true",
        "tag": "call-1",
    }
    assert record.close_reason == "close_stream"
    assert record.audio_bytes == len(silence(0.3) + tone(1.0) + silence(1.5))
    assert stream.reconnects == 0


class _Frames:
    """An async iterable of fixed items: a listen socket's frames, or an SDK connection's
    parsed models."""

    def __init__(self, items: list[Any], raw: _Frames | None = None) -> None:
        self._items = items
        if raw is not None:
            self._websocket = raw

    async def __aiter__(self) -> AsyncIterator[Any]:
        for item in self._items:
            yield item


RESULTS = {
    "type": "Results",
    "start": 1.5,
    "duration": 0.5,
    "is_final": True,
    "speech_final": False,
    "from_finalize": True,
    "channel": {"alternatives": [{"transcript": "Tuesday works.", "confidence": 0.9}]},
}


async def test_stt_messages_parse_the_raw_socket_and_skip_what_is_not_a_json_object():
    raw = _Frames([b"\x00binary", "not json", "[1, 2]", json.dumps(RESULTS)])
    messages = [m async for m in listen_messages(_Frames(["never read"], raw=raw))]
    assert messages == [RESULTS]


async def test_stt_messages_fall_back_to_the_sdks_models_without_a_raw_socket():
    model = construct_type(type_=V1SocketClientResponse, object_=RESULTS)
    (message,) = [m async for m in listen_messages(_Frames([model]))]
    alternative = message["channel"]["alternatives"][0]
    assert (message["type"], message["from_finalize"], message["start"]) == ("Results", True, 1.5)
    assert alternative["transcript"] == "Tuesday works."


async def test_stt_finalize_flushes_an_open_utterance(tmp_path, deepgram):
    deepgram.set_listen_script(["Tuesday works."])
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram))
    async with stt.open(language="en-US") as stream:
        await stream_audio(stream, silence(0.2) + tone(0.6))
        await stream.finalize()
        events = await collect(stream, lambda e: isinstance(e, Transcript) and e.is_final)

    final = events[-1]
    assert isinstance(final, Transcript)
    assert (final.text, final.from_finalize) == ("Tuesday works.", True)
    (record,) = await closed_listens(deepgram)
    assert [c["type"] for c in record.controls] == ["Finalize", "CloseStream"]
    assert record.controls[0]["audio_time"] == pytest.approx(0.8)  # all audio went first


async def test_stt_sends_whole_batches_and_finalize_sends_the_rest(tmp_path, deepgram):
    """The pipeline calls `send_pending()` every time its VAD has work, many times per
    batch: only a whole batch goes out then; Finalize takes a partial one."""
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), policy=StreamPolicy(batch_ms=200))
    audio = tone(0.26)  # 13 frames: one whole batch of 10, then 3
    async with stt.open(language="en-US") as stream:
        await stream.wait_connected()
        for i in range(0, len(audio), FRAME):
            stream.push_audio(audio[i : i + FRAME])
            await stream.send_pending()
        await asyncio.sleep(0.2)
        (record,) = deepgram.listen_connections
        assert (record.audio_messages, record.audio_bytes) == (1, 1600)
        await stream.finalize()
        await async_wait_until(lambda: deepgram.listen_connections[0].controls)

    (record,) = deepgram.listen_connections
    assert (record.audio_messages, record.audio_bytes) == (2, len(audio))
    assert record.controls[0]["type"] == "Finalize"
    assert record.controls[0]["audio_time"] == pytest.approx(0.26)


async def test_stt_batches_larger_while_the_caller_is_quiet_and_sends_at_speech_onset(
    tmp_path, deepgram
):
    policy = StreamPolicy(batch_ms=100, quiet_batch_ms=300)
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), policy=policy)
    frames = [tone(0.02)[:FRAME]] * 40

    async def push(count: int) -> None:
        for frame in frames[:count]:
            stream.push_audio(frame)
            await stream.send_pending()

    def sent() -> int:
        return deepgram.listen_connections[0].audio_bytes

    async with stt.open(language="en-US") as stream:
        await stream.wait_connected()
        await push(14)  # quiet from the start: one 300 ms batch (15 frames) not yet whole
        await asyncio.sleep(0.1)
        assert sent() == 0
        stream.caller_speaking(True)  # the onset: the 14 buffered frames go at once
        await stream.send_pending()
        await async_wait_until(lambda: sent() == 14 * FRAME)
        await push(5)  # speaking: 100 ms batches
        await async_wait_until(lambda: sent() == 19 * FRAME)
        stream.caller_speaking(False)
        await push(14)
        await asyncio.sleep(0.1)
        assert sent() == 19 * FRAME  # quiet again: 14 frames wait for the 15th
        await push(1)
        await async_wait_until(lambda: sent() == 34 * FRAME)

    assert deepgram.listen_connections[0].audio_messages == 3


async def test_stt_keepalive_only_while_audio_pauses(tmp_path, deepgram):
    deepgram.config.idle_timeout_s = 1.0
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), policy=StreamPolicy(keepalive_s=0.3))
    async with stt.open(language="en-US") as stream:
        await stream.wait_connected()
        await stream_audio(stream, silence(1.2), pace_s=0.02)  # real time, longer than 0.3 s
        await asyncio.sleep(1.6)  # longer than the emulator's idle timeout
        await stream_audio(stream, silence(0.2))
        assert stream.connected

    (record,) = await closed_listens(deepgram)
    keepalives = [c for c in record.controls if c["type"] == "KeepAlive"]
    assert len(keepalives) >= 3
    assert {c["audio_time"] for c in keepalives} == {1.2}  # none while audio flowed
    assert record.close_reason == "close_stream"
    assert stream.reconnects == 0


async def test_stt_reconnects_after_drop_and_replays_the_gap(tmp_path, deepgram):
    deepgram.set_listen_script(["Before the drop."])
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram))
    before = silence(0.2) + tone(0.8) + silence(0.6)
    gap = silence(0.3) + tone(0.8) + silence(0.8)
    async with stt.open(language="en-US") as stream:
        await stream_audio(stream, before)
        first = await collect(stream, is_speech_final)

        deepgram.set_listen_script(["After the drop."])
        # refused for longer than sending the gap takes (95 paced frames, ~0.5-0.6 s), so
        # the gap is certainly sent while disconnected, however the backoff falls
        assert deepgram.drop_listen_connections(refuse_for_s=1.2) == 1
        await async_wait_until(lambda: not stream.connected)
        await stream_audio(stream, gap)  # sent while Deepgram refuses us
        assert not stream.connected
        second = await collect(stream, is_speech_final)
        assert stream.reconnects == 1

    assert finals(first)[-1].text == "Before the drop."
    speech_started = [e for e in second if isinstance(e, SpeechStarted)]
    after = finals(second)[-1]
    assert after.text == "After the drop."
    # on the call's timeline, not the new socket's: the burst began 0.3 s into the gap
    onset = len(before) / 8000 + 0.3
    assert speech_started[0].timestamp == pytest.approx(onset, abs=TIME_TOLERANCE)
    assert after.start == pytest.approx(onset, abs=TIME_TOLERANCE)
    assert after.end == pytest.approx(onset + 0.8, abs=TIME_TOLERANCE)

    dropped, resumed = await closed_listens(deepgram)
    assert dropped.close_reason == "dropped"
    assert resumed.close_reason == "close_stream"
    assert deepgram.listen_refused >= 1  # it backed off and retried
    assert dropped.audio_bytes + resumed.audio_bytes == len(before) + len(gap)
    assert stream.dropped_audio_bytes == 0


async def test_stt_reconnects_after_a_server_close_frame(tmp_path, deepgram):
    """Deepgram's idle timeout (NET-0001) closes with a close frame, not a TCP reset."""
    deepgram.config.idle_timeout_s = 0.3
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), policy=StreamPolicy(keepalive_s=60))
    async with stt.open(language="en-US") as stream:
        await async_wait_until(lambda: stream.reconnects == 1)

    assert (await closed_listens(deepgram))[0].close_reason == "idle_timeout"


async def test_stt_bounded_replay_drops_and_counts_old_audio(tmp_path, deepgram):
    policy = StreamPolicy(buffer_s=0.5)
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), policy=policy)
    async with stt.open(language="en-US") as stream:
        await stream.wait_connected()
        deepgram.drop_listen_connections(refuse_for_s=0.3)
        await async_wait_until(lambda: not stream.connected)
        await stream_audio(stream, silence(1.5), pace_s=0)
        await stream.wait_connected()
        await stream.finalize()
        events = await collect(stream, lambda e: isinstance(e, Transcript) and e.from_finalize)

    # the replayed 0.5 s sits at 1.0-1.5 s of the call: the dropped second is not squeezed out
    assert events[-1] == Transcript(  # empty finals are delivered too
        "",
        is_final=True,
        speech_final=False,
        start=1.5,
        end=1.5,
        from_finalize=True,
        received_at=events[-1].received_at,
    )
    assert stream.reconnects == 1
    assert stream.dropped_audio_bytes == 8000
    assert deepgram.listen_connections[-1].audio_bytes == 4000


async def test_stt_gives_up_after_the_outage_budget(tmp_path, deepgram):
    policy = StreamPolicy(give_up_after_s=0.5, max_backoff_s=0.2)
    deepgram.refuse_listen(30)
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram), policy=policy)
    async with stt.open(language="en-US") as stream:
        await stream.send_audio(silence(0.1))  # buffered, never sent
        with pytest.raises(STTError):
            await collect(stream, lambda e: False)
        with pytest.raises(STTError):  # and it stays failed
            await collect(stream, lambda e: False)
    assert deepgram.listen_refused >= 3


async def test_stt_rejected_key_fails_without_retrying(tmp_path, deepgram):
    stt = DeepgramSTT(dg_settings(tmp_path, deepgram, DEEPGRAM_API_KEY="wrong-key"))
    async with stt.open(language="en-US") as stream:
        with pytest.raises(STTError, match="401"):
            await collect(stream, lambda e: False)
    assert deepgram.listen_connects == 0


async def test_stt_close_while_connecting_leaves_no_task(tmp_path):
    """A server that accepts TCP but never answers the upgrade: exiting (or cancelling) the
    stream mid-handshake must stop everything (the autouse leak check verifies it)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client gives up and half-closes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stt = DeepgramSTT(make_settings(tmp_path, DEEPGRAM_BASE_URL=f"http://127.0.0.1:{port}"))

    async with stt.open(language="en-US") as stream:
        await stream.send_audio(silence(0.1))
        await async_wait_until(lambda: bool(held))

    async def call() -> None:
        async with stt.open(language="en-US"):
            await asyncio.Event().wait()

    task = asyncio.create_task(call())
    await async_wait_until(lambda: len(held) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()
    assert not stream.connected


# --- the provider HTTP transport ------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_http_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> AsyncIterator[str]:
    """A loopback server whose connections `answer` handles byte by byte; on exit it waits
    for them to end (each ends by itself, at the latest when the client hangs up)."""
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            await asyncio.wait(handlers, timeout=5)


async def test_provider_transport_tells_down_from_slow() -> None:
    """Refused and cut-off connections are ConnectError / ReadError, as on httpx's own
    transport, and only a silent server is a timeout: the adapters' retry and fallback
    decisions read these types."""

    async def cut_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\naudi\r\n")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # answers nothing until the client gives up and hangs up

    timeout = httpx.Timeout(0.5)
    async with httpx.AsyncClient(transport=provider_http_transport(), timeout=timeout) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{closed_port()}/v1/speak")
        async with raw_http_server(cut_mid_body) as url:
            received = bytearray()
            with pytest.raises(httpx.ReadError):
                async with http.stream("POST", url + "/v1/speak", json={"text": "Hi."}) as response:
                    async for chunk in response.aiter_bytes():
                        received += chunk
            assert bytes(received) == b"audi"
        async with raw_http_server(silent) as url:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(url + "/api/chat", json={})


@contextlib.contextmanager
def responses_left_alive() -> Iterator[list[httpx.Response]]:
    """With the collector off, the httpx responses made inside the block that are still
    alive after it: only reference cycles keep a finished response alive."""
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, httpx.Response)}
    left: list[httpx.Response] = []
    gc.disable()
    try:
        yield left
        left += [o for o in gc.get_objects() if isinstance(o, httpx.Response)]
        left[:] = [o for o in left if id(o) not in before]
    finally:
        gc.enable()


async def test_finished_provider_responses_are_freed_without_a_collection(
    tts, llm, ollama_emu
) -> None:
    """httpx's streamed responses are reference cycles (the bound stream points back at the
    response); the provider clients' hook breaks them on close, so a finished TTS or LLM
    request is freed at once instead of waiting for a full collection. A plain client shows
    the cycle the hook removes."""
    ollama_emu.set_replies(["Sure thing."])
    with responses_left_alive() as left:
        assert await synthesize(tts, "Hello there.")
        assert "".join(d.text for d in await chat(llm)) == "Sure thing."
    assert left == []

    async with httpx.AsyncClient(transport=provider_http_transport()) as plain:
        with responses_left_alive() as left:
            async with plain.stream("POST", ollama_emu.url + "/api/chat", json={}) as response:
                await response.aread()
            del response
        assert len(left) == 1  # without the hook: alive until the collector finds it


# --- text to speech --------------------------------------------------------------------------


async def synthesize(tts: TTSAdapter, text: str, voice: str = "aura-2-thalia-en") -> bytes:
    audio = bytearray()
    async with contextlib.aclosing(tts.synthesize(text, voice=voice)) as chunks:
        async for chunk in chunks:
            audio += chunk
    return bytes(audio)


def _transport(tts: TTSAdapter) -> str:
    return "rest" if isinstance(tts, DeepgramTTS) else "ws"


async def test_tts_streams_raw_mulaw(tts, deepgram):
    text = "Thanks for picking up, this is Acme."
    audio = await synthesize(tts, text)

    assert len(audio) == expected_tts_bytes(text)
    (request,) = deepgram.speak_requests
    query = {"model": "aura-2-thalia-en", "encoding": "mulaw", "sample_rate": "8000"}
    if _transport(tts) == "rest":
        query["container"] = "none"  # the socket's audio is always raw
    assert request.query == query
    assert (request.text, request.transport) == (text, _transport(tts))
    assert not audio.startswith(b"RIFF")


async def test_tts_retries_once_before_audio(tts, deepgram):
    deepgram.fail_next_speak(1, status=503)
    audio = await synthesize(tts, "One moment please.")

    assert len(audio) == expected_tts_bytes("One moment please.")
    assert [r.status for r in deepgram.speak_requests] == [503, 200]


async def test_tts_two_failures_raise(tts, deepgram):
    deepgram.fail_next_speak(2, status=500)
    expected = "HTTP 500" if _transport(tts) == "rest" else r"socket closed \(1011\)"
    with pytest.raises(TTSError, match=expected):
        await synthesize(tts, "One moment please.")
    assert len(deepgram.speak_requests) == 2


async def test_tts_client_errors_are_not_retried(tts, deepgram):
    deepgram.fail_next_speak(1, status=400)
    expected = "HTTP 400" if _transport(tts) == "rest" else r"socket closed \(1008\)"
    with pytest.raises(TTSError, match=expected):
        await synthesize(tts, "One moment please.")
    assert len(deepgram.speak_requests) == 1


async def test_tts_failure_after_audio_started_is_not_retried(tts, deepgram):
    deepgram.drop_next_speak(1, after_bytes=1600)
    received = bytearray()
    with pytest.raises(TTSError):
        async for chunk in tts.synthesize(
            "A long enough sentence to drop.", voice="aura-2-zeus-en"
        ):
            received += chunk
    assert len(received) >= 1600
    assert len(deepgram.speak_requests) == 1


async def test_tts_closing_the_generator_closes_the_stream(tts, deepgram):
    deepgram.config.tts_speed = 1.0  # real time: plenty left to cancel
    chunks = tts.synthesize("This answer will be interrupted by the caller." * 3, voice="v")
    async with contextlib.aclosing(chunks):
        assert await anext(chunks)
    await async_wait_until(lambda: deepgram.speak_requests[0].cancelled)


async def test_tts_blank_text_makes_no_request(tts, deepgram):
    assert await synthesize(tts, "  ") == b""
    assert deepgram.speak_requests == []


async def test_tts_socket_is_reused_per_voice_and_rests_at_its_flush_limit(ws_tts, deepgram):
    texts = [f"Sentence number {n}." for n in range(4)]
    for text in texts:
        assert len(await synthesize(ws_tts, text)) == expected_tts_bytes(text)
    other = await synthesize(ws_tts, "Another voice.", voice="aura-2-zeus-en")

    assert len(other) == expected_tts_bytes("Another voice.")
    requests = deepgram.speak_requests
    assert [r.transport for r in requests] == ["ws"] * 4 + ["rest"]
    # three flushes on the first socket, then a second socket for the fourth; the third
    # socket (a second voice) would pass max_sockets=2, so that request went over REST
    assert ws_tts.open_sockets == 2 and ws_tts.rest_fallbacks == 1
    assert requests[4].query["model"] == "aura-2-zeus-en"


async def test_tts_interrupted_socket_is_cleared_and_serves_the_next_answer_whole(ws_tts, deepgram):
    deepgram.config.tts_speed = 1.0
    chunks = ws_tts.synthesize("This answer will be interrupted by the caller." * 3, voice="v")
    async with contextlib.aclosing(chunks):
        assert await anext(chunks)
    await async_wait_until(lambda: deepgram.speak_requests[0].cancelled)
    deepgram.config.tts_speed = 20.0

    # the next answer on the same socket gets its own audio only, none of the cleared one
    text = "Next answer."
    assert len(await synthesize(ws_tts, text, voice="v")) == expected_tts_bytes(text)
    assert ws_tts.open_sockets == 1
    assert [r.cancelled for r in deepgram.speak_requests] == [True, False]


async def test_tts_a_socket_the_server_dropped_while_idle_is_replaced(ws_tts, deepgram):
    assert await synthesize(ws_tts, "First.")
    # the client sees it closed when it next takes it, or when its Flush finds it dead
    assert deepgram.drop_speak_connections() == 1
    text = "Second, on a new socket."

    assert len(await synthesize(ws_tts, text)) == expected_tts_bytes(text)
    assert [r.status for r in deepgram.speak_requests] == [200, 200]
    assert deepgram.speak_connects == 2 and ws_tts.open_sockets == 1


async def test_tts_a_server_error_on_a_pooled_socket_counts_as_the_one_retry(ws_tts, deepgram):
    assert await synthesize(ws_tts, "First.")
    deepgram.fail_next_speak(2, status=503)

    with pytest.raises(TTSError, match=r"socket closed \(1011\)"):
        await synthesize(ws_tts, "Second.")
    assert [r.status for r in deepgram.speak_requests] == [200, 503, 503]


async def test_tts_sockets_refused_at_deepgrams_concurrency_limit_fall_back_to_rest(
    tmp_path, deepgram
):
    deepgram.config.speak_socket_limit = 1
    deepgram.config.tts_speed = 1.0  # the first answer is still playing when the second starts
    adapter = DeepgramStreamingTTS(dg_settings(tmp_path, deepgram), spare_sockets=0)
    first_text, second_text, third_text = "A long first answer. " * 3, "A second.", "A third."
    try:
        first = adapter.synthesize(first_text, voice="v")
        async with contextlib.aclosing(first):
            assert await anext(first)
            # the second socket is refused (429): that chunk goes over REST, no error
            second = await synthesize(adapter, second_text, voice="v")
        assert len(second) == expected_tts_bytes(second_text)
        await async_wait_until(lambda: adapter.idle_sockets == 1)  # cleared, back in the pool
        deepgram.config.speak_socket_limit = 5
        deepgram.config.tts_speed = 20.0
        # the pool keeps to its one socket for a while instead of asking again
        third = await synthesize(adapter, third_text, voice="v")
        concurrent = adapter.synthesize(third_text, voice="v")
        other = adapter.synthesize(second_text, voice="v")
        async with contextlib.aclosing(concurrent), contextlib.aclosing(other):
            assert await anext(concurrent) and await anext(other)
    finally:
        await adapter.aclose()

    assert len(third) == expected_tts_bytes(third_text)
    transports = [(r.text, r.transport) for r in deepgram.speak_requests]
    assert transports[:3] == [(first_text, "ws"), (second_text, "rest"), (third_text, "ws")]
    assert sorted(transports[3:]) == [(second_text, "rest"), (third_text, "ws")]
    assert deepgram.speak_connects == 1 and adapter.rest_fallbacks == 2


async def test_tts_keeps_a_spare_socket_open_so_a_request_never_waits_for_a_handshake(
    tmp_path, deepgram
):
    adapter = DeepgramStreamingTTS(dg_settings(tmp_path, deepgram), spare_sockets=1)
    deepgram.config.tts_speed = 1.0  # the first answer is still playing when the second starts
    try:
        first = adapter.synthesize("A long first answer. " * 3, voice="v")
        async with contextlib.aclosing(first):
            assert await anext(first)
            # the first request opened its own socket, and a spare beside it
            await async_wait_until(lambda: adapter.idle_sockets == 1)
            assert deepgram.speak_connects == 2
            second = await synthesize(adapter, "A second.", voice="v")
        assert len(second) == expected_tts_bytes("A second.")
        # the second went out on the spare, and taking it opened the next spare
        await async_wait_until(lambda: deepgram.speak_connects == 3)
        await async_wait_until(lambda: adapter.idle_sockets == 3)
    finally:
        await adapter.aclose()

    assert [r.socket for r in deepgram.speak_requests] == [1, 2]
    assert adapter.inline_connects == 1  # only the first request waited for a handshake
    assert adapter.open_sockets == 0


async def test_tts_sockets_left_unused_are_closed_down_to_one_and_its_spare_then_all(
    tmp_path, deepgram
):
    adapter = DeepgramStreamingTTS(dg_settings(tmp_path, deepgram), idle_close_s=0.3)
    deepgram.config.tts_speed = 1.0
    try:
        # two answers at once: two sockets, and the spare the first one opened
        first, second = (adapter.synthesize(t, voice="v") for t in ("One.", "Two."))
        async with contextlib.aclosing(first), contextlib.aclosing(second):
            assert await anext(first) and await anext(second)
            async for _ in first:
                pass
            async for _ in second:
                pass
        await async_wait_until(lambda: adapter.idle_sockets == 3)
        assert adapter.open_sockets == 3
        deepgram.config.tts_speed = 20.0
        # from now on one answer at a time: the same (most recent) socket serves each, and
        # the oldest one, unused for longer than idle_close_s, is closed; the spare stays
        for n in range(4):
            assert await synthesize(adapter, f"Answer {n}.", voice="v")
            await asyncio.sleep(0.15)
        await async_wait_until(lambda: adapter.open_sockets == 2)
        assert deepgram.speak_connects == 3 and adapter.idle_sockets == 2
        # no more requests for the voice: a timer closes the rest, no request needed
        async with asyncio.timeout(3.0):
            await async_wait_until(lambda: adapter.open_sockets == 0)
    finally:
        await adapter.aclose()


async def test_tts_a_spare_socket_that_cannot_be_opened_is_not_retried_at_once(
    tmp_path, deepgram, caplog
):
    deepgram.config.api_key = "another-key"  # every upgrade is refused with 401
    adapter = DeepgramStreamingTTS(dg_settings(tmp_path, deepgram), spare_sockets=1)
    try:
        for _ in range(3):
            with pytest.raises(TTSError, match="HTTP 401"):
                await synthesize(adapter, "Hello.")
        await async_wait_until(lambda: "not opened ahead" in caplog.text)
        await asyncio.sleep(0.1)
    finally:
        await adapter.aclose()
    # each request tried its own socket; only the first one tried a spare beside it
    assert caplog.text.count("not opened ahead") == 1
    assert adapter.open_sockets == 0


async def test_tts_socket_upgrade_rejected_raises_without_retry(tmp_path, deepgram):
    deepgram.config.api_key = "another-key"
    adapter = DeepgramStreamingTTS(dg_settings(tmp_path, deepgram))
    try:
        with pytest.raises(TTSError, match="HTTP 401"):
            await synthesize(adapter, "Hello.")
    finally:
        await adapter.aclose()
    assert adapter.open_sockets == 0


# --- language model --------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "book_meeting",
            "description": "Book a meeting",
            "parameters": {
                "type": "object",
                "properties": {"time": {"type": "string"}},
                "required": ["time"],
            },
        },
    }
]
MESSAGES = [
    {"role": "system", "content": "You are a booking assistant."},
    {"role": "user", "content": "Can we meet at three?"},
]


async def chat(llm: OllamaLLM, model: str = "llama3.2", **kwargs) -> list[LLMDelta]:
    deltas = []
    stream = llm.stream_chat(MESSAGES, model=model, temperature=0.3, **kwargs)
    async with contextlib.aclosing(stream):
        async for delta in stream:
            deltas.append(delta)
    return deltas


async def test_llm_streams_text(llm, ollama_emu):
    ollama_emu.set_replies(["Sure, three works. Shall I book it?"])
    deltas = await chat(llm)

    assert "".join(d.text for d in deltas) == "Sure, three works. Shall I book it?"
    assert len(deltas) > 2 and deltas[-1].done and not any(d.done for d in deltas[:-1])
    (body,) = ollama_emu.request_bodies
    assert body["stream"] is True and body["think"] is False and body["keep_alive"] == "10m"
    assert body["options"] == {"temperature": 0.3}
    assert body["messages"] == MESSAGES


async def test_llm_streams_tool_calls(llm, ollama_emu):
    call = {"name": "book_meeting", "arguments": {"time": "15:00"}}
    ollama_emu.set_replies([Reply(text="One moment.", tool_calls=[call])])
    deltas = await chat(llm, tools=TOOLS)

    assert "".join(d.text for d in deltas) == "One moment."
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls == [ToolCall(name="book_meeting", arguments={"time": "15:00"})]
    assert ollama_emu.request_bodies[0]["tools"] == TOOLS


async def test_llm_unknown_model(llm):
    with pytest.raises(LLMModelNotFound):
        await chat(llm, model="no-such-model")


async def test_llm_server_error(llm, ollama_emu):
    ollama_emu.set_fault("http500", count=1)
    with pytest.raises(LLMUnavailable):
        await chat(llm)


async def test_llm_stall_times_out_and_hangs_up(llm, ollama_emu):
    ollama_emu.set_fault("stall", count=1)
    with pytest.raises(LLMTimeout):
        await chat(llm)
    await async_wait_until(lambda: ollama_emu.cancellations == 1)
    assert ollama_emu.active_generations == 0


async def test_llm_midstream_error(llm, ollama_emu):
    ollama_emu.set_fault("midstream_error", count=1)
    with pytest.raises(LLMError) as raised:
        await chat(llm)
    assert type(raised.value) is LLMError


async def test_llm_connection_refused(tmp_path):
    llm = llm_for(tmp_path, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(LLMUnavailable):
        await chat(llm)
    with pytest.raises(LLMUnavailable):
        await llm.complete_json(MESSAGES, model="llama3.2", schema={"type": "object"})
    assert await llm.healthy() is False
    await llm.aclose()


async def test_llm_cancelled_consumer_stops_generation(llm, ollama_emu):
    ollama_emu.config.tokens_per_s = 5  # a long answer still streaming when we cancel
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.stream_chat(MESSAGES, model="llama3.2", temperature=0.3):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    await async_wait_until(lambda: ollama_emu.active_generations == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await async_wait_until(lambda: ollama_emu.cancellations == 1)
    assert ollama_emu.active_generations == 0
    assert ollama_emu.requests[0].status == "cancelled"


async def test_llm_closing_the_generator_stops_generation(llm, ollama_emu):
    ollama_emu.config.tokens_per_s = 5
    stream = llm.stream_chat(MESSAGES, model="llama3.2", temperature=0.3)
    async with contextlib.aclosing(stream):
        assert (await anext(stream)).text
    await async_wait_until(lambda: ollama_emu.cancellations == 1)


SCHEMA = {
    "type": "object",
    "properties": {"outcome": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["outcome", "score"],
}


async def test_llm_complete_json(llm, ollama_emu):
    ollama_emu.set_replies([Reply(json={"outcome": "booked", "score": 4})])
    result = await llm.complete_json(MESSAGES, model="llama3.2", schema=SCHEMA)

    assert result == {"outcome": "booked", "score": 4}
    (body,) = ollama_emu.request_bodies
    assert body["format"] == SCHEMA and body["stream"] is False
    assert body["options"] == {"temperature": 0}


async def test_llm_complete_json_invalid_output(llm, ollama_emu):
    ollama_emu.set_replies([Reply(text="Sure! Here is the JSON you asked for")])
    with pytest.raises(LLMError, match="invalid JSON"):
        await llm.complete_json(MESSAGES, model="llama3.2", schema=SCHEMA)


async def test_llm_complete_json_errors_are_mapped(llm, ollama_emu):
    with pytest.raises(LLMModelNotFound):
        await llm.complete_json(MESSAGES, model="no-such-model", schema=SCHEMA)
    ollama_emu.set_fault("http500", count=1)
    with pytest.raises(LLMUnavailable):
        await llm.complete_json(MESSAGES, model="llama3.2", schema=SCHEMA)


async def test_llm_healthy(llm):
    assert await llm.healthy() is True
