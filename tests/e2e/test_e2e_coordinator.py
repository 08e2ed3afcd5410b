"""Issue 3, "Done when", end to end with real processes on loopback.

One Coordinator lifecycle with one restart: ``marblekeep coordinator --simulation`` runs as a
subprocess on free ports with its own seal directory; ``marblekeep manifest set --insecure`` sets a
manifest with the virtual seal key, a shared and a per-Marble symmetric key, a certificate secret
and the Marble's TLS credentials; Marbles run as ``marblekeep marble run -- python3 -c '...'`` and
print what they received as JSON. The Coordinator is stopped with SIGTERM and started again on the
same seal directory, and the same Marble (same UUID file) runs once more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from harness import (
    STATUS_3,
    CoordinatorSubprocess,
    clean_env,
    free_port,
    run_marble_subprocess,
    run_marblekeep,
    web_secrets,
)

MARBLE_TYPE = "worker"
SINGLETON_TYPE = "singleton"

MANIFEST: dict[str, Any] = {
    "Packages": {"app": {"Debug": True}},
    "Marbles": {
        MARBLE_TYPE: {
            "Package": "app",
            "Parameters": {
                "Env": {
                    "SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
                    "SHARED_KEY": "{{ hex .Secrets.shared_key }}",
                    "OWN_KEY": "{{ hex .Secrets.own_key }}",
                    "TLS_CERT": "{{ pem .MarbleRun.MarbleCert.Cert }}",
                    "TLS_KEY": "{{ pem .MarbleRun.MarbleCert.Private }}",
                    "WEB_CERT": "{{ pem .Secrets.web_cert.Cert }}",
                    "WEB_KEY": "{{ pem .Secrets.web_cert.Private }}",
                }
            },
        },
        SINGLETON_TYPE: {
            "Package": "app",
            "MaxActivations": 1,
            "Parameters": {"Env": {"SEAL_KEY": "{{ hex .MarbleRun.SealKey }}"}},
        },
    },
    "Secrets": web_secrets(),
}

#: The Marble's program: print every variable it was given, as one JSON object.
PRINT_ENV = (
    "import json, os\n"
    "names = ['SEAL_KEY', 'SHARED_KEY', 'OWN_KEY', 'TLS_CERT', 'TLS_KEY', 'WEB_CERT', 'WEB_KEY']\n"
    "names += [k for k in os.environ if k.startswith('MARBLE_PREDEFINED_')]\n"
    "print(json.dumps({k: os.environ[k] for k in names if k in os.environ}))\n"
)

SECRET_FIELDS = ("SEAL_KEY", "SHARED_KEY", "OWN_KEY", "TLS_KEY", "WEB_KEY", "MARBLE_PREDEFINED_PRIVATE_KEY")


@dataclass
class Deployment:
    """Everything the scenario observed."""

    workdir: Path
    env: dict[str, str]
    client_addr: str
    mesh_addr: str
    seal_dir: Path
    coordinator_logs: list[Path] = field(default_factory=list)
    coordinator_exit_codes: list[int] = field(default_factory=list)
    marbles: dict[str, dict[str, str]] = field(default_factory=dict)
    refused: subprocess.CompletedProcess[str] | None = None
    cli: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    root_pem_before: bytes = b""
    root_pem_after: bytes = b""
    intermediate_pem: bytes = b""


def _coordinator(dep: Deployment, log: Path) -> CoordinatorSubprocess:
    return CoordinatorSubprocess(
        workdir=dep.workdir,
        env=dep.env,
        client_addr=dep.client_addr,
        mesh_addr=dep.mesh_addr,
        seal_dir=dep.seal_dir,
        log=log,
    )


def _cli(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return run_marblekeep(dep.workdir, dep.env, *args)


def _marble(dep: Deployment, marble_type: str, uuid_file: str) -> subprocess.CompletedProcess[str]:
    return run_marble_subprocess(
        dep.workdir,
        dep.env,
        mesh_addr=dep.mesh_addr,
        marble_type=marble_type,
        uuid_file=dep.workdir / uuid_file,
        program=PRINT_ENV,
        activation_timeout=20,
    )


def _run_marble(dep: Deployment, name: str, marble_type: str, uuid_file: str) -> None:
    result = _marble(dep, marble_type, uuid_file)
    assert result.returncode == 0, f"Marble {name} failed:\n{result.stderr}"
    dep.marbles[name] = json.loads(result.stdout)


def _check_cli(dep: Deployment, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = _cli(dep, *args)
    assert result.returncode == 0, f"marblekeep {' '.join(args)} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    dep.cli[name] = result
    return result


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("e2e")
    env = clean_env()
    env.update(XDG_CONFIG_HOME=str(workdir / "config"), PYTHONUNBUFFERED="1")
    dep = Deployment(
        workdir=workdir,
        env=env,
        client_addr=f"127.0.0.1:{free_port()}",
        mesh_addr=f"127.0.0.1:{free_port()}",
        seal_dir=workdir / "seal",
    )
    manifest_file = workdir / "manifest.json"
    manifest_file.write_text(json.dumps(MANIFEST, indent=2))

    first = _coordinator(dep, workdir / "coordinator-1.log")
    dep.coordinator_logs.append(first.log)
    try:
        _check_cli(dep, "set", "manifest", "set", str(manifest_file), dep.client_addr, "--insecure")
        _check_cli(dep, "status", "status", dep.client_addr)
        dep.root_pem_before = _check_cli(dep, "root", "certificate", "root", dep.client_addr).stdout.encode()
        dep.intermediate_pem = _check_cli(
            dep, "intermediate", "certificate", "intermediate", dep.client_addr
        ).stdout.encode()
        _run_marble(dep, "a", MARBLE_TYPE, "uuid-a")
        _run_marble(dep, "a-restarted", MARBLE_TYPE, "uuid-a")
        _run_marble(dep, "b", MARBLE_TYPE, "uuid-b")
        _run_marble(dep, "single", SINGLETON_TYPE, "uuid-single")
        dep.refused = _marble(dep, SINGLETON_TYPE, "uuid-single-2")
    finally:
        dep.coordinator_exit_codes.append(first.stop())

    second = _coordinator(dep, workdir / "coordinator-2.log")
    dep.coordinator_logs.append(second.log)
    try:
        # no --insecure: the pinned root must still be the Coordinator's after the restart
        dep.root_pem_after = _check_cli(
            dep, "root-after", "certificate", "root", dep.client_addr
        ).stdout.encode()
        _check_cli(dep, "verify-after", "manifest", "verify", str(manifest_file), dep.client_addr)
        _run_marble(dep, "a-after-coordinator-restart", MARBLE_TYPE, "uuid-a")
    finally:
        dep.coordinator_exit_codes.append(second.stop())
    yield dep


# ------------------------------------------------------------------------------------------------ tests


def test_the_coordinator_runs_and_stops_gracefully(deployment: Deployment) -> None:
    assert deployment.coordinator_exit_codes == [0, 0]
    assert deployment.cli["status"].stdout == f"3: {STATUS_3}\n"
    fingerprint = hashlib.sha256((deployment.workdir / "manifest.json").read_bytes()).hexdigest()
    assert f"Manifest fingerprint: {fingerprint}" in deployment.cli["set"].stdout
    assert "SIMULATION" in deployment.cli["set"].stderr  # --insecure on a simulation Coordinator is loud


def test_the_same_marble_keeps_its_seal_key_across_its_own_and_the_coordinators_restart(
    deployment: Deployment,
) -> None:
    m = deployment.marbles
    assert len(bytes.fromhex(m["a"]["SEAL_KEY"])) == 32
    assert m["a"]["SEAL_KEY"] == m["a-restarted"]["SEAL_KEY"]
    assert m["a"]["SEAL_KEY"] == m["a-after-coordinator-restart"]["SEAL_KEY"]
    assert m["b"]["SEAL_KEY"] != m["a"]["SEAL_KEY"], "another UUID must get another seal key"


def test_shared_key_is_shared_and_per_marble_key_is_per_marble(deployment: Deployment) -> None:
    m = deployment.marbles
    shared = {m[name]["SHARED_KEY"] for name in ("a", "a-restarted", "b", "a-after-coordinator-restart")}
    assert len(shared) == 1 and len(bytes.fromhex(shared.pop())) == 32
    assert m["a"]["OWN_KEY"] != m["b"]["OWN_KEY"]
    # derived from the UUID: the same Marble gets its own key back, also after the Coordinator restarted
    assert m["a"]["OWN_KEY"] == m["a-restarted"]["OWN_KEY"] == m["a-after-coordinator-restart"]["OWN_KEY"]
    assert m["a"]["OWN_KEY"] != m["a"]["SEAL_KEY"]


def test_every_activation_brings_a_new_tls_key_and_certificate(deployment: Deployment) -> None:
    runs = [deployment.marbles[n] for n in ("a", "a-restarted", "b", "a-after-coordinator-restart")]
    assert len({r["TLS_KEY"] for r in runs}) == len(runs)
    assert len({r["TLS_CERT"] for r in runs}) == len(runs)
    serials = {x509.load_pem_x509_certificate(r["TLS_CERT"].encode()).serial_number for r in runs}
    assert len(serials) == len(runs)
    for r in runs:
        cert = x509.load_pem_x509_certificate(r["TLS_CERT"].encode())
        key = serialization.load_pem_private_key(r["TLS_KEY"].encode(), password=None)
        assert cert.public_key() == key.public_key()
        assert r["MARBLE_PREDEFINED_PRIVATE_KEY"] == r["TLS_KEY"]


def _openssl_verify(workdir: Path, ca: bytes, leaf: bytes, untrusted: bytes | None, name: str) -> None:
    ca_file, leaf_file = workdir / f"{name}-ca.pem", workdir / f"{name}-leaf.pem"
    ca_file.write_bytes(ca)
    leaf_file.write_bytes(leaf)
    args = ["openssl", "verify", "-CAfile", str(ca_file)]
    if untrusted is not None:
        untrusted_file = workdir / f"{name}-untrusted.pem"
        untrusted_file.write_bytes(untrusted)
        args += ["-untrusted", str(untrusted_file)]
    result = subprocess.run([*args, str(leaf_file)], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def test_certificate_chains_verify_with_openssl(deployment: Deployment) -> None:
    dep = deployment
    assert dep.root_pem_before == dep.root_pem_after, "the root CA must survive the Coordinator restart"
    root = x509.load_pem_x509_certificate(dep.root_pem_before)
    assert root.subject == root.issuer  # self-signed
    for name in ("a", "a-after-coordinator-restart"):
        marble = dep.marbles[name]
        leaf = marble["TLS_CERT"].encode()
        # leaf → intermediate → root (`marblekeep certificate root` output)
        _openssl_verify(dep.workdir, dep.root_pem_before, leaf, dep.intermediate_pem, f"{name}-via-root")
        # leaf → Marble root (MARBLE_PREDEFINED_ROOT_CA)
        _openssl_verify(
            dep.workdir, marble["MARBLE_PREDEFINED_ROOT_CA"].encode(), leaf, None, f"{name}-marble"
        )
        assert marble["MARBLE_PREDEFINED_COORDINATOR_ROOT_CA"].encode().strip() == dep.root_pem_before.strip()
        chain = x509.load_pem_x509_certificates(marble["MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"].encode())
        assert chain[0].public_bytes(serialization.Encoding.PEM) == leaf
    # the shared certificate secret is the same for every Marble and is issued by the Marble root
    web = {dep.marbles[n]["WEB_CERT"] for n in ("a", "b", "a-after-coordinator-restart")}
    assert len(web) == 1
    web_cert = web.pop().encode()
    _openssl_verify(dep.workdir, dep.root_pem_before, web_cert, dep.intermediate_pem, "web-cert")
    cert = x509.load_pem_x509_certificate(web_cert)
    assert cert.subject.rfc4514_string() == "CN=web.example"


def test_a_second_marble_of_a_max_activations_1_type_is_refused(deployment: Deployment) -> None:
    refused = deployment.refused
    assert refused is not None
    assert refused.returncode != 0
    assert refused.stdout == "", "the refused Marble's program must not run"
    assert "max activations" in refused.stderr.lower()
    assert "MaxActivations" in refused.stderr  # names the manifest field to change
    assert "Traceback" not in refused.stderr
    assert "SEAL_KEY" in deployment.marbles["single"]


def _encodings(value: str) -> set[str]:
    """A secret as the Marble printed it, and the other encodings a log line might carry."""
    forms = {value}
    if all(c in "0123456789abcdef" for c in value):
        raw = bytes.fromhex(value)
        forms |= {base64.b64encode(raw).decode(), value.upper()}
    elif value.startswith("-----BEGIN"):
        forms |= {line for line in value.splitlines() if len(line) >= 40 and not line.startswith("-----")}
    return forms


def test_the_coordinator_log_never_contains_a_secret_the_marbles_received(deployment: Deployment) -> None:
    logs = "\n".join(p.read_text(errors="replace") for p in deployment.coordinator_logs)
    assert "coordinator started" in logs and "SIMULATION" in logs
    secrets = set()
    for received in deployment.marbles.values():
        for name in SECRET_FIELDS:
            if name in received:
                secrets |= _encodings(received[name])
    assert len(secrets) > 20
    leaked = sorted(s[:12] + "..." for s in secrets if s in logs)
    assert not leaked, f"secret values in the Coordinator's log: {leaked}"
