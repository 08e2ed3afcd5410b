"""Issue 4 end to end: disaster recovery with the ``marblekeep recover`` CLI.

Each scenario runs a real ``marblekeep coordinator --simulation`` subprocess, sets a manifest with
recovery keys (``manifest set -r``), runs a Marble, then loses the key-encryption key (the
simulation key file is deleted) and starts the Coordinator again: it comes up in Recovery with a
temporary root. The owners upload their secrets with the CLI — as MarbleRun's users do, and once
through the air-gapped path (ephemeral key, encrypt-secret, sign-secret, with-signature) — and the
state is back: same root certificate, same keys for the same Marble. Setting a new manifest in
Recovery starts a new state instead.

The first tests check the CLI's input handling (SECRET_FILE formats) without a Coordinator.
"""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from e2e_state_support import (
    STATUS_1,
    STATUS_3,
    CoordinatorProcess,
    Site,
    cli,
    cli_process,
    openssl_decrypt,
    recovery_secrets,
    rsa_owner,
    run_marble,
    status_v2,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from marblekeep.cli.recover_cmds import decode_secret_file, decode_signature, plaintext_secret
from marblekeep.errors import ConfigError, RecoveryError
from marblekeep.recovery import load_private_key
from marblekeep.recovery.keys import oaep

MARBLE_ENV = {
    "MK_SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
    "MK_SHARED_KEY": "{{ hex .Secrets.shared_key }}",
    "MK_OWN_KEY": "{{ hex .Secrets.own_key }}",
}


def manifest(recovery_keys: dict[str, str], threshold: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {"worker": {"Package": "app", "Parameters": {"Env": MARBLE_ENV}}},
        "Secrets": {
            "shared_key": {"Type": "symmetric-key", "Size": 256, "Shared": True},
            "own_key": {"Type": "symmetric-key", "Size": 256},
        },
        "RecoveryKeys": recovery_keys,
    }
    if threshold:
        doc["Config"] = {"RecoveryThreshold": threshold}
    return doc


# ---------------------------------------------------------------------------- SECRET_FILE handling


@pytest.fixture(scope="module")
def owner_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_secret_file_forms_raw_base64_and_recovery_json(owner_key: rsa.RSAPrivateKey) -> None:
    plain = bytes(range(32))
    encrypted = owner_key.public_key().encrypt(plain, oaep())
    for data in (encrypted, base64.b64encode(encrypted) + b"\n", plain, base64.b64encode(plain)):
        assert plaintext_secret(decode_secret_file(data, "f"), owner_key, "f") == plain
    share = bytes(range(33))  # a Shamir share: plaintext even though MarbleRun would try to decrypt it
    assert plaintext_secret(decode_secret_file(share, "f"), None, "f") == share
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doc = {
        "RecoverySecrets": {
            "alice": base64.b64encode(encrypted).decode(),
            "bob": base64.b64encode(other.public_key().encrypt(b"\x01" * 32, oaep())).decode(),
        }
    }
    data = json.dumps(doc).encode()
    assert set(decode_secret_file(data, "f")) == {"alice", "bob"}
    assert plaintext_secret(decode_secret_file(data, "f"), owner_key, "f") == plain  # the one it opens
    assert plaintext_secret(decode_secret_file(data, "f", "bob"), other, "f") == b"\x01" * 32


@settings(max_examples=150, deadline=None)
@given(secret=st.sampled_from([16, 32, 33]).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_plaintext_secrets_pass_through_raw_and_base64(secret: bytes) -> None:
    for data in (secret, base64.b64encode(secret), base64.b64encode(secret) + b"\n"):
        assert plaintext_secret(decode_secret_file(data, "f"), None, "f") == secret


def test_secret_file_errors_name_the_file_and_the_fix_but_no_secret(owner_key: rsa.RSAPrivateKey) -> None:
    plain = bytes(range(100, 132))
    encrypted = owner_key.public_key().encrypt(plain, oaep())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ConfigError, match=r"recovery\.bin holds an encrypted recovery secret .* -k/--key"):
        plaintext_secret(decode_secret_file(encrypted, "recovery.bin"), None, "recovery.bin")
    with pytest.raises(RecoveryError, match="does not decrypt with this private key") as wrong:
        plaintext_secret(decode_secret_file(encrypted, "recovery.bin"), stranger, "recovery.bin")
    assert plain.hex() not in wrong.value.message and "recovery.bin" in wrong.value.message
    doc = json.dumps({"RecoverySecrets": {"alice": base64.b64encode(encrypted).decode()}}).encode()
    with pytest.raises(ConfigError, match=r"no recovery secret named 'carol' \(the file has: alice\)"):
        decode_secret_file(doc, "r.json", "carol")
    with pytest.raises(ConfigError, match="without a RecoverySecrets object"):
        decode_secret_file(b'{"Manifest": {}}', "r.json")
    with pytest.raises(ConfigError, match="is not base64"):
        decode_secret_file(b'{"RecoverySecrets": {"a": "%%%"}}', "r.json")
    with pytest.raises(ConfigError, match="empty"):
        decode_secret_file(b"\n", "r.json")
    assert decode_signature(base64.b64encode(b"\x07" * 256), "s") == b"\x07" * 256
    assert decode_signature(b"\xff" * 256, "s") == b"\xff" * 256


# ------------------------------------------------------------------------------ Coordinator scenarios


@dataclass
class Lost:
    """A deployment whose Coordinator lost its KEK and now runs in Recovery."""

    site: Site
    keys: dict[str, Path]
    recovery_file: Path
    root_before: str
    marble_before: dict[str, str]
    coordinator: CoordinatorProcess


def pin(site: Site) -> tuple[str, str]:
    return ("--coordinator-cert", str(site.pin))


def deploy_and_lose_the_kek(tmp_path: Path, owners: list[str], threshold: int = 0) -> Lost:
    site = Site(tmp_path / "site")
    keys: dict[str, Path] = {}
    public: dict[str, str] = {}
    for name in owners:
        keys[name], public[name] = rsa_owner(site, name)
    manifest_file = site.path("manifest.json")
    manifest_file.write_text(json.dumps(manifest(public, threshold)))
    recovery_file = site.path("recovery.json")
    first = CoordinatorProcess(site, "before")
    try:
        cli(
            site,
            "manifest",
            "set",
            str(manifest_file),
            site.client_addr,
            "-i",
            *pin(site),
            "-r",
            str(recovery_file),
        )
        root = cli(site, "certificate", "root", site.client_addr, *pin(site)).stdout
        before = run_marble(site, "worker", "uuid-a")
    finally:
        assert first.stop() == 0
    site.kek_file.unlink()  # the platform key is gone (other CPU, other enclave build, lost file)
    coordinator = CoordinatorProcess(site, "recovery")
    assert "entering recovery mode" in coordinator.output
    return Lost(site, keys, recovery_file, root, before, coordinator)


def recovery_pin(lost: Lost) -> tuple[str, str]:
    """A separate pin file: the Recovery Coordinator's temporary root must not replace the real pin."""
    return ("--coordinator-cert", str(lost.site.path("recovery-pin.pem")))


def assert_in_recovery(lost: Lost) -> None:
    site = lost.site
    assert cli(site, "status", site.client_addr, "-i", *recovery_pin(lost)).stdout == f"1: {STATUS_1}\n"
    doc = status_v2(site)
    assert doc["code"] == 1 and "does not unwrap" in doc["recoveryReason"]
    # the temporary root is not the deployment's: the pinned CLI refuses it
    refused = cli(site, "status", site.client_addr, *pin(site), ok=False)
    assert refused.exit_code == 1 and "pinned" in refused.stderr
    # the advice keeps the pin (docs/operations.md §4.1) and points to recovery
    assert "RECOVERY mode" in refused.stderr and "keep your pin" in refused.stderr
    assert "remove that file" not in refused.stderr and "marblekeep recover upload" in refused.stderr


def assert_recovered(lost: Lost, upload_stderr: str) -> None:
    site = lost.site
    assert upload_stderr.count("SIMULATION") == 1  # one warning, not two
    assert upload_stderr.count("INSECURE") == 1
    assert f"back with the root certificate pinned in {site.pin}" in upload_stderr
    assert cli(site, "status", site.client_addr, *pin(site)).stdout == f"3: {STATUS_3}\n"  # no --insecure
    assert cli(site, "certificate", "root", site.client_addr, *pin(site)).stdout == lost.root_before
    after = run_marble(site, "worker", "uuid-a")
    for var in ("MK_SEAL_KEY", "MK_SHARED_KEY", "MK_OWN_KEY", "MARBLE_PREDEFINED_ROOT_CA"):
        assert after[var] == lost.marble_before[var], f"{var} differs after recovery"


def upload(lost: Lost, *args: str, ok: bool = True) -> Any:
    site = lost.site
    return cli(site, "recover", *args, site.client_addr, "-i", *pin(site), ok=ok)


def test_single_key_recovery_refuses_wrong_keys_then_restores_the_state(tmp_path: Path) -> None:
    lost = deploy_and_lose_the_kek(tmp_path, ["alice"])
    site = lost.site
    try:
        assert_in_recovery(lost)
        encrypted = recovery_secrets(lost.recovery_file)["alice"]
        plain = openssl_decrypt(lost.keys["alice"], encrypted, site.workdir)
        assert len(plain) == 32  # the DEK itself
        assert (
            plaintext_secret({"": encrypted}, load_private_key(lost.keys["alice"].read_bytes()), "f") == plain
        )

        intruder, _ = rsa_owner(site, "intruder")
        wrong_key = upload(lost, str(lost.recovery_file), "-k", str(intruder), ok=False)
        assert wrong_key.exit_code == 1 and "does not decrypt with this private key" in wrong_key.stderr

        # the right secret (decrypted with openssl, raw) signed by someone else: refused by the Coordinator
        site.path("plain.bin").write_bytes(plain)
        cli(
            site,
            "recover",
            "sign-secret",
            str(site.path("plain.bin")),
            "-k",
            str(intruder),
            "-o",
            str(site.path("bad.sig")),
        )
        forged = cli(
            site, "recover", "with-signature", str(site.path("plain.bin")), site.client_addr,
            "-s", str(site.path("bad.sig")), "-i", *pin(site), ok=False,
        )  # fmt: skip
        assert forged.exit_code == 1 and "signature" in forged.stderr.lower(), forged.stderr
        for output in (wrong_key.output, forged.output):
            assert plain.hex() not in output and base64.b64encode(plain).decode() not in output
        assert status_v2(site)["code"] == 1

        # MarbleRun's command line: recover SECRET_FILE ADDR -k KEY (the JSON manifest set -r wrote)
        done = upload(lost, str(lost.recovery_file), "-k", str(lost.keys["alice"]))
        assert done.stdout == "Recovery successful.\n"
        assert_recovered(lost, done.stderr)
    finally:
        lost.coordinator.stop()

    # the recovered state was re-sealed with the new KEK: a plain restart loads it
    restarted = CoordinatorProcess(site, "after-recovery")
    try:
        assert "sealed state loaded" in restarted.output and "recovery mode" not in restarted.output
        assert cli(site, "certificate", "root", site.client_addr, *pin(site)).stdout == lost.root_before
    finally:
        restarted.stop()


def test_xor_two_of_two_with_one_air_gapped_encrypted_upload(tmp_path: Path) -> None:
    lost = deploy_and_lose_the_kek(tmp_path, ["alice", "bob"])
    site = lost.site
    try:
        assert_in_recovery(lost)
        secrets = recovery_secrets(lost.recovery_file)
        shares = {n: openssl_decrypt(lost.keys[n], secrets[n], site.workdir) for n in ("alice", "bob")}
        assert all(len(s) == 32 for s in shares.values()) and shares["alice"] != shares["bob"]

        first = upload(lost, "upload", str(lost.recovery_file), "-k", str(lost.keys["alice"]))
        assert first.stdout.endswith("Upload the next secret. Remaining secrets: 1\n")

        # bob, air-gapped: fetch the ephemeral key online, encrypt and sign offline, upload online
        pub = site.path("coordinator-recovery.pem")
        cli(site, "recover", "public-key", site.client_addr, "-i", *recovery_pin(lost), "-o", str(pub))
        key = serialization.load_pem_public_key(pub.read_bytes())
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
        enc, sig = site.path("bob.enc"), site.path("bob.sig")
        bob = str(lost.keys["bob"])
        cli(
            site,
            "recover",
            "encrypt-secret",
            str(lost.recovery_file),
            "-k",
            bob,
            "--coordinator-pub-key",
            str(pub),
            "-o",
            str(enc),
        )
        cli(site, "recover", "sign-secret", str(lost.recovery_file), "-k", bob, "-o", str(sig))
        assert len(enc.read_bytes()) == 512 and enc.stat().st_mode & 0o077 == 0
        done = cli(
            site, "recover-with-signature", str(enc), site.client_addr, "-s", str(sig), "-i", *pin(site)
        )
        assert done.stdout == "Recovery successful.\n"
        assert_recovered(lost, done.stderr)
    finally:
        lost.coordinator.stop()


def test_shamir_two_of_three_recovers_with_any_two_owners(tmp_path: Path) -> None:
    lost = deploy_and_lose_the_kek(tmp_path, ["alice", "bob", "carol"], threshold=2)
    site = lost.site
    try:
        assert_in_recovery(lost)
        secrets = recovery_secrets(lost.recovery_file)
        shares = {n: openssl_decrypt(lost.keys[n], secrets[n], site.workdir) for n in secrets}
        assert sorted(shares) == ["alice", "bob", "carol"]
        assert all(len(s) == 33 for s in shares.values())  # 32 bytes + the x-coordinate
        assert len({s[-1] for s in shares.values()}) == 3

        # carol decrypted hers with openssl (33 raw bytes, uploaded as plaintext; MarbleRun's CLI
        # would try to decrypt it again)
        carol_plain = site.path("carol.share")
        carol_plain.write_bytes(shares["carol"])
        first = upload(lost, str(carol_plain), "-k", str(lost.keys["carol"]))
        assert first.stdout.endswith("Remaining secrets: 2\n")  # unused entries of R, as MarbleRun

        again = upload(lost, str(carol_plain), "-k", str(lost.keys["carol"]), ok=False)
        assert again.exit_code == 1 and "already used" in again.stderr

        # alice runs the installed command with the whole recovery data file; it picks her entry
        done = cli_process(
            site, "recover", str(lost.recovery_file), site.client_addr, "-k", str(lost.keys["alice"]),
            "--insecure", *pin(site),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == "Recovery successful.\n"
        assert_recovered(lost, done.stderr)
    finally:
        lost.coordinator.stop()


def test_setting_a_new_manifest_in_recovery_starts_a_new_state(tmp_path: Path) -> None:
    lost = deploy_and_lose_the_kek(tmp_path, ["alice"])
    site = lost.site
    try:
        assert_in_recovery(lost)
        temporary_root = cli(site, "certificate", "root", site.client_addr, "-i", *recovery_pin(lost)).stdout
        assert temporary_root != lost.root_before
        _, public = rsa_owner(site, "alice-new")
        new_manifest = site.path("manifest-new.json")
        new_manifest.write_text(json.dumps(manifest({"alice": public})))
        cli(
            site,
            "manifest",
            "set",
            str(new_manifest),
            site.client_addr,
            *recovery_pin(lost),
            "-r",
            str(site.path("new-recovery.json")),
        )
        assert cli(site, "status", site.client_addr, *recovery_pin(lost)).stdout == f"3: {STATUS_3}\n"
        # the root served during Recovery (which a user may have verified) is the new deployment's
        assert (
            cli(site, "certificate", "root", site.client_addr, *recovery_pin(lost)).stdout == temporary_root
        )
        after = run_marble(site, "worker", "uuid-a")
        for var in ("MK_SEAL_KEY", "MK_SHARED_KEY", "MK_OWN_KEY"):
            assert after[var] != lost.marble_before[var], f"{var}: the old state's secrets must be gone"
        late = upload(lost, str(lost.recovery_file), "-k", str(lost.keys["alice"]), ok=False)
        assert late.exit_code == 1 and "not in recovery mode (status 3" in late.stderr
    finally:
        lost.coordinator.stop()

    restarted = CoordinatorProcess(site, "new-state")  # the new state is sealed and loads normally
    try:
        assert "sealed state loaded" in restarted.output
        assert (
            cli(site, "certificate", "root", site.client_addr, *recovery_pin(lost)).stdout == temporary_root
        )
        manifest_now = cli(site, "manifest", "get", site.client_addr, *recovery_pin(lost)).stdout
        assert json.loads(manifest_now) == json.loads(new_manifest.read_text())
    finally:
        restarted.stop()


def test_unsigned_uploads_are_refused_status_stays_responsive_and_the_owner_still_recovers(
    tmp_path: Path,
) -> None:
    """Issue 11, finding 2: 24 uploads that no recovery key signed, each refused (nothing kept),
    while ``GET /api/v2/status`` keeps answering; then the owner's genuine upload recovers the state.
    The time per upload is measured by bench/recovery.py, not here."""
    lost = deploy_and_lose_the_kek(tmp_path, ["alice"])
    site = lost.site
    try:
        assert_in_recovery(lost)
        url = f"https://{site.client_addr}/api/v2"
        with (
            httpx.Client(verify=False, timeout=120) as uploader,
            httpx.Client(verify=False, timeout=60) as prober,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            plain_junk = [os.urandom(32) for _ in range(12)]
            pub = base64.b64decode(
                uploader.get(f"{url}/recover/public-key").json()["data"]["ephemeralPublicKey"]
            )
            ephemeral = serialization.load_der_public_key(pub)
            assert isinstance(ephemeral, rsa.RSAPublicKey)
            # half plain, half encrypted for the ephemeral key (the RSA-4096 decryption path)
            junk = plain_junk + [ephemeral.encrypt(os.urandom(32), oaep()) for _ in range(12)]
            for secret in junk:
                body = {
                    "recoverySecret": base64.b64encode(secret).decode(),
                    "recoverySecretSignature": base64.b64encode(os.urandom(256)).decode(),
                }
                pending = pool.submit(uploader.post, f"{url}/recover", json=body)
                status = prober.get(f"{url}/status")  # answered while the upload is handled
                assert status.status_code == 200 and status.json()["data"]["code"] == 1
                answer = pending.result(timeout=120)
                assert answer.status_code == 400, answer.text
                assert "does not match any recovery key" in answer.json()["message"]
                assert "nothing of this upload was kept" in answer.json()["message"]
        assert "Traceback" not in lost.coordinator.output
        done = upload(lost, str(lost.recovery_file), "-k", str(lost.keys["alice"]))
        assert done.stdout == "Recovery successful.\n"
        assert_recovered(lost, done.stderr)
    finally:
        lost.coordinator.stop()
