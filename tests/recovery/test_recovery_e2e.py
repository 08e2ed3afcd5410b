"""Recovery end to end over the sealed SQLite store: the KEK is lost, the owners bring the state back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from marblekeep.errors import RecoveryError
from marblekeep.recovery import (
    Recoverer,
    decrypt_recovery_secret,
    encrypt_for_coordinator,
    generate_recovery_keys,
    load_private_key,
    sign_recovery_secret,
)
from marblekeep.store import NeedsRecovery, Opened, PendingRecovery, SimulationKeyFileProvider, SQLiteStore
from marblekeep.store import open_sealed_store as open_store

NAMES = ["alice", "bob", "carol"]


@pytest.fixture(scope="module")
def owner_pems() -> dict[str, bytes]:
    return {
        n: rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for n in NAMES
    }


@pytest.fixture(scope="module")
def ephemeral() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private_pem: bytes) -> str:
    key = load_private_key(private_pem)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def openssl_decrypt(tmp: Path, private_pem: bytes, secret: bytes) -> bytes:
    (tmp / "k.pem").write_bytes(private_pem)
    (tmp / "s.bin").write_bytes(secret)
    argv = ["openssl", "pkeyutl", "-decrypt", "-inkey", str(tmp / "k.pem"), "-in", str(tmp / "s.bin")]
    argv += ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"]
    return subprocess.run(argv, capture_output=True, check=True).stdout


def manifest_keys(pending: PendingRecovery) -> Callable[[bytes], tuple[Mapping[str, str], int]]:
    def read(dek: bytes) -> tuple[Mapping[str, str], int]:
        raw = pending.peek(dek, "manifest")
        assert raw is not None
        manifest = json.loads(raw)
        return manifest["RecoveryKeys"], manifest["Config"]["RecoveryThreshold"]

    return read


@pytest.mark.parametrize(
    ("names", "threshold", "uploaders"),
    [(["alice"], 0, ["alice"]), (["alice", "bob"], 0, ["bob", "alice"]), (NAMES, 2, ["carol", "alice"])],
    ids=["single", "xor-2-of-2", "shamir-2-of-3"],
)
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "ephemeral"])
async def test_recover_after_losing_the_kek(
    tmp_path: Path,
    owner_pems: dict[str, bytes],
    ephemeral: rsa.RSAPrivateKey,
    names: list[str],
    threshold: int,
    uploaders: list[str],
    encrypted: bool,
) -> None:
    db, key_file = tmp_path / "state.db", tmp_path / "simulation-kek"
    keys = {n: public_pem(owner_pems[n]) for n in names}
    manifest = json.dumps({"RecoveryKeys": keys, "Config": {"RecoveryThreshold": threshold}}).encode()

    # SetManifest: new DEK + recovery secrets, state re-keyed in one commit
    opened = await open_store(await SQLiteStore.open(db), SimulationKeyFileProvider(key_file))
    assert isinstance(opened, Opened)
    store = opened.store
    material = generate_recovery_keys(keys, threshold)
    await store.commit(
        {"manifest": manifest, "rootCert": b"ROOT", "secret:s": b"S3CR3T"}, expected_revision=0
    )
    await store.rekey(material.dek, recovery_data=material.recovery_data)
    await store.close()
    before = {"manifest": manifest, "rootCert": b"ROOT", "secret:s": b"S3CR3T"}

    # the host dies; the state is moved to a machine with another KEK
    key_file.unlink()
    new_provider = SimulationKeyFileProvider(key_file)
    result = await open_store(await SQLiteStore.open(db), new_provider)
    assert isinstance(result, NeedsRecovery)
    pending = result.recovery
    recoverer = Recoverer(
        pending.recovery_data,
        pending.try_key,
        manifest_keys(pending),
        ephemeral_key_factory=lambda: ephemeral,
    )

    progress = None
    for name in uploaders:
        private = load_private_key(owner_pems[name])
        if name == "alice" and shutil.which("openssl"):
            secret = openssl_decrypt(tmp_path, owner_pems[name], material.secrets[name])
        else:
            secret = decrypt_recovery_secret(material.secrets[name], private)
        signature = sign_recovery_secret(secret, private)
        upload = encrypt_for_coordinator(secret, recoverer.public_key_der()) if encrypted else secret
        progress = recoverer.upload(upload, signature)
    assert progress is not None and progress.complete and progress.dek == material.dek

    recovered = await pending.complete(progress.dek)
    assert await recovered.list("") == before
    await recovered.close()
    again = await open_store(await SQLiteStore.open(db), new_provider)
    assert isinstance(again, Opened) and await again.store.list("") == before
    await again.store.close()


async def test_wrong_owner_cannot_recover(tmp_path: Path, owner_pems: dict[str, bytes]) -> None:
    db = tmp_path / "state.db"
    keys = {"alice": public_pem(owner_pems["alice"])}
    manifest = json.dumps({"RecoveryKeys": keys, "Config": {"RecoveryThreshold": 0}}).encode()
    opened = await open_store(await SQLiteStore.open(db), SimulationKeyFileProvider(tmp_path / "k1"))
    assert isinstance(opened, Opened)
    material = generate_recovery_keys(keys, 0)
    await opened.store.commit({"manifest": manifest}, expected_revision=0)
    await opened.store.rekey(material.dek)
    await opened.store.close()
    result = await open_store(await SQLiteStore.open(db), SimulationKeyFileProvider(tmp_path / "k2"))
    assert isinstance(result, NeedsRecovery)
    recoverer = Recoverer(
        result.recovery.recovery_data, result.recovery.try_key, manifest_keys(result.recovery)
    )
    dek = decrypt_recovery_secret(material.secrets["alice"], load_private_key(owner_pems["alice"]))
    with pytest.raises(RecoveryError, match="signature"):
        recoverer.upload(dek, sign_recovery_secret(dek, load_private_key(owner_pems["bob"])))
    assert not result.recovery.try_key(os.urandom(32))
    await result.recovery._inner.close()
