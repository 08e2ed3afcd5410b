"""Recovery secrets: a fresh DEK and what each recovery-key owner receives (MarbleRun's format).

:func:`generate_recovery_keys` runs when a manifest is set, or an update changes the
recovery keys (:func:`recovery_keys_changed`). With ``n`` keys and threshold ``t``:

- ``n <= 1``: DEK = 32 random bytes; the key (if any) receives
  ``RSA-OAEP(SHA-256, MGF1-SHA-256, no label)(DEK)``. Recovery data ``R`` is ``None``.
  With no key the DEK cannot be recovered and the secrets map is empty.
- ``n >= 2`` and ``t`` in ``{0, n}``: ``n`` random 32-byte shares, DEK = their XOR; each
  key receives OAEP(its share).
- ``2 <= t < n``: DEK random, split with Shamir (:mod:`marblekeep.recovery.shamir`,
  33-byte shares); each key receives OAEP(its share).

For the multi-party schemes ``R = {"<hex sha256(share)>": true, ...}`` as compact JSON
with sorted keys (Go's ``json.Marshal``); the store keeps it in plaintext so the
Coordinator can check uploads before it knows the DEK.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from marblekeep.errors import ManifestError, Problem
from marblekeep.recovery import shamir

__all__ = [
    "DEK_SIZE",
    "RecoveryKeyMaterial",
    "generate_recovery_keys",
    "oaep",
    "parse_recovery_public_key",
    "recovery_data_for",
    "recovery_keys_changed",
]

DEK_SIZE = 32
Rng = Callable[[int], bytes]

_PEM_BLOCK = re.compile(r"-----BEGIN ([^\r\n-]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def oaep() -> padding.OAEP:
    """RSA-OAEP with SHA-256 and MGF1-SHA-256, no label (what MarbleRun uses for recovery)."""
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True)
class RecoveryKeyMaterial:
    """A new DEK, each owner's encrypted recovery secret, and the recovery data R to store."""

    dek: bytes = field(repr=False)
    secrets: Mapping[str, bytes]  # name -> RSA-OAEP ciphertext (the API returns it base64)
    recovery_data: bytes | None


def parse_recovery_public_key(name: str, pem: str) -> rsa.RSAPublicKey:
    """The RSA key in the first PEM block, which must be of type ``PUBLIC KEY`` (PKIX)."""
    path = f"RecoveryKeys.{name}"
    match = _PEM_BLOCK.search(pem)
    if match is None or match.group(1) != "PUBLIC KEY":
        raise ManifestError(
            f"{path}: given PEM data is not a public key",
            problems=[
                Problem(path, 'given PEM data is not a public key: use a "PUBLIC KEY" (PKIX) PEM block')
            ],
        )
    try:
        key = serialization.load_pem_public_key(match.group(0).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ManifestError(
            f"{path}: the PUBLIC KEY block cannot be parsed",
            problems=[
                Problem(path, "the PUBLIC KEY block cannot be parsed; export it with openssl rsa -pubout")
            ],
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ManifestError(
            f"{path}: recovery keys must be RSA public keys",
            problems=[Problem(path, "recovery keys must be RSA public keys (e.g. openssl genrsa 4096)")],
        )
    return key


def recovery_data_for(shares: list[bytes]) -> bytes:
    """``R`` for multi-party shares: compact JSON ``{hex(sha256(share)): true}`` with sorted keys."""
    entries = {sha256(s).hexdigest(): True for s in shares}
    return json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()


def _check_threshold(count: int, threshold: int) -> None:
    path = "Config.RecoveryThreshold"
    if threshold < 0:
        raise ManifestError(f"{path}: must not be negative", problems=[Problem(path, "must not be negative")])
    if threshold == 1:
        message = "invalid recovery threshold: if set, threshold must be at least 2"
        raise ManifestError(message, problems=[Problem(path, message)])
    if threshold > count:
        raise ManifestError("not enough recovery keys", problems=[Problem(path, "not enough recovery keys")])


def generate_recovery_keys(
    recovery_keys: Mapping[str, str], threshold: int = 0, *, rng: Rng = os.urandom
) -> RecoveryKeyMaterial:
    """A new DEK and the recovery secrets for the manifest's ``RecoveryKeys``/``RecoveryThreshold``."""
    names = sorted(recovery_keys)
    public = {name: parse_recovery_public_key(name, recovery_keys[name]) for name in names}
    _check_threshold(len(names), threshold)
    if len(names) <= 1:
        dek = rng(DEK_SIZE)
        return RecoveryKeyMaterial(dek, {n: public[n].encrypt(dek, oaep()) for n in names}, None)
    if threshold in (0, len(names)):
        shares = [rng(DEK_SIZE) for _ in names]
        dek = bytes(DEK_SIZE)
        for share in shares:
            dek = bytes(a ^ b for a, b in zip(dek, share, strict=True))
    else:
        dek = rng(DEK_SIZE)
        shares = shamir.split(dek, len(names), threshold, rng=rng)
    secrets = {n: public[n].encrypt(share, oaep()) for n, share in zip(names, shares, strict=True)}
    return RecoveryKeyMaterial(dek, secrets, recovery_data_for(shares))


def recovery_keys_changed(
    old_keys: Mapping[str, str], old_threshold: int, new_keys: Mapping[str, str], new_threshold: int
) -> bool:
    """MarbleRun's rule for "the recovery keys changed" (a new DEK and new secrets are issued)."""
    if len(old_keys) != len(new_keys):
        return True
    count = len(new_keys)
    equivalent = old_threshold == new_threshold or {old_threshold, new_threshold} == {0, count}
    if equivalent:
        return dict(old_keys) != dict(new_keys)
    return True
