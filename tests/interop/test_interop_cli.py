"""MarbleRun v1.5.2's own CLI against our Client API (issue 9, item 5).

One scenario against a real ``marblekeep coordinator --simulation`` subprocess, every step with the
genuine ``marblerun`` binary (built by tests/interop/build.sh with the ego_mock_eclient tag, so
every command runs with ``--insecure``): manifest set, status, certificate root, secret set and get,
manifest update apply (package and full update) and acknowledge, and recover after the Coordinator
lost its key-encryption key. The tests then check what each step did.

The CLI can only be built where MarbleRun's source is at hand (the Go module proxy refuses the
module); without it these tests are skipped with that reason (tests/interop/README.md).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from interop_support import GENUINE_CLI, genuine_binary

from harness import STATUS_2, STATUS_3, CoordinatorSubprocess, clean_env, free_port, run_marblekeep
from testsupport import self_signed_user_cert

pytestmark = pytest.mark.slow

STATUS_1 = (
    "Coordinator is in recovery mode. Either upload a key to unseal the saved state, or set a new "
    "manifest. For more information on how to proceed, consult the documentation."
)
SECRET_VALUE = b"hello from the marblerun cli"


def _pem_key(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


@dataclass
class Scenario:
    workdir: Path
    recovery_key: rsa.RSAPrivateKey
    steps: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    marblekeep_root: bytes = b""
    logs: list[Path] = field(default_factory=list)

    def ok(self, name: str) -> subprocess.CompletedProcess[str]:
        step = self.steps[name]
        assert step.returncode == 0, (
            f"marblerun {name} failed ({step.returncode}):\n{step.stdout}{step.stderr}"
        )
        assert "panic" not in step.stderr
        return step


def _manifest(admin_pem: str, bob_pem: str, recovery_pub: str) -> dict[str, Any]:
    return {
        "Packages": {"app": {"Debug": True, "SecurityVersion": 1}},
        "Marbles": {
            "worker": {"Package": "app", "Parameters": {"Env": {"GENERIC": "{{ string .Secrets.generic }}"}}}
        },
        "Secrets": {"generic": {"Type": "plain", "UserDefined": True}},
        "Users": {
            "admin": {"Certificate": admin_pem, "Roles": ["secrets", "updater", "packages"]},
            "bob": {"Certificate": bob_pem, "Roles": ["updater"]},
        },
        "Roles": {
            "secrets": {
                "ResourceType": "Secrets",
                "ResourceNames": ["generic"],
                "Actions": ["ReadSecret", "WriteSecret"],
            },
            "updater": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
            "packages": {
                "ResourceType": "Packages",
                "ResourceNames": ["app"],
                "Actions": ["UpdateSecurityVersion"],
            },
        },
        "RecoveryKeys": {"owner": recovery_pub},
    }


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    cli = genuine_binary(GENUINE_CLI)
    workdir = tmp_path_factory.mktemp("interop-cli")
    env = clean_env(os.environ)
    # the CLI keeps the Coordinator's certificate under $XDG_CONFIG_HOME/marblerun (os.UserConfigDir)
    env.update(HOME=str(workdir / "home"), XDG_CONFIG_HOME=str(workdir / "config"), PYTHONUNBUFFERED="1")
    client_addr, mesh_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    recovery_key = rsa.generate_private_key(65537, 3072)
    users = {}
    for name in ("admin", "bob", "stranger"):  # stranger is in no manifest
        pem, key = self_signed_user_cert(name)
        (workdir / f"{name}.crt").write_text(pem)
        (workdir / f"{name}.key").write_bytes(_pem_key(key))
        users[name] = pem
    recovery_pub = recovery_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    doc = _manifest(users["admin"], users["bob"], recovery_pub.decode())
    (workdir / "manifest.json").write_text(json.dumps(doc, indent=2))
    update = json.loads(json.dumps(doc))
    update["Marbles"]["added-by-update"] = {"Package": "app"}
    (workdir / "update.json").write_text(json.dumps(update, indent=2))
    (workdir / "package-update.json").write_text(json.dumps({"Packages": {"app": {"SecurityVersion": 2}}}))
    (workdir / "secret.json").write_text(
        json.dumps({"generic": {"Key": base64.b64encode(SECRET_VALUE).decode()}})
    )
    sc = Scenario(workdir, recovery_key)

    def marblerun(name: str, *args: str) -> None:
        sc.steps[name] = subprocess.run(
            [str(cli), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    admin = ("-c", "admin.crt", "-k", "admin.key")
    bob = ("-c", "bob.crt", "-k", "bob.key")

    def coordinator(log: str) -> CoordinatorSubprocess:
        sc.logs.append(workdir / log)
        return CoordinatorSubprocess(
            workdir=workdir,
            env=env,
            client_addr=client_addr,
            mesh_addr=mesh_addr,
            seal_dir=workdir / "seal",
            log=workdir / log,
        )

    first = coordinator("coordinator-1.log")
    try:
        marblerun("status-before", "status", client_addr, "--insecure")
        marblerun(
            "manifest set",
            "manifest",
            "set",
            "manifest.json",
            client_addr,
            "--insecure",
            "-r",
            "recovery.json",
        )
        marblerun("status", "status", client_addr, "--insecure")
        marblerun("certificate root", "certificate", "root", client_addr, "--insecure", "-o", "root.pem")
        marblerun("secret set", "secret", "set", "secret.json", client_addr, *admin, "--insecure")
        marblerun(
            "secret get", "secret", "get", "generic", client_addr, *admin, "--insecure", "-o", "got.json"
        )
        marblerun("secret get denied", "secret", "get", "generic", client_addr, *bob, "--insecure")
        stranger = ("-c", "stranger.crt", "-k", "stranger.key")
        marblerun("secret get stranger", "secret", "get", "generic", client_addr, *stranger, "--insecure")
        marblerun(
            "update apply package",
            "manifest",
            "update",
            "apply",
            "package-update.json",
            client_addr,
            *admin,
            "--insecure",
        )
        marblerun(
            "update apply full",
            "manifest",
            "update",
            "apply",
            "update.json",
            client_addr,
            *admin,
            "--insecure",
        )
        marblerun(
            "update acknowledge",
            "manifest",
            "update",
            "acknowledge",
            "update.json",
            client_addr,
            *bob,
            "--insecure",
        )
        marblerun("manifest get", "manifest", "get", client_addr, "--insecure", "-o", "got-manifest.json")
        marblerun("manifest log", "manifest", "log", client_addr, "--insecure")
        sc.marblekeep_root = run_marblekeep(
            workdir, env, "certificate", "root", client_addr, "--insecure"
        ).stdout.encode()
    finally:
        first.stop()

    (workdir / "seal" / "simulation-kek.key").unlink()  # the platform key is lost: Recovery at the next start
    second = coordinator("coordinator-2.log")
    try:
        marblerun("status-recovery", "status", client_addr, "--insecure")
        if (workdir / "recovery.json").exists():
            sealed = base64.b64decode(
                json.loads((workdir / "recovery.json").read_text())["RecoverySecrets"]["owner"]
            )
            secret = recovery_key.decrypt(
                sealed,
                padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
            )
            (workdir / "recovery-secret.bin").write_bytes(secret)
        marblerun("recover", "recover", "recovery-secret.bin", client_addr, "--insecure")
        marblerun("status-after-recover", "status", client_addr, "--insecure")
        after = run_marblekeep(workdir, env, "certificate", "root", client_addr, "--insecure")
        sc.steps["marblekeep root after recover"] = after
    finally:
        second.stop()
    yield sc


# ------------------------------------------------------------------------------------------------ tests


def test_status(scenario: Scenario) -> None:
    assert scenario.ok("status-before").stdout == f"2: {STATUS_2}\n"
    assert scenario.ok("status").stdout == f"3: {STATUS_3}\n"


def test_manifest_set_insecure(scenario: Scenario) -> None:
    out = scenario.ok("manifest set").stdout
    assert "Manifest successfully set" in out
    digest = hashes.Hash(hashes.SHA256())
    digest.update((scenario.workdir / "manifest.json").read_bytes())
    assert f"Manifest signature: {digest.finalize().hex()}" in out
    # the recovery data the CLI saved decrypts with the owner's key to a 32-byte secret
    assert (scenario.workdir / "recovery-secret.bin").stat().st_size == 32
    # the Coordinator chain the CLI cached (intermediate, then root) has our root
    cached = x509.load_pem_x509_certificates(
        (scenario.workdir / "config" / "marblerun" / "coordinator-cert.pem").read_bytes()
    )
    assert len(cached) == 2
    assert cached[1] == x509.load_pem_x509_certificate(scenario.marblekeep_root)
    assert cached[0].issuer == cached[1].subject


@pytest.mark.xfail(
    strict=True,
    reason=(
        "MarbleRun v1.5.2 CLI bug, not ours: with --insecure, `certificate root|intermediate|chain` compares "
        "the Coordinator's root with the cached certificate, which certcache.LoadCoordinatorCachedCert "
        "returns as nil under --insecure, so x509.Certificate.Equal is false and it always fails with "
        '"root certificate of Coordinator changed" (cli/internal/cmd/certificate.go); without --insecure it '
        "must verify a quote, which a simulation Coordinator does not have"
    ),
)
def test_certificate_root(scenario: Scenario) -> None:
    scenario.ok("certificate root")
    assert x509.load_pem_x509_certificate((scenario.workdir / "root.pem").read_bytes()) == (
        x509.load_pem_x509_certificate(scenario.marblekeep_root)
    )


def test_certificate_root_fails_only_for_marbleruns_own_reason(scenario: Scenario) -> None:
    step = scenario.steps["certificate root"]
    if step.returncode == 0:
        return  # test_certificate_root then reports the fix (strict xfail)
    assert "root certificate of Coordinator changed" in step.stderr, step.stderr
    assert "retrieving certificate from Coordinator" not in step.stderr  # our /quote answer parsed


def test_secret_set_and_get(scenario: Scenario) -> None:
    assert "Secret successfully set" in scenario.ok("secret set").stdout
    scenario.ok("secret get")
    got = json.loads((scenario.workdir / "got.json").read_text())
    assert got["generic"]["Type"] == "plain"
    assert got["generic"]["UserDefined"] is True
    assert base64.b64decode(got["generic"]["Private"]) == SECRET_VALUE


def test_secret_get_without_the_permission_is_refused(scenario: Scenario) -> None:
    step = scenario.steps["secret get denied"]
    assert step.returncode != 0
    assert SECRET_VALUE.decode() not in step.stdout + step.stderr
    # our 403 and its explanation reach the MarbleRun CLI's user
    for expected in ("403 Forbidden", "ReadSecret", "generic"):
        assert expected in step.stderr, step.stderr


def test_an_unlisted_client_certificate_gets_401(scenario: Scenario) -> None:
    step = scenario.steps["secret get stranger"]
    assert step.returncode != 0
    assert SECRET_VALUE.decode() not in step.stdout + step.stderr
    # MarbleRun's client maps HTTP 401 to "authorizing user"; the JSend message follows
    assert "authorizing user" in step.stderr, step.stderr
    assert "unauthorized user" in step.stderr, step.stderr


def test_manifest_update_apply_and_acknowledge(scenario: Scenario) -> None:
    assert "Update manifest set successfully" in scenario.ok("update apply package").stdout
    assert "Update manifest set successfully" in scenario.ok("update apply full").stdout
    ack = scenario.ok("update acknowledge").stdout
    assert "All users have acknowledged the update manifest. Update successfully applied" in ack
    applied = json.loads((scenario.workdir / "got-manifest.json").read_text())
    assert "added-by-update" in applied["Marbles"]
    log = scenario.ok("manifest log").stdout
    assert "SecurityVersion increased" in log
    assert "Complete Manifest updated" in log


@pytest.mark.xfail(
    strict=True,
    reason=(
        "MarbleRun v1.5.2's `recover` sends {recoverySecret} without recoverySecretSignature (the signature "
        "came with later, BUSL releases); marblekeep requires the signature and answers HTTP 400 "
        '"recoverySecretSignature: missing or not a string" (docs/compatibility.md, recovery)'
    ),
)
def test_recover(scenario: Scenario) -> None:
    assert scenario.ok("status-recovery").stdout == f"1: {STATUS_1}\n"
    assert "Recovery successful." in scenario.ok("recover").stdout
    assert scenario.ok("status-after-recover").stdout == f"3: {STATUS_3}\n"
    after = scenario.steps["marblekeep root after recover"]
    assert after.stdout.encode() == scenario.marblekeep_root


def test_recover_is_refused_for_the_missing_signature_only(scenario: Scenario) -> None:
    assert scenario.ok("status-recovery").stdout == f"1: {STATUS_1}\n"
    step = scenario.steps["recover"]
    if step.returncode == 0:
        return  # test_recover then reports the change (strict xfail)
    assert "400 Bad Request" in step.stderr and "recoverySecretSignature" in step.stderr, step.stderr
