"""Scripted-timeline calls through the real server over real sockets, with the wire
emulators for Deepgram, Ollama and Twilio."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
import websockets

from emulators.audio import synth_speech
from emulators.deepgram import DeepgramConfig, expected_tts_bytes
from emulators.ollama import OllamaConfig
from emulators.twilio_caller import Hangup, HangupAfterAgentAudio, SayAfterAgentAudio
from tests.conftest import AUTH_TOKEN
from tests.harness import LiveStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lines() -> dict[str, bytes]:
    return {
        "demo": synth_speech("Hi, I would like to book a demo of your product."),
        "price": synth_speech("How much does the pro plan cost?"),
        "bye": synth_speech("Thanks a lot goodbye"),
        "wait": synth_speech("Wait, actually I have a question about that"),
        "uhhuh": synth_speech("uh huh"),
        "more": synth_speech("Tell me more please"),
    }


async def test_whole_call_greeting_two_exchanges_goodbye(tmp_path, lines, caplog):
    caplog.set_level(logging.INFO)
    replies = [
        "Sure, I can help you book a demo. What day works for you?",
        "The pro plan costs forty nine dollars a month.",
        "You're welcome, goodbye!",
    ]
    with LiveStack(
        tmp_path,
        deepgram={
            "listen_script": ["I would like to book a demo.", "How much is pro?", "Goodbye."]
        },
        ollama={"replies": replies},
    ) as stack:
        await stack.create_agent(end_call_phrases=["goodbye"])
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["demo"], anchor="end"),
                SayAfterAgentAudio(2, 0.4, lines["price"], anchor="end"),
                SayAfterAgentAudio(3, 0.4, lines["bye"], anchor="end"),
                Hangup(40.0),
            ],
            max_duration_s=45,
        )
        call = await stack.call_detail(call_id)
        async with stack.api() as http:
            metrics = (await http.get("/metrics")).text
        speak, speak_sockets = stack.deepgram.speak_requests, stack.deepgram.speak_connects

    assert result.ended_by == "server", result
    assert result.greeting_latency is not None and result.greeting_latency < 5
    # every chunk went over the speak WebSocket pool (the default), none fell back to REST
    assert len(speak) >= 4 and {r.transport for r in speak} == {"ws"}
    assert "aisdr_tts_rest_fallback_requests 0.0" in metrics
    pooled = re.search(r"^aisdr_tts_sockets_open (\S+)$", metrics, re.MULTILINE)
    assert pooled is not None and 1 <= float(pooled.group(1)) <= speak_sockets
    # the first chunk waited for a handshake; spares were opened beside the ones requests
    # opened (the adapter tests pin down which request each one serves)
    inline = re.search(r"^aisdr_tts_inline_connect_requests (\S+)$", metrics, re.MULTILINE)
    assert inline is not None and 1 <= float(inline.group(1)) < speak_sockets
    assert call["ended_reason"] == "assistant-ended-call"
    assert call["status"] == "completed"
    turns = [(t["role"], t["text"]) for t in call["turns"]]
    assert turns == [
        ("assistant", "Hi, this is Acme. How can I help?"),
        ("user", "I would like to book a demo."),
        ("assistant", replies[0]),
        ("user", "How much is pro?"),
        ("assistant", replies[1]),
        ("user", "Goodbye."),
        ("assistant", replies[2]),
    ]
    answers = [t for t in call["turns"] if t["role"] == "assistant"][1:]
    tts_first_byte = DeepgramConfig().tts_first_byte_ms
    order = [
        "stt_final_ms",
        "llm_request_ms",
        "llm_first_token_ms",
        "tts_request_ms",
        "tts_first_audio_ms",
        "first_media_ms",
    ]
    for turn in answers:
        assert not turn["interrupted"]
        stages = [turn[stage] for stage in order]
        assert all(v is not None for v in stages), turn
        assert stages == sorted(stages), turn
        # each request is stamped before its provider's own delay starts, never after
        assert turn["llm_first_token_ms"] - turn["llm_request_ms"] >= OllamaConfig().ttft_ms - 1
        assert turn["tts_first_audio_ms"] - turn["tts_request_ms"] >= tts_first_byte - 1
    greeting = call["turns"][0]
    assert greeting["llm_request_ms"] is None and greeting["tts_request_ms"] is None
    assert not result.clears
    assert stack.active_calls() == 0
    for stage in ("stt_final", "llm_first_token", "tts_first_audio", "first_media"):
        assert f'aisdr_turn_latency_seconds_count{{stage="{stage}"}} 3.0' in metrics
    # the providers' own latency, per answer: none is under its emulated delay
    for provider, delay_ms in (("llm", OllamaConfig().ttft_ms), ("tts", tts_first_byte)):
        assert f'aisdr_provider_latency_seconds_count{{provider="{provider}"}} 3.0' in metrics
        below = max(b for b in (0.005, 0.01, 0.025, 0.05, 0.1, 0.15) if b < delay_ms / 1000)
        bucket = f'aisdr_provider_latency_seconds_bucket{{le="{below}",provider="{provider}"}}'
        assert f"{bucket} 0.0" in metrics
    assert 'aisdr_calls_ended_total{reason="assistant-ended-call"} 1.0' in metrics
    # transcripts, phone numbers and secrets stay out of INFO logs
    logged = caplog.text
    for private in [*replies, "book a demo", "+14155550199", "+14155550100", AUTH_TOKEN]:
        assert private not in logged


LONG_REPLY = (
    "Our pricing has three plans. The starter plan is nineteen dollars a month for one user. "
    "The pro plan is forty nine dollars a month and adds call recording and CRM sync. "
    "The enterprise plan is custom priced and includes a dedicated success manager."
)


def _answers(call: dict) -> list[dict]:
    return [t for t in call["turns"] if t["role"] == "assistant"]


# The service's own protocol hands each text message to the call as it is read (media_ws);
# under plain uvicorn (`--ws websockets-sansio` or auto) the call reads them with receive().
BOTH_PROTOCOLS = pytest.mark.parametrize(
    "ws_protocol", [None, "websockets-sansio"], ids=["pushed", "through-receive"]
)


@BOTH_PROTOCOLS
async def test_barge_in_cuts_the_turn_to_what_was_heard(tmp_path, lines, ws_protocol):
    with LiveStack(
        tmp_path,
        ws_protocol=ws_protocol,
        deepgram={"listen_script": ["Tell me about pricing.", "Wait, I have a question."]},
        ollama={"replies": [LONG_REPLY, "Sure, what is your question?"]},
    ) as stack:
        await stack.create_agent()
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                SayAfterAgentAudio(2, 2.0, lines["wait"]),
                HangupAfterAgentAudio(3, 0.5, anchor="end"),
                Hangup(40.0),
            ],
            max_duration_s=45,
        )
        call = await stack.call_detail(call_id)

    interrupted = _answers(call)[1]
    assert interrupted["interrupted"] is True
    heard = interrupted["text"]
    assert heard and LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY) / 2
    # what the caller's playout actually played of that answer, in characters of speech
    spoken = result.talkspurts[1].bytes / 8000 / 0.065
    assert abs(len(heard) - spoken) < 15, (heard, spoken)
    # Twilio clear came after the agent's media and before the caller finished talking
    (barge_in,) = [b for b in result.barge_in_latencies() if b is not None]
    assert barge_in > 0
    assert result.clears[0] > result.talkspurts[1].start
    assert result.bytes_discarded > 0
    # the caller's words became the next user turn and the next answer started
    roles = [(t["role"], t["text"]) for t in call["turns"]]
    assert roles[-2:] == [
        ("user", "Wait, I have a question."),
        ("assistant", "Sure, what is your question?"),
    ]
    assert len(result.talkspurts) >= 3


async def test_backchannel_does_not_interrupt(tmp_path, lines):
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Tell me about pricing.", "uh-huh"]},
        ollama={"replies": [LONG_REPLY, "Anything else?"]},
    ) as stack:
        await stack.create_agent()
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                SayAfterAgentAudio(2, 2.5, lines["uhhuh"]),
                Hangup(28.0),
            ],
            max_duration_s=45,
        )
        call = await stack.call_detail(call_id)

    answer = _answers(call)[1]
    assert answer["interrupted"] is False
    assert answer["text"] == LONG_REPLY
    assert [t["text"] for t in call["turns"] if t["role"] == "user"] == ["Tell me about pricing."]
    # every byte of the answer reached the caller's ear, none was skipped
    heard = sum(t.bytes for t in result.talkspurts[1:])
    assert heard >= expected_tts_bytes(LONG_REPLY) - 800


async def test_caller_hangs_up_mid_answer(tmp_path, lines):
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Tell me about pricing."]},
        ollama={"replies": [LONG_REPLY], "tokens_per_s": 6},
    ) as stack:
        await stack.create_agent()
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                HangupAfterAgentAudio(2, 1.0),
                Hangup(30.0),
            ],
            max_duration_s=35,
        )
        call = await stack.call_detail(call_id)
        for _ in range(100):
            if not stack.call_tasks():
                break
            await asyncio.sleep(0.05)
        assert stack.call_tasks() == []
        assert stack.active_calls() == 0
        for _ in range(100):
            if stack.ollama.cancellations:
                break
            await asyncio.sleep(0.05)
        assert stack.ollama.cancellations >= 1  # generation stopped at the server

    assert result.ended_by == "hangup"
    assert call["ended_reason"] == "customer-ended-call"
    answer = _answers(call)[1]
    assert answer["interrupted"] is True
    assert LONG_REPLY.startswith(answer["text"]) and len(answer["text"]) < len(LONG_REPLY)


async def test_deepgram_drop_mid_call_then_recovery(tmp_path, lines):
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Tell me about pricing.", "Tell me more."]},
        ollama={"replies": ["Sure, we have three plans.", "The pro plan adds recording."]},
    ) as stack:
        await stack.create_agent()

        dropper = stack.when(
            lambda: len(stack.ollama.requests) >= 1, stack.deepgram.drop_listen_connections
        )
        call_id, _ = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                SayAfterAgentAudio(2, 1.0, lines["more"], anchor="end"),
                HangupAfterAgentAudio(3, 0.5, anchor="end"),
                Hangup(30.0),
            ],
            max_duration_s=35,
        )
        await dropper
        call = await stack.call_detail(call_id)
        assert stack.deepgram.listen_connects >= 2

    assert [t["text"] for t in _answers(call)][1:] == [
        "Sure, we have three plans.",
        "The pro plan adds recording.",
    ]


async def test_ollama_error_speaks_the_fallback_and_the_call_goes_on(tmp_path, lines):
    fallback = "Sorry, I did not catch that. Could you repeat it?"
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Tell me about pricing.", "Tell me about pricing."]},
        ollama={"replies": ["We have three plans.", "We have three plans."]},
    ) as stack:
        await stack.create_agent(fallback_line=fallback)
        stack.ollama.set_fault("http500", count=1)
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                SayAfterAgentAudio(2, 0.4, lines["more"], anchor="end"),
                HangupAfterAgentAudio(3, 0.5, anchor="end"),
                Hangup(30.0),
            ],
            max_duration_s=35,
        )
        call = await stack.call_detail(call_id)
        assert fallback in stack.deepgram.speak_texts

    assert [t["text"] for t in _answers(call)][1:] == [fallback, "We have three plans."]
    assert len(result.talkspurts) == 3
    assert call["ended_reason"] == "customer-ended-call"


@BOTH_PROTOCOLS
async def test_malformed_frames_are_survived(tmp_path, ws_protocol, caplog):
    caplog.set_level(logging.INFO, logger="ai_sdr")
    with LiveStack(tmp_path, ws_protocol=ws_protocol) as stack:
        await stack.create_agent()
        call_id = await stack.answer_inbound("CA" + "f" * 32)
        headers = {"X-Twilio-Signature": caller_signature(stack)}
        url = stack.server.ws_url + "/twilio/media"
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send('{"event":"mark","mark":{"name":"early"}}')  # out of order
            await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
            await ws.send(json.dumps(_start(stack, call_id, "CA" + "f" * 32)))
            for junk in [
                "not json",
                "[1, 2]",
                '{"event":"media","media":{"payload":"%%%not-base64"}}',
                '{"event":"media","media":"oops"}',
                '{"event":"dtmf","dtmf":{}}',
                '{"event":"dtmf","dtmf":"5"}',  # wrongly typed fields
                '{"event":"mark","mark":"m1"}',
                '{"event":"something-new"}',
                json.dumps({"event": "media", "media": {"payload": "A" * 200_000}}),
            ]:
                await ws.send(junk)
            got_media = False
            async with asyncio.timeout(10):
                while not got_media:
                    message = json.loads(await ws.recv())
                    got_media = message.get("event") == "media"
            await ws.send(json.dumps({"event": "stop", "stop": {}}))
        call = await stack.call_detail(call_id)
        async with stack.api() as http:
            assert (await http.get("/health")).status_code == 200
            metrics = (await http.get("/metrics")).text

    assert call["ended_reason"] == "customer-ended-call"
    # not JSON, not an object, bad base64, two mistyped fields, oversize; unknown events
    # are ignored silently
    assert "aisdr_malformed_messages_total 6.0" in metrics
    # a deployment on plain uvicorn is told how to get the faster path
    told = "start uvicorn with --ws api.media_ws:MediaStreamProtocol" in caplog.text
    assert told == (ws_protocol is not None)


async def test_media_stream_with_a_forged_signature_is_closed_1008(tmp_path):
    with LiveStack(tmp_path) as stack:
        await stack.create_agent()
        call_id = await stack.answer_inbound("CA" + "e" * 32)
        url = stack.server.ws_url + "/twilio/media"
        ws = await websockets.connect(url, additional_headers={"X-Twilio-Signature": "x"})
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.send(json.dumps(_start(stack, call_id, "CA" + "e" * 32)))
            await ws.recv()
        await ws.close()
        assert closed.value.rcvd.code == 1008
        call = await stack.call_detail(call_id, settled=False)
        assert call["status"] == "ringing" and call["started_at"] is None


def caller_signature(stack: LiveStack) -> str:
    from twilio.request_validator import RequestValidator

    return RequestValidator(AUTH_TOKEN).compute_signature(stack.settings.media_stream_url, {})


def _start(stack: LiveStack, call_id: str, call_sid: str) -> dict:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ" + "0" * 32,
        "start": {
            "streamSid": "MZ" + "0" * 32,
            "accountSid": "AC" + "1" * 32,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": stack.stream_parameters[call_id],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


async def test_silence_reprompts_once_then_says_goodbye_and_hangs_up(tmp_path):
    from voice_pipeline import REPROMPT_LINE, SILENCE_GOODBYE

    with LiveStack(tmp_path) as stack:
        await stack.create_agent(silence_timeout_seconds=2)
        call_id, result = await stack.inbound_call([Hangup(30.0)], max_duration_s=35)
        call = await stack.call_detail(call_id)
        spoken = stack.deepgram.speak_texts

    assert result.ended_by == "server"
    assert call["ended_reason"] == "silence-timeout"
    assert spoken[1:] == [REPROMPT_LINE, SILENCE_GOODBYE]
    assert len(result.talkspurts) == 3  # greeting, reprompt, goodbye: all played in full
    assert result.bytes_discarded == 0


async def test_lost_marks_still_let_the_goodbye_play_to_the_end(tmp_path):
    """A peer that never returns marks: the pipeline goes by its clock, and hangs up once
    the goodbye has played, not once its last byte was sent (the pacer sends 0.3 s ahead,
    and the goodbye is still being paced out when its synthesis ends)."""
    from voice_pipeline import SILENCE_GOODBYE

    with LiveStack(tmp_path) as stack:
        await stack.create_agent(silence_timeout_seconds=2)
        call_id, result = await stack.inbound_call(
            [Hangup(40.0)], max_duration_s=45, return_marks=False
        )
        call = await stack.call_detail(call_id)
        spoken = stack.deepgram.speak_texts

    assert result.ended_by == "server"
    assert call["ended_reason"] == "silence-timeout"
    assert spoken[-1] == SILENCE_GOODBYE and result.marks  # marks went out, none came back
    goodbye = result.talkspurts[-1]
    assert result.bytes_discarded == 0
    assert result.duration >= goodbye.end - 0.05, (result.duration, goodbye.end)


async def test_max_call_seconds_ends_the_call_politely(tmp_path):
    from voice_pipeline import MAX_DURATION_GOODBYE

    with LiveStack(tmp_path) as stack:
        await stack.create_agent(max_call_seconds=10)
        call_id, result = await stack.inbound_call([Hangup(30.0)], max_duration_s=35)
        call = await stack.call_detail(call_id)
        assert MAX_DURATION_GOODBYE in stack.deepgram.speak_texts

    assert call["ended_reason"] == "max-duration"
    assert result.ended_by == "server"
    assert 10 <= result.duration < 30


async def test_dtmf_digits_reach_the_llm_as_caller_input(tmp_path):
    from emulators.twilio_caller import Dtmf

    with LiveStack(tmp_path, ollama={"replies": ["You chose option forty two."]}) as stack:
        await stack.create_agent()
        call_id, _ = await stack.inbound_call(
            [
                Dtmf(3.0, "4"),
                Dtmf(3.2, "2"),
                Dtmf(3.4, "#"),
                HangupAfterAgentAudio(2, 0.3, "end"),
                Hangup(20),
            ],
            max_duration_s=25,
        )
        call = await stack.call_detail(call_id)
        # streamed chat turns only (post-call analysis also asks the LLM, without streaming)
        (request,) = [b for b in stack.ollama.request_bodies if b.get("stream", True)]

    assert "pressed the keypad: 42" in request["messages"][-1]["content"]
    assert [t["text"] for t in _answers(call)][1:] == ["You chose option forty two."]


async def test_tts_failure_retries_once_then_speaks_the_fallback(tmp_path, lines):
    fallback = "Sorry, one moment. Could you say that again?"
    with LiveStack(
        tmp_path,
        deepgram={"listen_script": ["Tell me about pricing.", "Tell me more."]},
        ollama={"replies": ["We have three plans.", "The pro plan adds recording."]},
    ) as stack:
        await stack.create_agent(fallback_line=fallback)

        # the first answer chunk and its retry fail
        breaker = stack.when(
            lambda: bool(stack.deepgram.speak_requests), lambda: stack.deepgram.fail_next_speak(2)
        )
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, lines["more"], anchor="end"),
                SayAfterAgentAudio(2, 0.4, lines["more"], anchor="end"),
                HangupAfterAgentAudio(3, 0.5, anchor="end"),
                Hangup(30.0),
            ],
            max_duration_s=35,
        )
        await breaker
        call = await stack.call_detail(call_id)
        statuses = [(r.text, r.status) for r in stack.deepgram.speak_requests]

    assert statuses[1:] == [
        ("We have three plans.", 500),
        ("We have three plans.", 500),
        (fallback, 200),
        ("The pro plan adds recording.", 200),
    ]
    assert [t["text"] for t in _answers(call)][1:] == [fallback, "The pro plan adds recording."]
    assert len(result.talkspurts) == 3  # no dead air: the fallback was heard


async def test_a_pause_inside_a_sentence_flushes_the_transcript_but_keeps_the_turn(tmp_path, lines):
    """260 ms of silence mid-sentence: to the VAD, longer than EARLY_FINALIZE_MS (96), so
    the pipeline already asks Deepgram for its final and starts an early answer on it, but
    shorter than the 300 ms that end a turn. The caller going on cancels that answer unheard;
    the two segments make one user turn and one answer, and once the caller has finished,
    the turn ends without another Finalize round trip."""
    from emulators.audio import silence

    sentence = lines["more"] + silence(0.26) + lines["price"]
    with LiveStack(
        tmp_path,
        deepgram={
            "listen_script": ["Tell me more please,", "how much is pro?"],
            "finalize_continuation_ms": 0,  # each segment its own line, like real words
        },
        ollama={"replies": ["The pro plan is forty nine dollars."]},
    ) as stack:
        await stack.create_agent()
        call_id, result = await stack.inbound_call(
            [
                SayAfterAgentAudio(1, 0.4, sentence, anchor="end"),
                HangupAfterAgentAudio(2, 0.5, anchor="end"),
                Hangup(25.0),
            ],
            max_duration_s=30,
        )
        call = await stack.call_detail(call_id)
        (listen,) = stack.deepgram.listen_connections
        asked = stack.llm_requests()
        spoken = stack.deepgram.speak_texts
        metrics = await stack.metrics()

    assert listen.utterances == ["Tell me more please,", "how much is pro?"]
    users = [t["text"] for t in call["turns"] if t["role"] == "user"]
    assert users == ["Tell me more please, how much is pro?"]
    # the early answer to the first half was cancelled once the caller went on
    early, answer = asked[:2]  # then the post-call analysis
    assert early == ("cancelled", ["Tell me more please,"])
    assert answer == ("completed", ["Tell me more please, how much is pro?"])
    # ... and the answer that was heard had started before the turn ended, at the last pause
    assert 'aisdr_early_answers_total{outcome="resumed"} 1.0' in metrics
    assert 'aisdr_early_answers_total{outcome="used"} 1.0' in metrics
    assert "The pro plan is forty nine dollars." in spoken
    assert [t["text"] for t in _answers(call)][1:] == ["The pro plan is forty nine dollars."]
    # one Finalize per pause: at the mid-sentence pause, and once at the end; none when
    # the turn ended (that silence was already flushed)
    finalizes = [c for c in listen.controls if c["type"] == "Finalize"]
    assert len(finalizes) == 2
    # the first came before the second half of the sentence was spoken
    gap = finalizes[1]["audio_time"] - finalizes[0]["audio_time"]
    assert gap > len(lines["price"]) / 8000
    assert result.ended_by == "hangup"
