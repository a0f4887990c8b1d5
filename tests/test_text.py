"""Unit tests of the live call's text helpers (`pipeline/text.py`) and of what the caller
heard of an utterance (`Speech.heard_text`). Pure functions: no loop, no server, no clock.

The chunker is fed the same text split three ways (one character at a time, word-ish tokens
as Ollama streams them, and three characters at a time, which cuts through "Dr." and
"3.5"): a chunk boundary must not depend on where the tokens happen to split.

Must not import anything of ours but `pipeline.text` and `pipeline.speech`.
"""

from __future__ import annotations

import math
import re

import pytest

from pipeline.speech import Chunk, Speech
from pipeline.text import SentenceChunker, cut_at_share, is_backchannel, words_of

pytestmark = pytest.mark.fast


def by_words(text: str) -> list[str]:
    """Word-ish tokens with their leading whitespace, as Ollama streams them."""
    return re.findall(r"\s*\S+", text)


def by_chars(text: str) -> list[str]:
    return list(text)


def by_threes(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(0, len(text), 3)]


SPLITS = [by_chars, by_words, by_threes]


def chunked(tokens: list[str], **options: int) -> list[str]:
    """Every chunk the chunker gives for `tokens`, the flushed rest last."""
    chunker = SentenceChunker(**options)
    chunks = [chunk for token in tokens for chunk in chunker.push(token)]
    if rest := chunker.flush():
        chunks.append(rest)
    return chunks


# --- the chunker: where a sentence ends --------------------------------------------------

# Each case: the text, then its chunks with a minimum of 8 characters for every chunk (so
# that each sentence end shows), the defaults' long later chunks being tested apart.
SENTENCE_CASES = {
    "money and decimals": (
        "It costs $1,200.50 a year. That is 3.5 times less than before!",
        ["It costs $1,200.50 a year.", "That is 3.5 times less than before!"],
    ),
    "titles": (
        "Please ask for Dr. Smith or Mrs. Jones. They are in St. Louis today.",
        ["Please ask for Dr. Smith or Mrs. Jones.", "They are in St. Louis today."],
    ),
    "words ending like a title": (
        "That works best. We have all the items. Just ask.",
        ["That works best.", "We have all the items.", "Just ask."],
    ),
    "initials and times": (
        "We are open 9 a.m. to 5 p.m. in the U.S. and Canada. Ask J. R. Doe, i.e. me. Bye.",
        ["We are open 9 a.m. to 5 p.m. in the U.S. and Canada.", "Ask J. R. Doe, i.e. me.", "Bye."],
    ),
    "urls and emails": (
        "Visit acme.com/pricing or write to help@acme.io. We answer within a day.",
        ["Visit acme.com/pricing or write to help@acme.io.", "We answer within a day."],
    ),
    "ellipses": (
        "Well... let me check that. Hmm… I am looking it up… Found it.",
        ["Well... let me check that.", "Hmm… I am looking it up…", "Found it."],
    ),
    "emoji": (
        "Great news 😊! You are booked for Tuesday 👋",
        ["Great news 😊!", "You are booked for Tuesday 👋"],
    ),
    "quotes and brackets": (
        'He said "yes." Then he left (for good.) She wrote “thanks.” Done here.',
        ['He said "yes."', "Then he left (for good.)", "She wrote “thanks.”", "Done here."],
    ),
    "question and exclamation": (
        "Really?! That is great. Are you sure? Yes!",
        ["Really?!", "That is great.", "Are you sure?", "Yes!"],
    ),
    "newlines": (
        "First line here.\nSecond line here.\n",
        ["First line here.", "Second line here."],
    ),
}


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", SENTENCE_CASES.values(), ids=SENTENCE_CASES.keys())
def test_sentences_end_where_speech_pauses_however_the_stream_splits(
    case: tuple[str, list[str]], split
) -> None:
    text, expected = case
    assert chunked(split(text), first_min=8, min_chars=8, clause_min=10_000) == expected


