"""The recovery upload state machine: dispatch by length, remaining, signatures, resets, ephemeral key."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from marblekeep.errors import RecoveryError
from marblekeep.recovery import (
    MSG_DONE,
    Recoverer,
    RecoveryKeyMaterial,
    decrypt_recovery_secret,
    encrypt_for_coordinator,
    generate_recovery_keys,
    progress_message,
    sign_recovery_secret,
)
from marblekeep.recovery.recoverer import LEGACY_WINDOW

NAMES = ["alice", "bob", "carol"]


@pytest.fixture(scope="module")
def owners() -> dict[str, rsa.RSAPrivateKey]:
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in NAMES}


@pytest.fixture(scope="module")
def ephemeral() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)  # 4096 in production


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class Deployment:
    """A manifest's recovery keys, the DEK they protect, and each owner's plaintext secret."""

    def __init__(self, owners: dict[str, rsa.RSAPrivateKey], names: list[str], threshold: int) -> None:
        self.owners = owners
        self.keys = {n: public_pem(owners[n]) for n in names}
        self.threshold = threshold
        self.material: RecoveryKeyMaterial = generate_recovery_keys(self.keys, threshold)
        self.plain = {n: decrypt_recovery_secret(self.material.secrets[n], owners[n]) for n in names}
        self.tried: list[bytes] = []

    def try_key(self, candidate: bytes) -> bool:
        self.tried.append(candidate)
        return candidate == self.material.dek

    def recovery_keys(self, dek: bytes) -> tuple[Mapping[str, str], int]:
        assert dek == self.material.dek
        return self.keys, self.threshold

    def recoverer(
        self, ephemeral: rsa.RSAPrivateKey | None = None, *, with_r: bool = True, public: bool = False
    ) -> Recoverer:
        return Recoverer(
            self.material.recovery_data if with_r else None,
            self.try_key,
            self.recovery_keys,
            public_keys=self.keys if public else None,
            ephemeral_key_factory=(lambda: ephemeral)
            if ephemeral is not None
            else lambda: pytest.fail("no key"),
        )

    def signed(self, name: str, signer: str | None = None) -> tuple[bytes, bytes]:
        secret = self.plain[name]
        return secret, sign_recovery_secret(secret, self.owners[signer or name])


def test_single_key(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = dep.recoverer()
    progress = rec.upload(*dep.signed("alice"))
    assert progress.complete and progress.remaining == 0 and progress.message == MSG_DONE
    assert progress.dek == dep.material.dek and progress.recovery_data is None
    assert dep.material.dek.hex() not in repr(progress)


def test_single_key_wrong_then_right(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = dep.recoverer()
    wrong = os.urandom(32)
    progress = rec.upload(wrong, sign_recovery_secret(wrong, owners["alice"]))
    assert not progress.complete and progress.remaining == 1
    assert (
        progress.message == "Secret was processed successfully. Upload the next secret. Remaining secrets: 1"
    )
    assert rec.upload(*dep.signed("alice")).complete


def test_single_key_bad_signature_resets(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = dep.recoverer()
    with pytest.raises(RecoveryError, match="signature") as info:
        rec.upload(*dep.signed("alice", signer="bob"))
    assert dep.plain["alice"].hex() not in info.value.message
    secret, signature = dep.signed("alice")
    with pytest.raises(RecoveryError):
        rec.upload(secret, signature[:-1] + bytes([signature[-1] ^ 1]))
    assert rec.upload(secret, signature).complete


def test_xor_two_of_two(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice", "bob"], 0)
    rec = dep.recoverer()
    first = rec.upload(*dep.signed("alice"))
    assert (first.remaining, first.message, first.complete) == (1, progress_message(1), False)
    with pytest.raises(RecoveryError, match=r"^uploaded an invalid or already used secret$"):
        rec.upload(*dep.signed("alice"))  # reused share
    with pytest.raises(RecoveryError, match=r"^uploaded an invalid or already used secret$"):
        rec.upload(os.urandom(32), b"sig")  # not a share of this deployment
    with pytest.raises(RecoveryError, match=r"^recovery secrets must match in length$"):
        rec.upload(os.urandom(16), b"sig")
    done = rec.upload(*dep.signed("bob"))
    assert done.complete and done.dek == dep.material.dek and done.message == MSG_DONE


def test_xor_signature_failure_after_completion_resets_everything(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    dep = Deployment(owners, ["alice", "bob"], 2)
    rec = dep.recoverer()
    rec.upload(*dep.signed("alice"))
    with pytest.raises(RecoveryError, match="distinct recovery key"):
        rec.upload(*dep.signed("bob", signer="alice"))  # alice signed both: not two distinct owners
    # everybody starts again: alice's share is accepted again
    assert rec.upload(*dep.signed("alice")).remaining == 1
    assert rec.upload(*dep.signed("bob")).complete


def test_shamir_two_of_three_remaining_counts_unused_shares(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, NAMES, 2)
    rec = dep.recoverer()
    first = rec.upload(*dep.signed("carol"))
    assert first.remaining == 2 and not first.complete  # MarbleRun: unused entries, not t - 1
    with pytest.raises(RecoveryError, match="already used"):
        rec.upload(*dep.signed("carol"))
    done = rec.upload(*dep.signed("alice"))
    assert done.complete and done.dek == dep.material.dek


def test_shamir_three_of_three_is_xor_and_two_of_four_style_threshold(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    dep = Deployment(owners, NAMES, 3)  # t == n: XOR, 32-byte shares
    assert all(len(s) == 32 for s in dep.plain.values())
    rec = dep.recoverer()
    assert [rec.upload(*dep.signed(n)).remaining for n in NAMES] == [2, 1, 0]


def test_shamir_needs_t_signatures_from_distinct_keys(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, NAMES, 2)
    rec = dep.recoverer()
    rec.upload(*dep.signed("alice"))
    with pytest.raises(RecoveryError, match="distinct"):
        rec.upload(*dep.signed("bob", signer="alice"))
    rec.upload(*dep.signed("bob"))  # progress was reset: this is the first share again
    with pytest.raises(RecoveryError):
        rec.upload(dep.plain["carol"], b"\x00" * 256)
    rec.upload(*dep.signed("carol"))
    assert rec.upload(*dep.signed("bob")).complete


def test_shamir_without_recovery_data(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, NAMES, 2)
    rec = dep.recoverer(with_r=False)
    assert rec.upload(*dep.signed("bob")).remaining == 1
    with pytest.raises(RecoveryError, match="already used"):
        rec.upload(*dep.signed("bob"))
    assert rec.upload(*dep.signed("carol")).complete


def test_xor_with_lost_recovery_data_rebuilds_it(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice", "bob"], 0)
    rec = dep.recoverer(with_r=False)
    assert rec.upload(*dep.signed("bob")).remaining == 1
    done = rec.upload(*dep.signed("alice"))
    assert done.complete and done.dek == dep.material.dek
    assert done.recovery_data == dep.material.recovery_data  # to be stored again


def test_invalid_length_after_decryption(
    owners: dict[str, rsa.RSAPrivateKey], ephemeral: rsa.RSAPrivateKey
) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = dep.recoverer(ephemeral)
    encrypted = encrypt_for_coordinator(b"x" * 20, rec.public_key_der())
    with pytest.raises(RecoveryError, match=r"^invalid secret length$"):
        rec.upload(encrypted, b"sig")


def test_encrypted_uploads_via_the_ephemeral_key(
    owners: dict[str, rsa.RSAPrivateKey], ephemeral: rsa.RSAPrivateKey
) -> None:
    dep = Deployment(owners, NAMES, 2)
    rec = dep.recoverer(ephemeral)
    with pytest.raises(RecoveryError, match="no ephemeral key"):
        rec.upload(os.urandom(256), b"sig")
    der = rec.public_key_der()
    assert rec.public_key_der() == der  # created once
    for name in ("alice", "carol"):
        secret, signature = dep.signed(name)  # signature over the plaintext
        progress = rec.upload(encrypt_for_coordinator(secret, der), signature)
    assert progress.complete and progress.dek == dep.material.dek
    with pytest.raises(RecoveryError, match="decrypting"):
        rec.upload(os.urandom(256), b"sig")  # the ephemeral key is gone after success


def test_garbage_that_does_not_decrypt(
    owners: dict[str, rsa.RSAPrivateKey], ephemeral: rsa.RSAPrivateKey
) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = dep.recoverer(ephemeral)
    rec.public_key_der()
    with pytest.raises(RecoveryError, match="decrypting the recovery secret failed"):
        rec.upload(os.urandom(40), b"sig")


def test_default_ephemeral_key_is_rsa_4096(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = Recoverer(None, dep.try_key, dep.recovery_keys)
    key = serialization.load_der_public_key(rec.public_key_der())
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096


def test_failing_state_read_is_a_recovery_error(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, ["alice"], 0)

    def broken(dek: bytes) -> tuple[Mapping[str, str], int]:
        raise KeyError("manifest")

    rec = Recoverer(None, dep.try_key, broken)
    with pytest.raises(RecoveryError, match="cannot be read"):
        rec.upload(*dep.signed("alice"))


# ------------------------------------------------------------- issue 11, finding 2: signed uploads only


def junk(size: int = 32) -> tuple[bytes, bytes]:
    return os.urandom(size), os.urandom(256)


@pytest.mark.parametrize("size", [16, 32, 33])
def test_uploads_no_recovery_key_signed_are_refused_and_nothing_is_kept(
    owners: dict[str, rsa.RSAPrivateKey], size: int
) -> None:
    dep = Deployment(owners, ["alice"], 0)
    rec = dep.recoverer(public=True)
    assert rec.checks_signatures_first
    for _ in range(30):
        with pytest.raises(RecoveryError, match="does not match any recovery key") as refused:
            rec.upload(*junk(size))
        assert "nothing of this upload was kept" in refused.value.message
    # a stranger's valid signature is refused the same way
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    secret = os.urandom(32)
    with pytest.raises(RecoveryError, match="does not match any recovery key"):
        rec.upload(secret, sign_recovery_secret(secret, stranger))
    assert dep.tried == []  # no candidate key was even tried
    done = rec.upload(*dep.signed("alice"))
    assert done.message == MSG_DONE and dep.tried == [dep.material.dek]


def test_the_work_per_signed_upload_does_not_grow_with_earlier_uploads(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    """XOR 2-of-2 with R lost (the path MarbleRun searches in 2^n): an owner's many wrong uploads
    replace each other, every upload tries at most two candidates, and the right ones still work."""
    dep = Deployment(owners, ["alice", "bob"], 0)
    rec = dep.recoverer(with_r=False, public=True)
    tries = []
    for _ in range(40):
        wrong = os.urandom(32)
        before = len(dep.tried)
        assert rec.upload(wrong, sign_recovery_secret(wrong, owners["alice"])).remaining == 1
        tries.append(len(dep.tried) - before)
        with pytest.raises(RecoveryError, match="does not match any recovery key"):
            rec.upload(*junk())
    assert max(tries) <= 2
    assert rec.upload(*dep.signed("bob")).remaining == 1
    done = rec.upload(*dep.signed("alice"))  # replaces alice's last wrong upload
    assert done.complete and done.recovery_data is not None


def test_with_recovery_data_each_key_uploads_once_and_rules_stay_marbleruns(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    dep = Deployment(owners, NAMES, 2)
    rec = dep.recoverer(public=True)
    assert rec.upload(*dep.signed("carol")).remaining == 2
    with pytest.raises(RecoveryError, match="already used"):  # MarbleRun's message for a repeat
        rec.upload(*dep.signed("carol"))
    with pytest.raises(RecoveryError, match="already uploaded"):  # carol signs alice's share
        rec.upload(*dep.signed("alice", signer="carol"))
    assert rec.upload(*dep.signed("bob")).message == MSG_DONE


def test_a_state_without_stored_public_keys_keeps_a_bounded_window(
    owners: dict[str, rsa.RSAPrivateKey],
) -> None:
    """States written before the public keys were stored: signatures are checked only at the end,
    so junk is kept, but only the last LEGACY_WINDOW uploads, and only combinations with the newest
    upload are tried: the work per upload is bounded whatever came before."""
    dep = Deployment(owners, ["alice", "bob"], 0)
    rec = dep.recoverer(with_r=False)
    assert not rec.checks_signatures_first
    tries = []
    for _ in range(40):
        before = len(dep.tried)
        rec.upload(*junk())
        tries.append(len(dep.tried) - before)
    assert max(tries) <= 1 + 2 ** (LEGACY_WINDOW - 1)
    rec.upload(*dep.signed("alice"))
    assert rec.upload(*dep.signed("bob")).complete


def test_a_state_without_recovery_keys_refuses_every_upload(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    dep = Deployment(owners, [], 0)
    rec = Recoverer(None, dep.try_key, dep.recovery_keys, public_keys={})
    with pytest.raises(RecoveryError, match="no recovery keys"):
        rec.upload(*junk())
    assert dep.tried == []
