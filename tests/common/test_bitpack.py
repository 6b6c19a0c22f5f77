"""Tests for threepc.common.bitpack: round trips, exact sizes, the information bound, and
decoders that refuse every malformed input with DecodeError and nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threepc.common.bitpack import (
    IndexCoding,
    decode_indices,
    encode_indices,
    encode_indices_as,
    index_bits,
    log2_binomial,
    pack_bits,
    pack_uints,
    unpack_bits,
    unpack_uints,
)
from threepc.common.errors import DecodeError

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _random_set(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64)


@st.composite
def index_sets(draw: st.DrawFn, max_d: int = 3000) -> tuple[np.ndarray, int]:
    """Uniform sets, clustered runs, and the edges k in {0, 1, d} and d = 1."""
    d = draw(st.integers(1, max_d))
    shape = draw(st.sampled_from(["uniform", "runs", "edge"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if shape == "edge":
        k = draw(st.sampled_from([0, 1, d, max(d - 1, 0)]))
        return _random_set(rng, d, k), d
    if shape == "uniform":
        return _random_set(rng, d, draw(st.integers(0, d))), d
    # A few dense runs with long gaps between them, like TopK on a block-structured gradient.
    starts = rng.integers(0, d, size=draw(st.integers(1, 8)))
    lengths = rng.integers(1, max(2, d // 10), size=starts.size)
    x = np.unique(np.concatenate([np.arange(s, min(s + n, d)) for s, n in zip(starts, lengths)]))
    return x.astype(np.int64), d


# --- index codings: round trip and sizes ------------------------------------------------------


@settings(FAST, max_examples=300)
@given(index_sets())
def test_every_coding_round_trips_with_exact_size(case: tuple[np.ndarray, int]) -> None:
    x, d = case
    sizes = {}
    for coding in IndexCoding:
        data, bits = encode_indices_as(coding, x, d)
        assert len(data) == math.ceil(bits / 8)
        y = decode_indices(coding, data, x.size, d)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, x)
        sizes[coding] = bits
    coding, data, bits = encode_indices(x, d)
    assert bits == min(sizes.values()) == sizes[coding]
    assert index_bits(x, d) == bits
    assert len(data) == math.ceil(bits / 8)
    np.testing.assert_array_equal(decode_indices(coding, data, x.size, d), x)


@pytest.mark.parametrize("d", [1, 2, 7, 1000])
def test_implied_sets_cost_nothing(d: int) -> None:
    # k = 0 and k = d are determined by (count, d): log2 C(d, k) = 0 bits.
    for x in (np.arange(0), np.arange(d)):
        coding, data, bits = encode_indices(x, d)
        assert (bits, data) == (0, b"")
        np.testing.assert_array_equal(decode_indices(coding, b"", x.size, d), x)
        with pytest.raises(DecodeError, match="expected 0"):
            decode_indices(coding, b"\x00", x.size, d)


def test_one_index_costs_fixed_width() -> None:
    coding, _, bits = encode_indices(np.array([123_456]), 1_000_000)
    assert (coding, bits) == (IndexCoding.FIXED_WIDTH, 20)  # ceil(log2 1e6) = the limit, rounded up


def test_known_layouts() -> None:
    # d = 16, x = {1, 6, 7, 12}: w = 4, EF l = floor(log2 4) = 2, gaps 1, 4, 0, 4.
    x, d = np.array([1, 6, 7, 12]), 16
    assert encode_indices_as(IndexCoding.FIXED_WIDTH, x, d) == (bytes([0x16, 0x7C]), 16)
    # EF low bits 01 10 11 00, highs 0 1 1 3 -> ones at h_i + i = 0, 2, 3, 6: 1011001, 15 bits.
    assert encode_indices_as(IndexCoding.ELIAS_FANO, x, d) == (bytes([0x6C, 0xB2]), 15)
    assert encode_indices_as(IndexCoding.BITMAP, x, d) == (bytes([0x43, 0x08]), 16)
    # Golomb: mean gap 2.25 -> GVV m = 2 (theta = 9/13); b = 1, u = 0: header 0001 (m - 1),
    # no a_i bits, remainder bits 1 0 0 0, unary q = 0 2 0 2: 1 001 1 001 -> 0001 1000 1001 1001.
    assert encode_indices_as(IndexCoding.GOLOMB_RICE, x, d) == (bytes([0x18, 0x99]), 16)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_within_five_percent_of_information_limit(density: float) -> None:
    d = 1_000_000
    k = int(d * density)
    x = _random_set(np.random.default_rng(42), d, k)
    coding, data, bits = encode_indices(x, d)
    assert bits <= 1.05 * log2_binomial(d, k)
    np.testing.assert_array_equal(decode_indices(coding, data, k, d), x)


def test_golomb_beats_elias_fano_where_ef_is_weak() -> None:
    # At k/d = 10% EF costs ~1.12x the limit; the Golomb coding is the one that meets 1.05x.
    d, k = 1_000_000, 100_000
    x = _random_set(np.random.default_rng(1), d, k)
    ef = encode_indices_as(IndexCoding.ELIAS_FANO, x, d)[1]
    golomb = encode_indices_as(IndexCoding.GOLOMB_RICE, x, d)[1]
    assert golomb < 1.02 * log2_binomial(d, k) < ef
    assert encode_indices(x, d)[0] is IndexCoding.GOLOMB_RICE


def test_bitmap_wins_for_half_dense() -> None:
    x = _random_set(np.random.default_rng(2), 10_000, 5_000)
    assert encode_indices(x, 10_000)[:1] == (IndexCoding.BITMAP,)
    assert index_bits(x, 10_000) == 10_000


def test_encoder_refuses_invalid_sets() -> None:
    for bad, d in [([3, 2], 10), ([1, 1], 10), ([10], 10), ([-1], 10), ([[1]], 10), ([0.5], 2)]:
        with pytest.raises(ValueError):
            encode_indices(np.array(bad), d)


# --- index codings: malformed input -----------------------------------------------------------


def _decode_or_decode_error(coding: int, data: bytes, count: int, d: int) -> None:
    """Decoding either raises DecodeError or returns a valid set (anything else propagates)."""
    try:
        y = decode_indices(coding, data, count, d)
    except DecodeError:
        return
    assert y.dtype == np.int64 and y.shape == (count,)
    if count:
        assert y[0] >= 0 and y[-1] < d and (np.diff(y) > 0).all()


@settings(deadline=None, max_examples=1500)
@given(
    coding=st.integers(-1, 5),
    data=st.binary(max_size=40),
    count=st.integers(-1, 120),
    d=st.integers(-1, 400),
)
def test_random_bytes_raise_only_decode_error(coding: int, data: bytes, count: int, d: int) -> None:
    _decode_or_decode_error(coding, data, count, d)


@settings(deadline=None, max_examples=1500)
@given(
    case=index_sets(max_d=500),
    coding=st.sampled_from(list(IndexCoding)),
    mutation=st.sampled_from(["flip", "truncate", "append", "count", "d", "coding"]),
    where=st.integers(0, 2**16),
    delta=st.integers(-3, 3),
)
def test_mutated_encodings_raise_only_decode_error(
    case: tuple[np.ndarray, int], coding: IndexCoding, mutation: str, where: int, delta: int
) -> None:
    x, d = case
    data, _ = encode_indices_as(coding, x, d)
    count, c = x.size, int(coding)
    if mutation == "flip" and data:
        buf = bytearray(data)
        buf[where % len(buf)] ^= 1 << (where % 8)
        data = bytes(buf)
    elif mutation == "truncate":
        data = data[: where % (len(data) + 1)]
    elif mutation == "append":
        data = data + bytes([where % 256]) * (1 + where % 3)
    elif mutation == "count":
        count += delta
    elif mutation == "d":
        d += delta
    else:
        c = (c + 1 + where % 3) % len(IndexCoding)
    _decode_or_decode_error(c, data, count, d)


def test_flipped_bit_is_never_silently_the_same_set() -> None:
    # Encodings are canonical: a changed byte string decodes to a different set or fails.
    rng = np.random.default_rng(3)
    d = 5000
    x = _random_set(rng, d, 300)
    for coding in IndexCoding:
        data, _ = encode_indices_as(coding, x, d)
        for i in rng.integers(0, len(data) * 8, size=50):
            buf = bytearray(data)
            buf[i // 8] ^= 0x80 >> (i % 8)
            try:
                y = decode_indices(coding, bytes(buf), x.size, d)
            except DecodeError:
                continue
            assert not np.array_equal(y, x)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((7, b"", 1, 10), "unknown index coding 7"),
        (("x", b"", 1, 10), "unknown index coding"),
        ((0, b"", 11, 10), "count > d"),
        ((0, b"", -1, 10), "index count must be >= 0"),
        ((0, b"", 1.5, 10), "index count must be an integer"),
        ((0, "not bytes", 1, 10), "expected bytes"),
        ((IndexCoding.FIXED_WIDTH, b"\x01", 3, 16), "1 bytes, expected 2 for 12 bits"),
        ((IndexCoding.FIXED_WIDTH, b"\x00\x00", 1, 16), "2 bytes, expected 1"),
        ((IndexCoding.FIXED_WIDTH, b"\x0f", 1, 16), "nonzero padding"),
        ((IndexCoding.FIXED_WIDTH, b"\xf0", 1, 10), "index 15 >= d = 10"),
        ((IndexCoding.FIXED_WIDTH, b"\x33", 2, 16), "not strictly increasing"),
        ((IndexCoding.FIXED_WIDTH, b"\x32", 2, 16), "not strictly increasing"),
        ((IndexCoding.BITMAP, b"\xc0\x00", 1, 16), "2 bits set, expected count = 1"),
        ((IndexCoding.BITMAP, b"\x80", 1, 16), "1 bytes, expected 2"),
        ((IndexCoding.ELIAS_FANO, b"\x00\x00", 2, 16), "malformed unary part"),
        ((IndexCoding.GOLOMB_RICE, b"\x00\x00", 2, 16), "malformed unary part"),
        ((IndexCoding.GOLOMB_RICE, b"\xf0", 1, 10), "Golomb parameter m = 16 > d = 10"),
        ((IndexCoding.GOLOMB_RICE, b"\x00" * 100, 1, 16), "at most"),
    ],
)
def test_decode_errors_name_the_problem(args: tuple, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_indices(*args)


def test_wrong_count_or_d_is_refused() -> None:
    x = np.array([1, 6, 7, 12])
    for coding in IndexCoding:
        data, _ = encode_indices_as(coding, x, 16)
        for count, d in [(3, 16), (5, 16), (4, 8)]:
            with pytest.raises(DecodeError):
                decode_indices(coding, data, count, d)


# --- fixed-width integers and bits ------------------------------------------------------------


@pytest.mark.parametrize("width", range(1, 33))
def test_pack_uints_round_trips(width: int) -> None:
    rng = np.random.default_rng(width)
    for count in (0, 1, 7, 100):
        v = rng.integers(0, 2**width, size=count, dtype=np.int64)
        v[: min(count, 2)] = [2**width - 1, 0][: min(count, 2)]  # both extremes
        data = pack_uints(v, width)
        assert len(data) == math.ceil(count * width / 8)
        np.testing.assert_array_equal(unpack_uints(data, count, width), v)


def test_pack_uints_layout_is_big_endian() -> None:
    assert pack_uints(np.array([1, 2, 3]), 3) == bytes([0b001_010_01, 0b1_0000000])
    assert pack_uints(np.array([0xABCDEF01]), 32) == bytes.fromhex("abcdef01")


def test_unpack_uints_refuses_wrong_length_and_padding() -> None:
    data = pack_uints(np.array([5, 6, 7]), 3)  # 9 bits -> 2 bytes, 7 padding bits
    for bad in (data[:1], data + b"\x00", b""):
        with pytest.raises(DecodeError, match="bytes, expected 2"):
            unpack_uints(bad, 3, 3)
    with pytest.raises(DecodeError, match="nonzero padding"):
        unpack_uints(data[:1] + bytes([data[1] | 1]), 3, 3)
    with pytest.raises(DecodeError, match="width"):
        unpack_uints(b"", 0, 33)


def test_pack_uints_refuses_values_that_do_not_fit() -> None:
    for values, width in [([8], 3), ([-1], 3), ([1], 0), ([1], 33)]:
        with pytest.raises(ValueError):
            pack_uints(np.array(values), width)


def test_pack_bits_round_trips_and_validates() -> None:
    flags = np.random.default_rng(0).random(13) < 0.5
    data = pack_bits(flags)
    assert len(data) == 2
    np.testing.assert_array_equal(unpack_bits(data, 13), flags)
    with pytest.raises(DecodeError, match="2 bytes, expected 3"):
        unpack_bits(data, 17)
    with pytest.raises(DecodeError, match="nonzero padding"):
        unpack_bits(data[:1] + bytes([data[1] | 1]), 13)


def test_log2_binomial() -> None:
    assert log2_binomial(10, 0) == log2_binomial(10, 10) == 0.0
    assert log2_binomial(10, 3) == pytest.approx(math.log2(120))


def test_golomb_round_trips_with_rice_and_general_parameters() -> None:
    """The decoder's two remainder paths: m a power of two (no short remainders) and any other m."""
    rng = np.random.default_rng(3)
    d, parameters = 100_000, set()
    for density in np.geomspace(0.002, 0.3, 40):
        x = np.sort(rng.choice(d, int(density * d), replace=False))
        data, _ = encode_indices_as(IndexCoding.GOLOMB_RICE, x, d)
        m = int.from_bytes(data[:3], "big") >> (24 - 17)  # the header: m - 1 in _width(d) = 17 bits
        parameters.add(m + 1)
        assert np.array_equal(decode_indices(IndexCoding.GOLOMB_RICE, data, x.size, d), x)
    assert {m for m in parameters if m & (m - 1) == 0} and {m for m in parameters if m & (m - 1)}
