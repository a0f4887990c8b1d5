"""Text helpers of the live call: words, backchannels, the heard share of a chunk, and the
chunker that turns an LLM token stream into speakable pieces. Pure functions, no I/O.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:\u2014][\"')\]]*\s")
_ABBREVIATIONS = ("mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "e.g.", "i.e.", "etc.", "approx.")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_backchannel(text: str, phrases: list[str]) -> bool:
    """True when `text` is made only of backchannel phrases ("uh-huh", "yeah, right")."""
    remaining = " ".join(words_of(text))
    if not remaining:
        return True
    for phrase in sorted((" ".join(words_of(p)) for p in phrases), key=len, reverse=True):
        if phrase:
            remaining = re.sub(rf"(?<![\w']){re.escape(phrase)}(?![\w'])", " ", remaining)
    return not remaining.strip()


def cut_at_share(text: str, share: float) -> str:
    """The words of `text` spoken in the first `share` of its audio (whole words only)."""
    if share >= 1.0:
        return text
    cut = int(len(text) * max(share, 0.0))
    if cut < len(text) and not text[cut].isspace():
        cut = text.rfind(" ", 0, cut)
    return text[: max(cut, 0)].rstrip()


class SentenceChunker:
    """Splits a token stream into speakable chunks: sentences, or clauses once long enough.
    The first chunk may be short so that speech starts as early as possible."""

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
                if pattern is _SENTENCE_END and candidate.lower().endswith(_ABBREVIATIONS):
                    continue
                self._buffer = self._buffer[end:]
                self._first = False
                return candidate
        return None
