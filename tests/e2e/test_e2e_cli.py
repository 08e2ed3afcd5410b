"""The client CLI (status, certificate, manifest set/get/verify/signature/log) in-process with
CliRunner against a real Coordinator on loopback HTTPS, and against stub servers: a v1-only
Coordinator (405 on /api/v2), an impostor presenting a Marble's certificate, and a Coordinator
with a real SGX quote (the dcap vector) to exercise quote verification before pinning."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shlex
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from harness import (
    STATUS_2,
    STATUS_3,
    RunningCoordinator,
    StubPki,
    StubServer,
    free_port,
    jsend,
    jsend_error,
)
from harness import run_cli as run
from marblekeep.cli import client_cmds
from marblekeep.client import attest
from marblekeep.crypto.signing import sign_manifest
from marblekeep.manifest import yaml_to_json
from testsupport import check_command_line

MANIFEST_YAML = """\
Packages:
  app:
    Debug: true
Marbles:
  worker:
    Package: app
    Parameters:
      Env:
        SEAL_KEY: "{{ hex .MarbleRun.SealKey }}"
"""

OTHER_MANIFEST = {"Packages": {"p": {"Debug": True}}, "Marbles": {"m": {"Package": "p"}}}


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    with RunningCoordinator(tmp_path / "seal", host="127.0.0.1") as running:
        yield running


@pytest.fixture
def pin(tmp_path: Path) -> Path:
    return tmp_path / "pin" / "coordinator-cert.pem"


def _pin_args(pin: Path) -> list[str]:
    return ["--coordinator-cert", str(pin)]


# ------------------------------------------------------------------------------------------ pinning


def test_status_of_a_simulation_coordinator_needs_insecure_then_pins_its_root(
    coordinator: RunningCoordinator, pin: Path
) -> None:
    refused = run("status", coordinator.addr, *_pin_args(pin))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("Error: ")
    assert "empty quote" in refused.stderr and "SIMULATION" in refused.stderr
    assert "--insecure" in refused.stderr
    assert not pin.exists(), "an unverified root must never be pinned without --insecure"

    first = run("status", "-i", coordinator.addr, *_pin_args(pin))
    assert first.exit_code == 0, first.output
    assert first.stdout == f"2: {STATUS_2}\n"
    assert "INSECURE" in first.stderr and "SIMULATION" in first.stderr
    assert pin.read_bytes() == coordinator.root_pem
    assert stat.S_IMODE(pin.parent.stat().st_mode) == 0o700

    later = run("status", coordinator.addr, *_pin_args(pin))  # pinned: no --insecure needed
    assert later.exit_code == 0, later.output
    assert later.stdout == f"2: {STATUS_2}\n"
    assert "SIMULATION mode" in later.stderr  # still loud about simulation on every contact


def _port(addr: str) -> str:
    return addr.rpartition(":")[2]


def test_default_pin_location_is_per_address_under_xdg_config_home(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    config_home = tmp_path / "xdg"
    result = run("status", "--insecure", coordinator.addr, env={"XDG_CONFIG_HOME": str(config_home)})
    assert result.exit_code == 0, result.output
    pin = config_home / "marblekeep" / "pins" / f"127.0.0.1_{_port(coordinator.addr)}.pem"
    assert pin.read_bytes() == coordinator.root_pem
    assert not (config_home / "marblekeep" / "coordinator-cert.pem").exists()


def test_a_second_coordinator_gets_its_own_pin(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "MARBLEKEEP_COORDINATOR_CERT": ""}
    other = RunningCoordinator(tmp_path / "other-seal", host="127.0.0.1")
    try:
        assert run("status", "-i", coordinator.addr, env=env).exit_code == 0
        second = run("status", "-i", other.addr, env=env)  # not refused: another address, another pin
        assert second.exit_code == 0, second.output
        assert "REPLACING" not in second.stderr
        # both stay pinned: neither needs --insecure again, and each is checked against its own root
        for running in (coordinator, other):
            again = run("certificate", "root", running.addr, env=env)
            assert again.exit_code == 0, again.output
            assert again.stdout_bytes == running.root_pem
        pins = sorted((tmp_path / "xdg" / "marblekeep" / "pins").iterdir())
        assert [p.read_bytes() for p in pins] != [] and len(pins) == 2
    finally:
        other.stop()


def test_the_pin_file_environment_variable_pins_one_coordinator_for_every_address(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    pin = tmp_path / "one-pin.pem"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "MARBLEKEEP_COORDINATOR_CERT": str(pin)}
    assert run("status", "-i", coordinator.addr, env=env).exit_code == 0
    assert pin.read_bytes() == coordinator.root_pem
    assert not (tmp_path / "xdg" / "marblekeep" / "pins").exists()
    other = RunningCoordinator(tmp_path / "other-seal", host="127.0.0.1")
    try:
        refused = run("status", other.addr, env=env)
        assert refused.exit_code == 1
        assert str(pin) in refused.stderr
        assert "remove" not in refused.stderr
    finally:
        other.stop()


def test_the_single_pin_file_of_earlier_versions_is_migrated(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    config = tmp_path / "xdg" / "marblekeep"
    config.mkdir(parents=True)
    legacy = config / "coordinator-cert.pem"
    legacy.write_bytes(coordinator.root_pem)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "MARBLEKEEP_COORDINATOR_CERT": ""}
    # its Coordinator is trusted through the old pin (no --insecure), which becomes its own pin
    migrated = run("status", coordinator.addr, env=env)
    assert migrated.exit_code == 0, migrated.output
    assert "moved the pin" in migrated.stderr
    assert (config / "pins" / f"127.0.0.1_{_port(coordinator.addr)}.pem").read_bytes() == coordinator.root_pem
    assert legacy.read_bytes() == coordinator.root_pem  # left in place
    # another Coordinator is not blocked by it: it is attested (here: --insecure) and pinned on its own
    other = RunningCoordinator(tmp_path / "other-seal", host="127.0.0.1")
    try:
        assert run("status", other.addr, env=env).exit_code == 1  # simulation: still needs --insecure
        fresh = run("status", "-i", other.addr, env=env)
        assert fresh.exit_code == 0, fresh.output
        assert "REPLACING" not in fresh.stderr and "moved the pin" not in fresh.stderr
        assert (config / "pins" / f"127.0.0.1_{_port(other.addr)}.pem").read_bytes() == other.root_pem
    finally:
        other.stop()


def test_a_different_coordinator_is_refused_against_the_pinned_root(
    coordinator: RunningCoordinator, pin: Path, tmp_path: Path
) -> None:
    assert run("status", "-i", coordinator.addr, *_pin_args(pin)).exit_code == 0
    other = RunningCoordinator(tmp_path / "other-seal", host="127.0.0.1")
    try:
        refused = run("certificate", "root", other.addr, *_pin_args(pin))
        assert refused.exit_code == 1
        assert "pinned" in refused.stderr and str(pin) in refused.stderr
        assert "do not trust it" in refused.stderr and "remove" not in refused.stderr
        assert refused.stdout == ""
        assert pin.read_bytes() == coordinator.root_pem, "a refused Coordinator must not change the pin"

        replaced = run("certificate", "root", "--insecure", other.addr, *_pin_args(pin))
        assert replaced.exit_code == 0, replaced.output
        assert "REPLACING the pinned root" in replaced.stderr
        assert replaced.stdout_bytes == other.root_pem
        assert pin.read_bytes() == other.root_pem
    finally:
        other.stop()
    # and now the first Coordinator is the stranger
    assert run("status", coordinator.addr, *_pin_args(pin)).exit_code == 1


# -------------------------------------------------------------------------------------- certificates


def test_certificate_root_intermediate_chain(
    coordinator: RunningCoordinator, pin: Path, tmp_path: Path
) -> None:
    root = run("certificate", "root", "-i", coordinator.addr, *_pin_args(pin))
    assert root.exit_code == 0, root.output
    assert root.stdout_bytes == coordinator.root_pem
    intermediate = run("certificate", "intermediate", coordinator.addr, *_pin_args(pin))
    assert intermediate.stdout_bytes == coordinator.intermediate_pem
    chain = run("certificate", "chain", coordinator.addr, *_pin_args(pin))
    assert chain.stdout_bytes == coordinator.intermediate_pem + coordinator.root_pem

    out = tmp_path / "chain.pem"
    saved = run("certificate", "chain", coordinator.addr, "-o", str(out), *_pin_args(pin))
    assert saved.exit_code == 0
    certs = x509.load_pem_x509_certificates(out.read_bytes())
    assert [c.subject.rfc4514_string() for c in certs] == [
        "CN=MarbleRun Coordinator - Intermediate CA",
        "CN=MarbleRun Coordinator",
    ]
    certs[0].verify_directly_issued_by(certs[1])


# ----------------------------------------------------------------------------------------- manifests


def test_manifest_set_get_verify_and_signature(
    coordinator: RunningCoordinator, pin: Path, tmp_path: Path
) -> None:
    yaml_file = tmp_path / "manifest.yaml"
    yaml_file.write_text(MANIFEST_YAML)
    raw = yaml_to_json(yaml_file.read_bytes())
    fingerprint = hashlib.sha256(raw).hexdigest()

    local = run("manifest", "signature", str(yaml_file))
    assert local.stdout.strip() == fingerprint

    result = run("manifest", "set", str(yaml_file), coordinator.addr, "--insecure", *_pin_args(pin))
    assert result.exit_code == 0, result.output
    assert f"Manifest fingerprint: {fingerprint}" in result.stdout
    assert run("status", coordinator.addr, *_pin_args(pin)).stdout == f"3: {STATUS_3}\n"

    got = run("manifest", "get", coordinator.addr, *_pin_args(pin))
    assert got.exit_code == 0
    assert got.stdout_bytes == raw  # byte for byte as set (so its fingerprint matches)

    signed = run("manifest", "get", "-s", coordinator.addr, *_pin_args(pin))
    doc = json.loads(signed.stdout)
    assert doc["ManifestSignature"] == fingerprint
    assert doc["Manifest"] == json.loads(raw)
    root = x509.load_pem_x509_certificate(coordinator.root_pem)
    public_key = root.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(base64.b64decode(doc["ManifestSignatureRootECDSA"]), raw, ec.ECDSA(hashes.SHA256()))

    out = tmp_path / "got.json"
    assert run("manifest", "get", coordinator.addr, "-o", str(out), *_pin_args(pin)).exit_code == 0
    assert out.read_bytes() == raw

    ok = run("manifest", "verify", str(yaml_file), coordinator.addr, *_pin_args(pin))
    assert ok.exit_code == 0 and fingerprint in ok.stdout
    assert run("manifest", "verify", fingerprint.upper(), coordinator.addr, *_pin_args(pin)).exit_code == 0

    other = tmp_path / "other.json"
    other.write_text(json.dumps(OTHER_MANIFEST))
    wrong = run("manifest", "verify", str(other), coordinator.addr, *_pin_args(pin))
    assert wrong.exit_code == 1
    assert "runs another manifest" in wrong.stderr and fingerprint in wrong.stderr
    bad = run("manifest", "verify", "not-a-file-nor-hex", coordinator.addr, *_pin_args(pin))
    assert bad.exit_code == 2

    again = run("manifest", "set", str(other), coordinator.addr, *_pin_args(pin))
    assert again.exit_code == 1
    assert "already runs a manifest" in again.stderr


def test_manifest_get_and_verify_before_any_manifest(coordinator: RunningCoordinator, pin: Path) -> None:
    got = run("manifest", "get", "-i", coordinator.addr, *_pin_args(pin))
    assert got.exit_code == 1
    assert "no manifest yet" in got.stderr


def test_an_invalid_manifest_lists_the_coordinators_problems(
    coordinator: RunningCoordinator, pin: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Packages": {}, "Marbles": {"m": {"Package": "missing"}}}))
    result = run("manifest", "set", str(bad), coordinator.addr, "-i", *_pin_args(pin))
    assert result.exit_code == 1
    assert "Marbles.m.Package" in result.stderr
    assert run("status", coordinator.addr, *_pin_args(pin)).stdout == f"2: {STATUS_2}\n"


def _v2_app(pki: StubPki, recovery: dict[str, bytes], update_log: list[str] | None) -> web.Application:
    """A v2 Coordinator stub: quote (simulation), manifest POST with RecoverySecrets, update log."""

    async def quote(request: web.Request) -> web.Response:
        return jsend({"cert": pki.chain_pem, "quote": ""})

    async def manifest_post(request: web.Request) -> web.Response:
        secrets = {name: base64.b64encode(value).decode() for name, value in recovery.items()}
        return jsend({"RecoverySecrets": secrets})

    async def update(request: web.Request) -> web.Response:
        return jsend({"updateLog": update_log}) if update_log is not None else jsend_error("", 405)

    app = web.Application()
    app.router.add_get("/api/v2/quote", quote)
    app.router.add_post("/api/v2/manifest", manifest_post)
    app.router.add_get("/api/v2/update", update)
    app.router.add_route("*", "/{tail:.*}", _not_served)
    return app


async def _not_served(request: web.Request) -> web.Response:
    return jsend_error("", 405)


def test_manifest_set_saves_recovery_data_that_the_recovery_key_decrypts(pin: Path, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    recovery_secret = os.urandom(32)
    pki = StubPki.create()
    server = StubServer(
        _v2_app(pki, {"alice": key.public_key().encrypt(recovery_secret, oaep)}, None), pki.listener
    )
    file = tmp_path / "manifest.json"
    file.write_text(json.dumps(OTHER_MANIFEST))
    out = tmp_path / "recovery.json"
    try:
        saved = run("manifest", "set", str(file), server.addr, "-i", "-r", str(out), *_pin_args(pin))
        printed = run("manifest", "set", str(file), server.addr, *_pin_args(pin))
    finally:
        server.stop()
    assert saved.exit_code == 0, saved.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    secrets = json.loads(out.read_text())["RecoverySecrets"]
    assert set(secrets) == {"alice"}
    assert key.decrypt(base64.b64decode(secrets["alice"]), oaep) == recovery_secret
    assert secrets["alice"] not in saved.output  # saved, not printed
    assert f"Recovery data saved to {out}" in saved.stderr

    assert printed.exit_code == 0, printed.output
    assert "printed to this terminal" in printed.stderr and "-r FILE" in printed.stderr
    assert "printed to this terminal" not in saved.stderr
    shown = json.loads(printed.stdout[printed.stdout.index("{") :])
    assert shown == {"RecoverySecrets": secrets}


def test_manifest_log_prints_the_update_log_or_says_it_is_missing(pin: Path) -> None:
    pki = StubPki.create()
    with_log = StubServer(_v2_app(pki, {}, ["first line", "second line"]), pki.listener)
    without = StubServer(_v2_app(pki, {}, None), pki.listener)
    try:
        log = run("manifest", "log", "-i", with_log.addr, *_pin_args(pin))
        missing = run("manifest", "log", without.addr, *_pin_args(pin))
    finally:
        with_log.stop()
        without.stop()
    assert log.exit_code == 0, log.output
    assert log.stdout == "first line\nsecond line\n"
    assert missing.exit_code == 1
    assert "does not serve the update log" in missing.stderr


# ------------------------------------------------------------------------------------------- errors


def test_unreachable_and_malformed_addresses(pin: Path) -> None:
    closed = run("status", "-i", f"127.0.0.1:{free_port()}", *_pin_args(pin))
    assert closed.exit_code == 1
    assert "cannot reach the Coordinator" in closed.stderr
    malformed = run("status", "-i", "http://example:80", *_pin_args(pin))
    assert malformed.exit_code == 2
    assert "HOST:PORT" in malformed.stderr
    usage = run("certificate", "root")
    assert usage.exit_code == 2


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["certificate", "root"],
        ["certificate", "intermediate"],
        ["certificate", "chain"],
        ["manifest", "set"],
        ["manifest", "get"],
        ["manifest", "verify"],
        ["manifest", "log"],
    ],
)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and "marblekeep " + " ".join(command) in result.stdout


# -------------------------------------------------------------------------- v1 fallback on 405 (stub)


@pytest.fixture
def pki() -> StubPki:
    return StubPki.create()


def _v1_only_app(pki: StubPki, manifest: bytes, seen: list[str], posted: list[bytes]) -> web.Application:
    async def v2(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return jsend_error("", 405)

    async def status(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return jsend({"StatusCode": 3, "StatusMessage": STATUS_3})

    async def quote(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return jsend({"Cert": pki.chain_pem, "Quote": None})

    async def manifest_get(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return jsend(
            {
                "ManifestSignatureRootECDSA": base64.b64encode(
                    sign_manifest(pki.root.key, manifest)
                ).decode(),
                "ManifestSignature": hashlib.sha256(manifest).hexdigest(),
                "Manifest": base64.b64encode(manifest).decode(),
            }
        )

    async def manifest_post(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        posted.append(await request.read())
        return jsend(None)

    async def update(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return jsend("2026-01-01 initial manifest set\n2026-01-02 package app updated to SecurityVersion 2\n")

    app = web.Application()
    app.router.add_route("*", "/api/v2/{tail:.*}", v2)
    app.router.add_get("/status", status)
    app.router.add_get("/quote", quote)
    app.router.add_get("/manifest", manifest_get)
    app.router.add_post("/manifest", manifest_post)
    app.router.add_get("/update", update)
    return app


def test_v1_fallback_when_v2_answers_405(pki: StubPki, pin: Path, tmp_path: Path) -> None:
    manifest = json.dumps(OTHER_MANIFEST).encode()
    seen: list[str] = []
    posted: list[bytes] = []
    server = StubServer(_v1_only_app(pki, manifest, seen, posted), pki.listener)
    try:
        status = run("status", "-i", server.addr, *_pin_args(pin))
        assert status.exit_code == 0, status.output
        assert status.stdout == f"3: {STATUS_3}\n"
        assert seen[:4] == ["GET /api/v2/quote", "GET /quote", "GET /api/v2/status", "GET /status"]
        assert pin.read_bytes() == pki.root.cert_pem

        got = run("manifest", "get", server.addr, *_pin_args(pin))
        assert got.exit_code == 0, got.output
        assert got.stdout_bytes == manifest

        log = run("manifest", "log", server.addr, *_pin_args(pin))
        assert log.exit_code == 0, log.output
        assert log.stdout.splitlines() == [
            "2026-01-01 initial manifest set",
            "2026-01-02 package app updated to SecurityVersion 2",
        ]

        file = tmp_path / "m.json"
        file.write_bytes(manifest)
        assert run("manifest", "set", str(file), server.addr, *_pin_args(pin)).exit_code == 0
        assert posted == [manifest]  # v1 takes the raw manifest as the body
        assert "POST /api/v2/manifest" in seen and "POST /manifest" in seen
    finally:
        server.stop()


def test_a_manifest_with_a_wrong_signature_is_not_printed(pki: StubPki, pin: Path) -> None:
    manifest = json.dumps(OTHER_MANIFEST).encode()
    forged = StubPki.create()  # signs with another root's key

    async def manifest_get(request: web.Request) -> web.Response:
        return jsend(
            {
                "manifestSignatureRootECDSA": base64.b64encode(
                    sign_manifest(forged.root.key, manifest)
                ).decode(),
                "manifestFingerprint": hashlib.sha256(manifest).hexdigest(),
                "manifest": base64.b64encode(manifest).decode(),
            }
        )

    async def quote(request: web.Request) -> web.Response:
        return jsend({"cert": pki.chain_pem, "quote": ""})

    app = web.Application()
    app.router.add_get("/api/v2/manifest", manifest_get)
    app.router.add_get("/api/v2/quote", quote)
    server = StubServer(app, pki.listener)
    try:
        result = run("manifest", "get", "-i", server.addr, *_pin_args(pin))
        assert result.exit_code == 1
        assert "signature does not verify" in result.stderr
        assert result.stdout == ""
    finally:
        server.stop()


# ------------------------------------------------------------------------------- impostor (a Marble)


def _quote_app(pki: StubPki) -> web.Application:
    async def quote(request: web.Request) -> web.Response:
        return jsend({"cert": pki.chain_pem, "quote": ""})

    async def status(request: web.Request) -> web.Response:
        return jsend({"code": 3, "message": STATUS_3})

    app = web.Application()
    app.router.add_get("/api/v2/quote", quote)
    app.router.add_get("/api/v2/status", status)
    return app


def test_a_marble_certificate_cannot_impersonate_the_coordinator(pki: StubPki, pin: Path) -> None:
    """A Marble's TLS certificate chains to the Coordinator root through the intermediate; the CLI
    accepts only a server certificate that the pinned root signed itself."""
    pin.parent.mkdir(parents=True)
    pin.write_bytes(pki.root.cert_pem)
    impostor = StubServer(_quote_app(pki), pki.impostor_credentials())
    genuine = StubServer(_quote_app(pki), pki.listener)
    try:
        refused = run("status", impostor.addr, *_pin_args(pin))
        assert refused.exit_code == 1
        assert "not the one whose root certificate is pinned" in refused.stderr
        assert "not signed directly by the pinned Coordinator root" in refused.stderr
        accepted = run("status", genuine.addr, *_pin_args(pin))
        assert accepted.exit_code == 0, accepted.output
        assert accepted.stdout == f"3: {STATUS_3}\n"
    finally:
        impostor.stop()
        genuine.stop()


# ------------------------------------------------------------------- a real SGX quote (dcap vector)

VECTOR_TIME = dt.datetime(2025, 6, 25, tzinfo=dt.UTC)


@pytest.fixture
def quoting_stub(dcap_vectors: Path, pki: StubPki) -> Iterator[tuple[StubServer, list[str]]]:
    quote = (dcap_vectors / "sgx_quote").read_bytes()
    nonces: list[str] = []

    async def quote_handler(request: web.Request) -> web.Response:
        nonces.append(request.query.get("nonce", ""))
        return jsend({"cert": pki.chain_pem, "quote": base64.b64encode(quote).decode()})

    async def status(request: web.Request) -> web.Response:
        return jsend({"code": 2, "message": STATUS_2})

    app = web.Application()
    app.router.add_get("/api/v2/quote", quote_handler)
    app.router.add_get("/api/v2/status", status)
    server = StubServer(app, pki.listener)
    try:
        yield server, nonces
    finally:
        server.stop()


def _vector_identity(dcap_vectors: Path) -> dict[str, Any]:
    quote = (dcap_vectors / "sgx_quote").read_bytes()
    return {
        "UniqueID": quote[112:144].hex(),
        "SignerID": quote[176:208].hex(),
        "ProductID": 0,
        "SecurityVersion": 0,
    }


def _vector_args(dcap_vectors: Path, era_file: Path, pin: Path) -> list[str]:
    return [
        "--era-config",
        str(era_file),
        "--collateral",
        str(dcap_vectors / "sgx_quote_collateral.json"),
        *_pin_args(pin),
    ]


@pytest.fixture
def at_vector_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_cmds, "_now", lambda: VECTOR_TIME)


def test_a_real_quote_needs_an_era_config_and_collateral(
    quoting_stub: tuple[StubServer, list[str]], pin: Path, tmp_path: Path, dcap_vectors: Path
) -> None:
    server, _ = quoting_stub
    no_era = run("status", server.addr, *_pin_args(pin))
    assert no_era.exit_code == 1 and "no era config" in no_era.stderr
    era = tmp_path / "era.json"
    era.write_text(json.dumps(_vector_identity(dcap_vectors)))
    no_collateral = run("status", server.addr, "--era-config", str(era), *_pin_args(pin))
    assert no_collateral.exit_code == 1 and "no collateral" in no_collateral.stderr
    assert not pin.exists()

    era.write_text('{"Debug": false}')
    unpinned = run("status", server.addr, "--era-config", str(era), *_pin_args(pin))
    assert unpinned.exit_code == 2
    assert "neither UniqueID nor SignerID" in unpinned.stderr


@pytest.mark.usefixtures("at_vector_time")
def test_a_quote_not_bound_to_the_root_and_nonce_is_refused(
    quoting_stub: tuple[StubServer, list[str]], pin: Path, tmp_path: Path, dcap_vectors: Path
) -> None:
    server, nonces = quoting_stub
    era = tmp_path / "era.json"
    era.write_text(json.dumps(_vector_identity(dcap_vectors)))
    result = run("status", server.addr, "--nonce", "hello", *_vector_args(dcap_vectors, era, pin))
    assert result.exit_code == 1
    assert "report data" in result.stderr
    assert nonces == [base64.urlsafe_b64encode(b"hello").decode()]
    assert not pin.exists()


@pytest.mark.usefixtures("at_vector_time")
def test_a_verified_quote_is_checked_against_the_era_config_then_pinned(
    quoting_stub: tuple[StubServer, list[str]],
    pki: StubPki,
    pin: Path,
    tmp_path: Path,
    dcap_vectors: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vector's report data is "Hello, world!", so the binding to our stub root is replaced
    by that value; everything else (Intel signature, collateral, TCB, identity) is real."""
    bound = b"Hello, world!".ljust(32, b"\0")
    monkeypatch.setattr(attest, "coordinator_report_data", lambda root, nonce: bound)
    server, _ = quoting_stub
    era = tmp_path / "era.json"
    identity = _vector_identity(dcap_vectors)

    era.write_text(json.dumps(identity))
    tcb = run("status", server.addr, *_vector_args(dcap_vectors, era, pin))
    assert tcb.exit_code == 1
    assert "ConfigurationAndSWHardeningNeeded" in tcb.stderr and "--accepted-tcb-statuses" in tcb.stderr
    assert not pin.exists()

    accept_tcb = ["--accepted-tcb-statuses", "UpToDate,ConfigurationAndSWHardeningNeeded"]
    era.write_text(json.dumps(dict(identity, UniqueID="00" * 32)))
    wrong = run("status", server.addr, *accept_tcb, *_vector_args(dcap_vectors, era, pin))
    assert wrong.exit_code == 1
    assert "MRENCLAVE" in wrong.stderr and "UniqueID" in wrong.stderr
    assert not pin.exists()

    era.write_text(json.dumps(dict(identity, SecurityVersion=1)))
    old = run("status", server.addr, *accept_tcb, *_vector_args(dcap_vectors, era, pin))
    assert old.exit_code == 1 and "SecurityVersion" in old.stderr

    # the era config's own AcceptedTCBStatuses count when the flag is not given
    era.write_text(json.dumps(dict(identity, AcceptedTCBStatuses=["ConfigurationAndSWHardeningNeeded"])))
    ok = run("status", server.addr, *_vector_args(dcap_vectors, era, pin))
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == f"2: {STATUS_2}\n"
    assert "attested" in ok.stderr and "INSECURE" not in ok.stderr
    assert pin.read_bytes() == pki.root.cert_pem


def test_collateral_expired_at_the_current_time_is_a_clear_refusal(
    quoting_stub: tuple[StubServer, list[str]], pin: Path, tmp_path: Path, dcap_vectors: Path
) -> None:
    server, _ = quoting_stub
    era = tmp_path / "era.json"
    era.write_text(json.dumps(_vector_identity(dcap_vectors)))
    result = run("status", server.addr, *_vector_args(dcap_vectors, era, pin))  # now: long after July 2025
    assert result.exit_code == 1
    assert "expired" in result.stderr
    assert not pin.exists()


# ------------------------------------------------------------------------------------------- docs


def _documented_command_lines() -> list[list[str]]:
    doc = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    lines = []
    for line in doc.read_text().splitlines():
        if line.startswith("$ marblekeep "):
            lines.append(shlex.split(line[2:].split(">")[0]))
    return lines


def test_every_command_line_in_the_cli_docs_uses_real_commands_and_options() -> None:
    lines = _documented_command_lines()
    assert len(lines) >= 10
    for argv in lines:
        check_command_line(argv, exact_arguments=True)
