"""Shamir secret sharing over GF(2^8), in the share format MarbleRun uses (HashiCorp's layout).

- Field: GF(2^8) with the AES reduction polynomial x^8 + x^4 + x^3 + x + 1 (0x11B).
- ``split(secret, parts, threshold)``: for every secret byte, one random polynomial of
  degree ``threshold - 1`` whose constant term is that byte; each share holds the
  polynomial values at its x-coordinate, with the x-coordinate appended as the **last**
  byte. The x-coordinates are distinct and random in 1..255. A 32-byte secret gives
  33-byte shares.
- ``combine(shares)``: Lagrange interpolation at x = 0. Any ``threshold`` shares give the
  secret; fewer give an unrelated value (no error: the caller test-decrypts).

Arithmetic uses log/exp tables. Python offers no constant-time guarantees; the shares
are handled once per recovery, by the Coordinator, so table timing is acceptable here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from marblekeep.errors import RecoveryError

__all__ = ["combine", "split"]

Rng = Callable[[int], bytes]


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 510
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        # multiply by the generator 3: x*3 = x*2 ^ x, with x*2 reduced by 0x11B
        doubled = (x << 1) ^ (0x11B if x & 0x80 else 0)
        x = doubled ^ x
    for i in range(255, 510):
        exp[i] = exp[i - 255]
    return exp, log


_EXP, _LOG = _tables()


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] - _LOG[b]) % 255]


def _randbelow(n: int, rng: Rng) -> int:
    """Uniform integer in [0, n) for n <= 256, by rejection sampling."""
    limit = 256 - (256 % n)
    while True:
        value = rng(1)[0]
        if value < limit:
            return value % n


def split(secret: bytes, parts: int, threshold: int, *, rng: Rng = os.urandom) -> list[bytes]:
    """Split ``secret`` into ``parts`` shares, any ``threshold`` of which recombine it."""
    if parts < threshold:
        raise RecoveryError("shamir: parts cannot be less than threshold")
    if parts > 255:
        raise RecoveryError("shamir: parts cannot exceed 255")
    if threshold < 2:
        raise RecoveryError("shamir: threshold must be at least 2")
    if not secret:
        raise RecoveryError("shamir: cannot split an empty secret")
    # distinct random x-coordinates in 1..255 (Fisher-Yates over 0..254, then + 1)
    xs = list(range(255))
    for i in range(254, 0, -1):
        j = _randbelow(i + 1, rng)
        xs[i], xs[j] = xs[j], xs[i]
    coords = [x + 1 for x in xs[:parts]]
    shares = [bytearray(len(secret) + 1) for _ in range(parts)]
    for share, x in zip(shares, coords, strict=True):
        share[-1] = x
    for idx, byte in enumerate(secret):
        coefficients = [byte, *rng(threshold - 1)]
        for share, x in zip(shares, coords, strict=True):
            y = 0
            for c in reversed(coefficients):  # Horner
                y = _mul(y, x) ^ c
            share[idx] = y
    return [bytes(s) for s in shares]


def combine(shares: Sequence[bytes]) -> bytes:
    """Recombine shares made by :func:`split` (x-coordinate in the last byte)."""
    if len(shares) < 2:
        raise RecoveryError("shamir: less than two parts cannot be used to reconstruct the secret")
    length = len(shares[0])
    if length < 2:
        raise RecoveryError("shamir: parts must be at least two bytes")
    if any(len(s) != length for s in shares):
        raise RecoveryError("shamir: all parts must be the same length")
    xs = [s[-1] for s in shares]
    if len(set(xs)) != len(xs):
        raise RecoveryError("shamir: duplicate part detected")
    # Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_i ^ x_j)   (subtraction is XOR)
    basis = []
    for i, xi in enumerate(xs):
        weight = 1
        for j, xj in enumerate(xs):
            if i != j:
                weight = _mul(weight, _div(xj, xi ^ xj))
        basis.append(weight)
    secret = bytearray(length - 1)
    for idx in range(length - 1):
        acc = 0
        for share, weight in zip(shares, basis, strict=True):
            acc ^= _mul(share[idx], weight)
        secret[idx] = acc
    return bytes(secret)
