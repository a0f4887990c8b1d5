"""Answering machines heard in the transcript: the fallback for when answering-machine
detection is off or late. A callee's first turn that is clearly a voicemail greeting
("leave a message after the tone", "is not available") counts as a machine.

Pure. Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""

from __future__ import annotations

import re

VOICEMAIL = "voicemail"
"""`ended_reason` of a call that reached an answering machine."""
FAX = "fax"
MACHINE_RESULTS = frozenset({"machine_end_beep", "machine_end_silence", "machine_end_other"})
"""Twilio AMD results (`AnsweredBy`) that mean the greeting is over: time to leave a message."""
HUMAN_RESULTS = frozenset({"human", "unknown"})

_GREETING = re.compile(
    r"leave (me |us )?(a |your )?(brief |short )?(message|name and number)"
    r"|after the (tone|beep)"
    r"|(is|are|am) (not |un)available"
    r"|(isn't|aren't|can't|cannot|can not) (available|come to the phone|take your call)"
    r"|(voice ?mail|mailbox|record your message)"
    r"|not able to (take|answer) (your|the) (call|phone)",
    re.IGNORECASE,
)


def is_voicemail_greeting(text: str) -> bool:
    """True when `text` is clearly a machine's greeting, not a person answering."""
    return bool(_GREETING.search(" ".join(text.split())))
