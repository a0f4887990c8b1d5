"""The G.711 mu-law codec in utils against the standard's values and error bounds."""

import warnings

import numpy as np
import pytest

from utils import MULAW_SILENCE, mulaw_decode, mulaw_encode, mulaw_to_float

ALL_CODES = bytes(range(256))
ALL_PCM = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
CLIP = 32635
"""G.711 mu-law saturates at this magnitude."""


def decode_one(code: int) -> int:
    return int(mulaw_decode(bytes([code]))[0])


def encode_one(sample: int) -> int:
    return mulaw_encode(np.array([sample], dtype=np.int16))[0]


@pytest.mark.parametrize("code", [0xFF, 0x7F])
def test_both_zero_codes_decode_to_silence(code):
    assert decode_one(code) == 0
    assert mulaw_to_float(bytes([code]) * 3).tolist() == [0.0, 0.0, 0.0]


def test_silence_constant_is_the_positive_zero_code():
    assert MULAW_SILENCE == 0xFF
    assert encode_one(0) == 0xFF


@pytest.mark.parametrize(
    ("code", "pcm"),
    [
        (0x00, -32124),
        (0x0F, -16764),
        (0x10, -15996),
        (0x70, -120),
        (0x7E, -8),
        (0x80, 32124),
        (0x8F, 16764),
        (0xEF, 132),
        (0xFE, 8),
    ],
)
def test_known_g711_decode_values(code, pcm):
    assert decode_one(code) == pcm


@pytest.mark.parametrize(
    ("pcm", "code"),
    [(0, 0xFF), (8, 0xFE), (-8, 0x7E), (132, 0xEF), (32767, 0x80), (-32768, 0x00)],
)
def test_known_g711_encode_values(pcm, code):
    assert encode_one(pcm) == code


def test_decode_output_is_int16_and_float_is_scaled():
    assert mulaw_decode(ALL_CODES).dtype == np.int16
    floats = mulaw_to_float(ALL_CODES)
    assert floats.dtype == np.float32
    np.testing.assert_array_equal(floats * 32768, mulaw_decode(ALL_CODES).astype(np.float32))


def test_float_decode_into_a_buffer_slice_leaves_the_rest_alone():
    buffer = np.full(len(ALL_CODES) + 4, 7.0, dtype=np.float32)
    returned = mulaw_to_float(ALL_CODES, out=buffer[2:-2])
    np.testing.assert_array_equal(buffer[2:-2], mulaw_to_float(ALL_CODES))
    assert buffer[:2].tolist() == buffer[-2:].tolist() == [7.0, 7.0]
    assert np.shares_memory(returned, buffer)


def test_every_code_survives_decode_then_encode():
    """Except negative zero (0x7F), which encodes back as positive zero."""
    round_trip = np.frombuffer(mulaw_encode(mulaw_decode(ALL_CODES)), dtype=np.uint8)
    expected = np.arange(256, dtype=np.uint8)
    expected[0x7F] = 0xFF
    np.testing.assert_array_equal(round_trip, expected)


def test_round_trip_error_is_at_most_half_a_quantisation_step():
    """A step is 1/16 of the segment's span, so the error is at most (|x| + bias) / 32."""
    pcm = ALL_PCM.astype(np.int64)
    error = np.abs(mulaw_decode(mulaw_encode(ALL_PCM)).astype(np.int64) - pcm)
    in_range = np.abs(pcm) <= CLIP
    assert np.all(error[in_range] <= (np.abs(pcm[in_range]) + 0x84) / 32)
    assert error[in_range].max() == 512
    assert error.max() <= 32768 - 32124


def test_round_trip_of_a_speech_level_sine_keeps_g711_quality():
    t = np.arange(8000) / 8000
    pcm = np.round(0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    decoded = mulaw_decode(mulaw_encode(pcm)).astype(np.float64)
    noise = decoded - pcm
    snr_db = 10 * np.log10(np.sum(pcm.astype(np.float64) ** 2) / np.sum(noise**2))
    assert snr_db > 35


def test_encode_accepts_wider_integer_arrays():
    np.testing.assert_array_equal(
        np.frombuffer(mulaw_encode(ALL_PCM.astype(np.int32)), dtype=np.uint8),
        np.frombuffer(mulaw_encode(ALL_PCM), dtype=np.uint8),
    )


@pytest.fixture(scope="module")
def audioop():
    """CPython's reference codec (ITU G.711 / Sun g711.c); removed in Python 3.13."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")


def test_decode_matches_the_reference_for_every_code(audioop):
    reference = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype=np.int16)
    np.testing.assert_array_equal(mulaw_decode(ALL_CODES), reference)


def test_encode_matches_the_reference_for_non_negative_samples(audioop):
    pcm = ALL_PCM[ALL_PCM >= 0]
    reference = np.frombuffer(audioop.lin2ulaw(pcm.tobytes(), 2), dtype=np.uint8)
    np.testing.assert_array_equal(np.frombuffer(mulaw_encode(pcm), dtype=np.uint8), reference)


def test_encode_of_negative_samples_is_never_further_than_the_reference(audioop):
    """The reference drops two bits with an arithmetic shift, which rounds negative samples
    away from zero; utils quantises the magnitude, so a few hundred negative samples land one
    code nearer zero, and never further from the true value."""
    pcm = ALL_PCM[ALL_PCM < 0]
    ours = np.frombuffer(mulaw_encode(pcm), dtype=np.uint8)
    reference = np.frombuffer(audioop.lin2ulaw(pcm.tobytes(), 2), dtype=np.uint8)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    our_error = np.abs(mulaw_decode(bytes(ours)).astype(int) - pcm)
    reference_error = np.abs(mulaw_decode(bytes(reference)).astype(int) - pcm)
    assert np.all(our_error <= reference_error)
