"""Text helpers of the live call: words, backchannels, the heard share of a chunk, and the
chunker that turns an LLM token stream into speakable pieces. Pure functions, no I/O.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")
"""Letters and digits of any script, joined inside a word by an apostrophe (straight or
typographic) or a hyphen: "i'm", "uh-huh", "café". Quotes around a word are not part of it."""
_CLOSERS = "\"')\\]\u201d\u2019\u00bb"  # straight and typographic closing quotes, brackets
_SENTENCE_END = re.compile(rf"(?:[.!?]|\u2026)[{_CLOSERS}]*\s")
_CLAUSE_END = re.compile(rf"[,;:\u2014][{_CLOSERS}]*\s")
_ABBREVIATIONS = frozenset(("mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "approx."))
_INITIALS = re.compile(r"(?:[^\W\d_]\.)+")
"""A letter and a dot, once or more: "J.", "e.g.", "a.m.", "U.S.". Not a sentence end."""
_OPENERS = "\"'([\u201c\u2018\u00ab"
_GAP_BEFORE_LAST_WORD = re.compile(r"\s(?=\S*\Z)")


def words_of(text: str) -> list[str]:
    """The words of `text`, lowercased, typographic apostrophes made straight."""
    return [word.replace("\u2019", "'") for word in _WORD.findall(text.lower())]


def is_backchannel(text: str, phrases: list[str]) -> bool:
    """True when `text` is made only of backchannel phrases ("uh-huh", "yeah, right"),
    matched on whole words whatever the case and punctuation. No words at all counts too."""
    remaining = f" {' '.join(words_of(text))} "
    for phrase in sorted((" ".join(words_of(p)) for p in phrases), key=len, reverse=True):
        if not phrase:
            continue
        while f" {phrase} " in remaining:  # repeated: "yeah yeah" shares the space between
            remaining = remaining.replace(f" {phrase} ", " ")
    return not remaining.strip()


def cut_at_share(text: str, share: float) -> str:
    """The words of `text` spoken in the first `share` of its audio (whole words only)."""
    if share >= 1.0:
        return text
    if not share > 0.0:  # also NaN
        return ""
    cut = int(len(text) * share)
    if cut < len(text) and not text[cut].isspace():  # inside a word: back to the gap before it
        gap = _GAP_BEFORE_LAST_WORD.search(text, 0, cut)
        cut = gap.start() if gap else 0
    return text[:cut].rstrip()


def _is_abbreviation(sentence: str) -> bool:
    """Whether `sentence` ends with a word whose dot does not end a sentence."""
    last = sentence.rsplit(None, 1)[-1].lstrip(_OPENERS).lower()
    return last in _ABBREVIATIONS or _INITIALS.fullmatch(last) is not None


class SentenceChunker:
    """Splits a token stream into speakable chunks: sentences, or clauses once long enough.
    The first chunk may be short so that speech starts as early as possible.

    A sentence ends at ".", "!", "?" or an ellipsis followed by whitespace (closing quotes
    and brackets may come between), unless the word before the dot is a known abbreviation
    ("Dr.") or initials ("a.m.", "U.S."). Dots inside numbers, URLs and email addresses
    ("3.5", "acme.com") have no whitespace after them, so they never end one."""

    def __init__(self, first_min: int = 8, min_chars: int = 120, clause_min: int = 160) -> None:
        # After the short first chunk, long ones: the LLM writes far faster than speech
        # plays, so waiting for more text costs no latency and saves TTS requests.
        self._buffer = ""
        self._first = True
        self.first_min, self.min_chars, self.clause_min = first_min, min_chars, clause_min

    def push(self, token: str) -> list[str]:
        self._buffer += token
        chunks = []
        while chunk := self._take():
            chunks.append(chunk)
        return chunks

    def flush(self) -> str:
        rest, self._buffer = self._buffer.strip(), ""
        return rest

    def _take(self) -> str | None:
        minimum = self.first_min if self._first else self.min_chars
        for pattern, floor in ((_SENTENCE_END, minimum), (_CLAUSE_END, self.clause_min)):
            for match in pattern.finditer(self._buffer):
                end = match.end()
                candidate = self._buffer[:end].strip()
                if len(candidate) < (self.first_min if self._first else floor):
                    continue
                if pattern is _SENTENCE_END and _is_abbreviation(candidate):
                    continue
                self._buffer = self._buffer[end:]
                self._first = False
                return candidate
        return None
