"""Shamir over GF(2^8) with the AES polynomial, MarbleRun's share layout (x-coordinate last)."""

from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marblekeep.errors import RecoveryError
from marblekeep.recovery import combine, split
from marblekeep.recovery.shamir import _div, _mul


def test_field_is_the_aes_field() -> None:
    # FIPS-197 section 4.2: {57} * {83} = {c1}, {57} * {13} = {fe}
    assert _mul(0x57, 0x83) == 0xC1
    assert _mul(0x57, 0x13) == 0xFE
    assert _mul(0x02, 0x80) == 0x1B  # x * x^7 reduced by x^8 + x^4 + x^3 + x + 1
    for a in range(1, 256):
        assert _mul(a, _div(1, a)) == 1
        assert _mul(a, 1) == a and _mul(a, 0) == 0


def test_hand_made_shares_recombine() -> None:
    # secret byte s with f(x) = s + 0x1d * x: shares at x = 1 and x = 7
    s = 0xA5
    share1 = bytes([s ^ _mul(0x1D, 1), 1])
    share7 = bytes([s ^ _mul(0x1D, 7), 7])
    assert combine([share1, share7]) == bytes([s])
    assert combine([share7, share1]) == bytes([s])


def test_share_layout() -> None:
    secret = os.urandom(32)
    shares = split(secret, 5, 3)
    assert all(len(s) == 33 for s in shares)
    xs = [s[-1] for s in shares]
    assert len(set(xs)) == 5 and all(1 <= x <= 255 for x in xs)
    assert all(s[:-1] != secret for s in shares)
    # x-coordinates are random, not 1..n
    seen = {tuple(sorted(s[-1] for s in split(secret, 3, 2))) for _ in range(20)}
    assert len(seen) > 1


@settings(max_examples=150, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=48),
    parts=st.integers(min_value=2, max_value=8),
    data=st.data(),
)
def test_any_threshold_subset_recombines(secret: bytes, parts: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(min_value=2, max_value=parts))
    shares = split(secret, parts, threshold)
    subset = data.draw(st.permutations(shares)).copy()[: data.draw(st.integers(threshold, parts))]
    assert combine(subset) == secret


@settings(max_examples=150, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=32),
    parts=st.integers(min_value=3, max_value=8),
    data=st.data(),
)
def test_fewer_than_threshold_shares_reveal_nothing_useful(
    secret: bytes, parts: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(min_value=3, max_value=parts))
    shares = split(secret, parts, threshold)
    fewer = data.draw(st.integers(min_value=2, max_value=threshold - 1))
    assert combine(shares[:fewer]) != secret  # fails only with probability 2^-128 or less


def test_all_subsets_of_a_two_of_three() -> None:
    secret = os.urandom(32)
    shares = split(secret, 3, 2)
    for pair in itertools.permutations(shares, 2):
        assert combine(list(pair)) == secret
    assert combine(shares) == secret


def test_injected_rng_is_deterministic() -> None:
    rnd = random.Random(7)
    a = split(b"secret", 4, 2, rng=rnd.randbytes)
    rnd = random.Random(7)
    b = split(b"secret", 4, 2, rng=rnd.randbytes)
    assert a == b


@pytest.mark.parametrize(
    ("secret", "parts", "threshold", "message"),
    [
        (b"s", 2, 3, "parts cannot be less than threshold"),
        (b"s", 256, 2, "parts cannot exceed 255"),
        (b"s", 3, 1, "threshold must be at least 2"),
        (b"", 3, 2, "cannot split an empty secret"),
    ],
)
def test_split_errors(secret: bytes, parts: int, threshold: int, message: str) -> None:
    with pytest.raises(RecoveryError, match=message):
        split(secret, parts, threshold)


def test_combine_errors() -> None:
    shares = split(os.urandom(32), 3, 2)
    with pytest.raises(RecoveryError, match="less than two parts"):
        combine(shares[:1])
    with pytest.raises(RecoveryError, match="same length"):
        combine([shares[0], shares[1][:-2] + shares[1][-1:]])
    with pytest.raises(RecoveryError, match="duplicate part"):
        combine([shares[0], shares[0]])
    with pytest.raises(RecoveryError, match="at least two bytes"):
        combine([b"\x01", b"\x02"])
