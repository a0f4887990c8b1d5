"""`Idempotency-Key` for create routes: the same key with the same body gives the stored
result again (nothing is done twice); with a different body, a 409.

Must not import: twilio, deepgram, ollama, chromadb.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Protocol, TypeVar

from fastapi import Header
from pydantic import BaseModel

from api.errors import APIError

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=128)
]


def request_hash(body: BaseModel) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class _Keyed(Protocol):
    request_hash: str | None


Row = TypeVar("Row", bound=_Keyed)


def replay(row: Row, digest: str) -> Row:
    """The row stored under the key, if this request is its repeat; 409 if the key was
    used for another request."""
    if row.request_hash != digest:
        raise APIError(
            409,
            "idempotency_conflict",
            "Idempotency-Key was already used with a different request body",
            "Idempotency-Key",
        )
    return row