@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__)
def test_the_chunks_join_back_to_the_text(split) -> None:
    text = " ".join(case[0].strip() for case in SENTENCE_CASES.values())
    chunks = chunked(split(text))
    assert " ".join(chunks).split() == text.split()


def test_a_dot_inside_a_word_waits_for_what_follows() -> None:
    chunker = SentenceChunker(first_min=8)
    assert chunker.push("The price is 3.") == []  # "3." might be "3.5"
    assert chunker.push("5 percent lower. ") == ["The price is 3.5 percent lower."]
    assert chunker.push("Email help@acme.") == []
    assert chunker.push("io today") == []
    assert chunker.flush() == "Email help@acme.io today"


def test_the_first_chunk_is_short_and_may_end_at_a_clause() -> None:
    text = (
        "Sure thing, I can book that demo for you. It takes about twenty minutes and covers "
        "call recording, CRM sync and the analytics dashboard. After that we can talk pricing "
        "and the next steps. Does Tuesday work for you? I have slots in the morning."
    )
    chunks = chunked(by_words(text))
    assert chunks[0] == "Sure thing,"  # speech starts on the first clause
    assert all(len(c) >= 120 for c in chunks[1:-1])  # then long chunks: fewer TTS requests
    assert chunks[1].endswith("dashboard.")
    assert " ".join(chunks) == text


def test_a_first_sentence_shorter_than_the_minimum_joins_the_next() -> None:
    assert chunked(by_words("Hi. I am Ana, from Acme."), first_min=8) == [
        "Hi. I am Ana,",
        "from Acme.",
    ]


def test_a_long_sentence_without_a_full_stop_breaks_at_a_late_clause() -> None:
    clause = "and then we go over the numbers together, "
    text = "Okay, fine. " + clause * 6 + "finally"
    chunks = chunked(by_words(text))
    assert chunks[0] == "Okay, fine."
    assert chunks[1].endswith(",") and len(chunks[1]) >= 160
    assert chunks[-1].endswith("finally")


def test_whitespace_and_punctuation_alone_make_no_chunk() -> None:
    assert chunked(["   ", "\n", " "]) == []
    assert chunked(["...", " ", "!"]) == ["... !"]  # flushed as is: nothing is dropped


# --- words -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Yeah, RIGHT.", ["yeah", "right"]),
        ("Uh-huh... mm-hmm!", ["uh-huh", "mm-hmm"]),
        ("I'm sure it's fine", ["i'm", "sure", "it's", "fine"]),
        ("I’m sure it’s fine", ["i'm", "sure", "it's", "fine"]),  # typographic apostrophe
        ("'Yeah,' she said", ["yeah", "she", "said"]),  # quotes are not part of a word
        ("Café naïve señor", ["café", "naïve", "señor"]),
        ("Call 555-0100 at 3.5", ["call", "555-0100", "at", "3", "5"]),
        ("😊 👍", []),
        ("--- ... !!!", []),
        ("snake_case", ["snake", "case"]),
    ],
)
def test_words_of(text: str, words: list[str]) -> None:
    assert words_of(text) == words


# --- backchannels ------------------------------------------------------------------------

PHRASES = ["uh-huh", "uh huh", "mm-hmm", "yeah", "right", "okay", "i see", "go on"]


@pytest.mark.parametrize(
    "text",
    [
        "yeah",
        "Yeah.",
        "YEAH!",
        "Uh-huh",
        "uh huh",
        "Mm-hmm, yeah.",
        "Yeah yeah yeah",
        "Okay, I see.",
        "I see... go on",
        "'Right.'",
        "Right…",
        "",
        "...",
    ],
)
def test_backchannels(text: str) -> None:
    assert is_backchannel(text, PHRASES)


@pytest.mark.parametrize(
    "text",
    [
        "wait",
        "Yeah, but how much is it?",
        "Okay so what about Tuesday",
        "I see a problem",
        "yeahs",  # a phrase inside a longer word is not the phrase
        "huh",  # half of "uh-huh"
        "seeing",
        "go",  # half of "go on"
        "right now please",
    ],
)
def test_backchannel_with_content_is_not_one(text: str) -> None:
    assert not is_backchannel(text, PHRASES)


