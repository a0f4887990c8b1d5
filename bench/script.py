"""What each simulated call says and hears: the caller's timeline, the Deepgram listen
script that transcribes it, the scripted Ollama replies, and the provider latencies mapped
onto the emulators' configuration.

Full script (one call):

    agent   greeting
    caller  turn 1 "Hi, I would like to book a demo..."           (after the greeting ends)
    agent   long answer 1 ........................................
    caller             "uh huh" (backchannel: must pause, then resume, never interrupt)
    caller  turn 2 "How much does the pro plan cost?"             (after answer 1 ends)
    agent   long answer 2 .........
    caller             "Wait, actually I have a question..." (barge-in: must cut answer 2)
    agent   short answer 3
    caller  hangs up (after answer 3 ends)

The short script (smoke runs) is the greeting, turn 1 with a short answer, and the hang-up.

Imports emulators (audio, timeline actions, token splitting) and the pipeline's sentence
chunker (to know how many tokens the first spoken chunk needs); nothing else of ours.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emulators.audio import synth_speech
from emulators.ollama import split_tokens
from emulators.twilio_caller import Action, Hangup, HangupAfterAgentAudio, SayAfterAgentAudio
from pipeline.text import SentenceChunker

GREETING = "Hi, this is Acme. How can I help?"
LONG_ANSWER_1 = (
    "Sure thing. A demo takes about twenty minutes and covers call recording, "
    "CRM sync and the analytics dashboard."
)
LONG_ANSWER_2 = (
    "Good question. The pro plan is forty nine dollars a month per seat. It adds call "
    "recording, CRM sync and priority support."
)
SHORT_ANSWER = "Of course. What would you like to know?"
SHORT_SMOKE_ANSWER = "Sure thing. What day works for you?"

TALKSPURT_GAP_S = 1.5
"""The caller's talkspurt boundary. Longer than a backchannel pause (about 1 s: the agent
resumes once the transcript says "uh-huh"), so a resumed answer stays one talkspurt and
end-of-answer anchors do not shift; shorter than any real turn gap (the caller's speech of
1 s or more plus the agent's reply latency)."""
REPLY_DELAY_S = 0.3
"""The caller starts speaking this long after it decides the agent's answer has ended."""
BACKCHANNEL_AFTER_S = 1.5
BARGE_IN_AFTER_S = 2.0


@dataclass(frozen=True)
class Providers:
    """Emulated provider latencies (published figures by default)."""

    stt_final_ms: int = 150
    llm_ttft_ms: int = 250
    llm_tokens_per_s: float = 40.0
    tts_first_byte_ms: int = 150

    def first_chunk_ms(self, reply: str) -> float:
        """Time from the first token to the token that completes the first spoken chunk."""
        return (first_chunk_tokens(reply) - 1) * 1000 / self.llm_tokens_per_s

    def budget_ms(self, reply: str) -> float:
        """Sum of provider latencies on the path to the first audio of `reply`."""
        first = self.first_chunk_ms(reply)
        return self.stt_final_ms + self.llm_ttft_ms + first + self.tts_first_byte_ms


@dataclass(frozen=True)
class Line:
    """One caller utterance: what the caller says, and what the STT emulator returns."""

    label: str
    said: str
    transcript: str


TURN_1 = Line("turn1", "Hi, I would like to book a demo of your product.", "I'd like a demo.")
BACKCHANNEL = Line("backchannel", "uh huh", "uh-huh")
TURN_2 = Line("turn2", "How much does the pro plan cost?", "How much is the pro plan?")
BARGE_IN = Line("barge_in", "Wait, actually I have a question about that", "Wait, a question.")


@dataclass(frozen=True)
class CallScript:
    name: str
    lines: list[Line]
    replies: list[str]
    """Ollama replies, by number of user turns: reply i answers user turn i+1."""
    normal_turns: tuple[str, ...]
    """Labels whose end of speech is followed by an answer (voice-to-voice samples)."""

    def timeline(self, hangup_at: float) -> list[Action]:
        return _TIMELINES[self.name](hangup_at)

    @property
    def transcripts(self) -> list[str]:
        return [line.transcript for line in self.lines]


def _speech(line: Line) -> bytes:
    return synth_speech(line.said)


def _full_timeline(hangup_at: float) -> list[Action]:
    return [
        SayAfterAgentAudio(1, REPLY_DELAY_S, _speech(TURN_1), TURN_1.label, anchor="end"),
        SayAfterAgentAudio(2, BACKCHANNEL_AFTER_S, _speech(BACKCHANNEL), BACKCHANNEL.label),
        SayAfterAgentAudio(2, REPLY_DELAY_S, _speech(TURN_2), TURN_2.label, anchor="end"),
        SayAfterAgentAudio(3, BARGE_IN_AFTER_S, _speech(BARGE_IN), BARGE_IN.label),
        HangupAfterAgentAudio(4, REPLY_DELAY_S, anchor="end"),
        Hangup(hangup_at),
    ]


def _short_timeline(hangup_at: float) -> list[Action]:
    return [
        SayAfterAgentAudio(1, REPLY_DELAY_S, _speech(TURN_1), TURN_1.label, anchor="end"),
        HangupAfterAgentAudio(2, REPLY_DELAY_S, anchor="end"),
        Hangup(hangup_at),
    ]


_TIMELINES = {"full": _full_timeline, "short": _short_timeline}

SCRIPTS = {
    "full": CallScript(
        "full",
        [TURN_1, BACKCHANNEL, TURN_2, BARGE_IN],
        [LONG_ANSWER_1, LONG_ANSWER_2, SHORT_ANSWER],
        (TURN_1.label, TURN_2.label),
    ),
    "short": CallScript("short", [TURN_1], [SHORT_SMOKE_ANSWER], (TURN_1.label,)),
}


def first_chunk_tokens(reply: str) -> int:
    """How many streamed tokens the pipeline's chunker needs before its first chunk."""
    chunker = SentenceChunker()
    for count, token in enumerate(split_tokens(reply), start=1):
        if chunker.push(token):
            return count
    return len(split_tokens(reply))


def emulator_config(script: CallScript, providers: Providers) -> dict[str, Any]:
    """`python -m emulators --config` JSON: scripts plus provider latencies.

    STT: the emulator sends a final `stt_final_delay_ms` after its own endpointing, or
    `finalize_delay_ms` after the pipeline's Finalize (sent once Silero VAD has heard
    `EARLY_FINALIZE_MS`, 96 ms, of silence), whichever comes first; both are set to the
    STT figure, so the provider's share is the same on either path.
    """
    return {
        "deepgram": {
            "listen_script": script.transcripts,
            "stt_final_delay_ms": providers.stt_final_ms,
            "finalize_delay_ms": providers.stt_final_ms,
            "tts_first_byte_ms": providers.tts_first_byte_ms,
        },
        "ollama": {
            "replies": script.replies,
            "ttft_ms": providers.llm_ttft_ms,
            "tokens_per_s": providers.llm_tokens_per_s,
        },
    }
