"""``verify_signatures``: the signature-count and distinct-key rule (issue 11, finding 17).

MarbleRun's rule (reference §7.4, ``validateRecoveryKeys``): with threshold 0 or n there must be
exactly n signatures, each key matching a distinct one; otherwise exactly t signatures, each
matching a distinct key. Tested directly, case by case.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from marblekeep.errors import RecoveryError
from marblekeep.recovery import sign_recovery_secret
from marblekeep.recovery.recoverer import verify_signatures

NAMES = ["alice", "bob", "carol"]


@pytest.fixture(scope="module")
def owners() -> dict[str, rsa.RSAPrivateKey]:
    return {n: rsa.generate_private_key(public_exponent=65537, key_size=2048) for n in [*NAMES, "mallory"]}


def pem(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.decode()


def keys(owners: dict[str, rsa.RSAPrivateKey], names: list[str]) -> dict[str, str]:
    return {n: pem(owners[n]) for n in names}


def signed(owners: dict[str, rsa.RSAPrivateKey], *signers: str) -> list[tuple[bytes, bytes]]:
    out = []
    for i, name in enumerate(signers):
        secret = bytes([i + 1]) * 32
        out.append((secret, sign_recovery_secret(secret, owners[name])))
    return out


@pytest.mark.parametrize("threshold", [0, 3])
def test_all_keys_needed_exactly_n_distinct_signatures(
    owners: dict[str, rsa.RSAPrivateKey], threshold: int
) -> None:
    k = keys(owners, NAMES)
    verify_signatures(signed(owners, "alice", "bob", "carol"), k, threshold)
    verify_signatures(signed(owners, "carol", "alice", "bob"), k, threshold)  # order does not matter
    with pytest.raises(RecoveryError, match="from 3 distinct recovery key owners, got 2"):
        verify_signatures(signed(owners, "alice", "bob"), k, threshold)
    with pytest.raises(RecoveryError, match="got 4"):
        verify_signatures(signed(owners, "alice", "bob", "carol", "alice"), k, threshold)
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        verify_signatures(signed(owners, "alice", "bob", "bob"), k, threshold)  # bob twice, no carol
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        verify_signatures(signed(owners, "alice", "bob", "mallory"), k, threshold)  # not a key


def test_threshold_t_of_n_needs_exactly_t_signatures_of_distinct_keys(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    k = keys(owners, NAMES)
    for pair in (("alice", "bob"), ("bob", "carol"), ("carol", "alice")):
        verify_signatures(signed(owners, *pair), k, 2)
    with pytest.raises(RecoveryError, match="from 2 distinct recovery key owners, got 1"):
        verify_signatures(signed(owners, "alice"), k, 2)
    with pytest.raises(RecoveryError, match="got 3"):  # exactly t, not "at least t"
        verify_signatures(signed(owners, "alice", "bob", "carol"), k, 2)
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        verify_signatures(signed(owners, "alice", "alice"), k, 2)
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        verify_signatures(signed(owners, "alice", "mallory"), k, 2)


def test_single_key_and_a_signature_over_another_secret(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    k = keys(owners, ["alice"])
    verify_signatures(signed(owners, "alice"), k, 0)
    secret, signature = signed(owners, "alice")[0]
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        verify_signatures([(secret[:-1] + b"\x00", signature)], k, 0)  # signed something else
    with pytest.raises(RecoveryError, match="got 0"):
        verify_signatures([], k, 0)


def test_the_matching_finds_an_assignment_when_one_key_is_listed_twice(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    """Two names with the same public key: two signatures by that key match two distinct entries
    (a greedy check would give up); a third name still needs its own signature."""
    k = {"a1": pem(owners["alice"]), "a2": pem(owners["alice"]), "bob": pem(owners["bob"])}
    verify_signatures(signed(owners, "alice", "bob", "alice"), k, 0)
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        verify_signatures(signed(owners, "alice", "alice", "alice"), k, 0)


def test_unusable_stored_keys_are_a_recovery_error_without_key_material(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    with pytest.raises(RecoveryError, match="recovery keys cannot be used") as bad:
        verify_signatures(signed(owners, "alice"), {"alice": "not a pem"}, 0)
    assert "BEGIN" not in bad.value.message