def test_backchannel_phrases_are_matched_whatever_their_own_case_and_punctuation() -> None:
    assert is_backchannel("i see, got it", ["I SEE.", "Got it!"])
    assert is_backchannel("I’m listening", ["i'm listening"])
    assert not is_backchannel("yeah", [])
    assert not is_backchannel("yeah", ["", "..."])


def test_longer_phrases_are_taken_before_their_parts() -> None:
    # "right" alone is not a backchannel here, but "all right" is
    assert is_backchannel("all right", ["all", "all right"])
    assert not is_backchannel("all right", ["all"])


# --- the heard share of a chunk ----------------------------------------------------------

TEXT = "Our pro plan costs forty dollars"


@pytest.mark.parametrize(
    ("share", "heard"),
    [
        (0.0, ""),
        (-0.5, ""),
        (math.nan, ""),
        (0.02, ""),  # inside "Our"
        (3 / len(TEXT), "Our"),  # exactly at the space after it
        (4 / len(TEXT), "Our"),  # on the first letter of "pro"
        (0.5, "Our pro plan"),  # inside "costs"
        (0.99, "Our pro plan costs forty"),
        (1.0, TEXT),
        (1.5, TEXT),
    ],
)
def test_cut_at_share_keeps_whole_words_only(share: float, heard: str) -> None:
    assert cut_at_share(TEXT, share) == heard


def test_cut_at_share_breaks_at_any_whitespace() -> None:
    assert cut_at_share("Sure.\nThe plan\tcosts ten", 0.75) == "Sure.\nThe plan"
    assert cut_at_share("", 0.5) == ""
    assert cut_at_share("Supercalifragilistic", 0.9) == ""


# --- Speech.heard_text -------------------------------------------------------------------


def speech_of(*texts: str, bytes_per_char: int = 100) -> Speech:
    """A speech whose chunks' audio is `bytes_per_char` per character, all synthesised."""
    speech = Speech(id=1, kind="answer")
    for i, text in enumerate(texts):
        chunk = Chunk(text=text, start=len(speech.audio), mark=f"s1c{i + 1}")
        speech.audio += b"\xff" * (len(text) * bytes_per_char)
        chunk.end = len(speech.audio)
        speech.chunks.append(chunk)
    return speech


def test_heard_text_is_empty_before_anything_played() -> None:
    speech = speech_of("Sure thing.", "The demo takes twenty minutes.")
    assert speech.heard_text(0) == ""
    assert Speech(id=2, kind="answer").heard_text(1000) == ""


def test_heard_text_takes_the_played_share_of_the_first_unconfirmed_chunk() -> None:
    speech = speech_of("Sure thing.", "The demo takes twenty minutes.")
    first, second = speech.chunks
    assert speech.heard_text(500) == "Sure"  # "Sure thing." is 11 chars: 1100 bytes
    end = first.end
    assert end == 1100
    first.acked = True
    assert speech.heard_text(end) == "Sure thing."
    assert speech.heard_text(end + 1500) == "Sure thing. The demo takes"
    second.acked = True
    assert speech.heard_text(0) == "Sure thing. The demo takes twenty minutes."  # marks rule


def test_heard_text_never_ends_inside_a_word() -> None:
    speech = speech_of("Absolutely wonderful")
    for played in range(0, 2000, 37):
        heard = speech.heard_text(played)
        assert speech.chunks[0].text.startswith(heard)
        assert heard in ("", "Absolutely", "Absolutely wonderful")


def test_heard_text_of_a_chunk_still_being_synthesised() -> None:
    speech = speech_of("Sure thing.")
    speech.chunks[0].acked = True
    speech.chunks.append(Chunk(text="We can do Tuesday", start=len(speech.audio)))
    speech.audio += b"\xff" * 1700  # all of it so far played: its share is 1
    assert speech.heard_text(len(speech.audio)) == "Sure thing. We can do Tuesday"
