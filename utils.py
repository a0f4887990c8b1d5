"""Small pure helpers: the G.711 mu-law codec, phone-number normalising, `{{variable}}`
templating, ids and time. No I/O.

The codec uses numpy lookup tables rather than `audioop`, which Python 3.13 removed.

Of ours, imports only: nothing.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import numpy as np
import phonenumbers

FRAME_BYTES = 160
"""Twilio sends 20 ms frames: 160 mu-law bytes at 8 kHz."""
SAMPLE_RATE = 8000
MULAW_SILENCE = 0xFF

_BIAS = 0x84
_CLIP = 32635


def _build_decode_table() -> np.ndarray:
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _build_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(pcm < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(pcm), _CLIP) + _BIAS
    # exponent = position of the highest set bit among bits 7..14, minus 7
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    table: np.ndarray = ((~(sign | (exponent << 4) | mantissa)) & 0xFF).astype(np.uint8)
    return table


_DECODE = _build_decode_table()
_DECODE_FLOAT = _DECODE.astype(np.float32) / 32768.0
_ENCODE = _build_encode_table()


def mulaw_decode(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 PCM samples."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 PCM samples -> mu-law bytes."""
    index = pcm.astype(np.int32) + 32768
    return bytes(_ENCODE[index])


def mulaw_to_float(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """mu-law bytes -> float32 samples in [-1, 1), the form VAD models take; written into
    `out` (float32, one element per byte) if given, which saves an array and a copy."""
    return _DECODE_FLOAT.take(np.frombuffer(data, dtype=np.uint8), out=out, mode="clip")


# --- phone numbers ----------------------------------------------------------------------


def normalize_e164(number: str) -> str:
    """Return `number` in E.164, or raise ValueError naming what is wrong."""
    if not isinstance(number, str) or not number.startswith("+"):
        raise ValueError("phone numbers must be in E.164 form, starting with '+'")
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from None
    if not phonenumbers.is_possible_number(parsed):
        raise ValueError("not a possible phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def mask_phone(number: str | None) -> str:
    """For logs: keep the country code and last two digits only."""
    if not number:
        return "-"
    return number[:2] + "*" * max(len(number) - 4, 0) + number[-2:]


# --- templating -------------------------------------------------------------------------

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render_template(text: str, variables: dict[str, object]) -> str:
    """Fill `{{name}}` placeholders; an unknown name renders as an empty string so that a
    caller never hears a raw placeholder."""
    return _VARIABLE.sub(lambda m: str(variables.get(m.group(1), "")), text or "")


# --- ids and time -----------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def utcnow() -> datetime:
    return datetime.now(UTC)
