"""MarbleRun premains activate against ``marblekeep coordinator --simulation`` (issue 9, item 5).

Each test runs Go premains as real subprocess Marbles against a real Coordinator subprocess, on the
Marble address that our own premain (``marblekeep marble run``) uses: the MarbleRun gRPC Marble API
(``rpc.Marble/Activate``, ALPN h2) beside our protocol on the same port. Two Go premains are tested:

- ``premain``: our MarbleRun-style premain on google.golang.org/grpc, written from MarbleRun's
  documented behaviour (always built by tests/interop/build.sh; required);
- ``marblerun-premain-mock``: MarbleRun v1.5.2's own ``premain.PreMainMock()`` (built only where
  MarbleRun's source is available; otherwise these cases are skipped with the reason).

Both send an empty quote, which only a simulation Coordinator accepts.
"""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from interop_support import GENUINE_PREMAIN, OUR_GO_PREMAIN, GoMarble, finish, genuine_binary, required_binary

from harness import (
    CoordinatorSubprocess,
    clean_env,
    free_port,
    run_marble_subprocess,
    run_marblekeep,
    web_secrets,
)

pytestmark = pytest.mark.slow

WORKER = "worker"
WITH_ARGV = "with-argv"
#: One MaxActivations-limited type per premain, so that each case starts from a fresh budget.
LIMITED = {OUR_GO_PREMAIN: "limited-a", GENUINE_PREMAIN: "limited-b"}
MAX_ACTIVATIONS = 3
CONCURRENT = 8
MARBLE_TYPE_OID = x509.ObjectIdentifier("1.3.9903.2.1")

ENV = {
    "SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
    "SHARED_KEY": "{{ hex .Secrets.shared_key }}",
    "OWN_KEY": "{{ hex .Secrets.own_key }}",
    "MARBLE_CERT": "{{ pem .MarbleRun.MarbleCert.Cert }}",
    "WEB_CERT": "{{ pem .Secrets.web_cert.Cert }}",
}
PREDEFINED = (
    "MARBLE_PREDEFINED_ROOT_CA",
    "MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN",
    "MARBLE_PREDEFINED_PRIVATE_KEY",
    "MARBLE_PREDEFINED_COORDINATOR_ROOT_CA",
)
ENV_NAMES = (*ENV, *PREDEFINED, "GREETING")
STATIC_TEXT = "hello from the manifest\n"
REL_FILES = ("out/seal.hex", "out/nested/own.key", "static.txt")

#: Our premain's workload: prints the Env it was given as one JSON object.
PRINT_ENV = (
    "import json, os\n"
    f"names = {list(ENV_NAMES)!r}\n"
    "print(json.dumps({'env': {k: os.environ[k] for k in names if k in os.environ}}))\n"
)


def manifest(abs_file: Path) -> dict[str, Any]:
    limited = {
        name: {
            "Package": "app",
            "MaxActivations": MAX_ACTIVATIONS,
            "Parameters": {"Env": {"SEAL_KEY": ENV["SEAL_KEY"]}},
        }
        for name in LIMITED.values()
    }
    return {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {
            WORKER: {
                "Package": "app",
                "Parameters": {
                    "Env": ENV,
                    "Files": {
                        "out/seal.hex": "{{ hex .MarbleRun.SealKey }}",
                        "out/nested/own.key": "{{ raw .Secrets.own_key }}",
                        "static.txt": STATIC_TEXT,
                        str(abs_file): "{{ pem .MarbleRun.MarbleCert.Cert }}",
                    },
                },
            },
            WITH_ARGV: {
                "Package": "app",
                "Parameters": {"Argv": ["server", "--port", "8080"], "Env": {"GREETING": "hello"}},
            },
            **limited,
        },
        "Secrets": web_secrets(),
    }


@dataclass(frozen=True)
class Deployment:
    workdir: Path
    env: dict[str, str]
    client_addr: str
    mesh_addr: str
    abs_file: Path
    root_pem: bytes
    intermediate_pem: bytes
    coordinator: CoordinatorSubprocess


def _cli(dep_workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = run_marblekeep(dep_workdir, env, *args)
    assert result.returncode == 0, f"marblekeep {' '.join(args)} failed:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    required_binary(OUR_GO_PREMAIN)  # fails (or skips when opted out) before a Coordinator starts
    workdir = tmp_path_factory.mktemp("interop")
    env = clean_env()
    env.update(XDG_CONFIG_HOME=str(workdir / "config"), PYTHONUNBUFFERED="1")
    client_addr, mesh_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    abs_file = workdir / "abs" / "dir" / "marble-cert.pem"
    (workdir / "manifest.json").write_text(json.dumps(manifest(abs_file), indent=2))
    coordinator = CoordinatorSubprocess(
        workdir=workdir,
        env=env,
        client_addr=client_addr,
        mesh_addr=mesh_addr,
    )
    try:
        _cli(workdir, env, "manifest", "set", str(workdir / "manifest.json"), client_addr, "--insecure")
        root = _cli(workdir, env, "certificate", "root", client_addr).stdout.encode()
        intermediate = _cli(workdir, env, "certificate", "intermediate", client_addr).stdout.encode()
        yield Deployment(workdir, env, client_addr, mesh_addr, abs_file, root, intermediate, coordinator)
    finally:
        coordinator.stop()


@pytest.fixture(params=[OUR_GO_PREMAIN, GENUINE_PREMAIN])
def go_marble(request: pytest.FixtureRequest) -> GoMarble:
    name: str = request.param
    binary = required_binary(name) if name == OUR_GO_PREMAIN else genuine_binary(name)
    dep: Deployment = request.getfixturevalue("deployment")
    return GoMarble(binary, dep.mesh_addr, ENV_NAMES, [*REL_FILES, str(dep.abs_file)])


def activated(result: subprocess.CompletedProcess[str], dep: Deployment) -> dict[str, Any]:
    """The Go premain's report; a failed activation fails the test with both sides' output."""
    assert result.returncode == 0, (
        f"the Go premain exited {result.returncode}:\n{result.stderr}\n"
        f"--- Coordinator log (tail):\n{dep.coordinator.output[-3000:]}"
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def our_premain(dep: Deployment, cwd: Path, marble_type: str, uuid_file: Path) -> dict[str, str]:
    """``marblekeep marble run`` (our premain) with the same Marble address; the Env it got."""
    cwd.mkdir(parents=True, exist_ok=True)
    result = run_marble_subprocess(
        cwd,
        dep.env,
        mesh_addr=dep.mesh_addr,
        marble_type=marble_type,
        uuid_file=uuid_file,
        program=PRINT_ENV,
        activation_timeout=20,
    )
    assert result.returncode == 0, f"our premain failed:\n{result.stderr}"
    env: dict[str, str] = json.loads(result.stdout)["env"]
    return env


def marble_dir(dep: Deployment, label: str) -> Path:
    path = dep.workdir / "marbles" / f"{label}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------------ tests


def test_seal_and_per_marble_keys_are_stable_per_uuid_and_equal_to_our_premains(
    go_marble: GoMarble, deployment: Deployment
) -> None:
    dep = deployment
    base = marble_dir(dep, "keys")
    uuid_a, uuid_b = base / "uuid-a", base / "uuid-b"
    first = activated(go_marble.run(base / "go-1", dep.env, WORKER, uuid_a), dep)
    # the Go premain created the UUID file (MarbleRun: text UUID, mode 0600) and reused it
    assert str(uuid.UUID(uuid_a.read_text())) == first["uuid"]
    assert stat.S_IMODE(uuid_a.stat().st_mode) == 0o600
    again = activated(go_marble.run(base / "go-2", dep.env, WORKER, uuid_a), dep)
    assert again["uuid"] == first["uuid"]
    other = activated(go_marble.run(base / "go-b", dep.env, WORKER, uuid_b), dep)
    assert other["uuid"] != first["uuid"]

    assert len(bytes.fromhex(first["env"]["SEAL_KEY"])) == 32
    assert len(bytes.fromhex(first["env"]["OWN_KEY"])) == 32
    assert first["env"]["SEAL_KEY"] == again["env"]["SEAL_KEY"]
    assert first["env"]["OWN_KEY"] == again["env"]["OWN_KEY"]
    assert other["env"]["SEAL_KEY"] != first["env"]["SEAL_KEY"], "another UUID must get another seal key"
    assert other["env"]["OWN_KEY"] != first["env"]["OWN_KEY"], "another UUID must get another per-Marble key"
    assert first["env"]["OWN_KEY"] != first["env"]["SEAL_KEY"]

    # our premain, same UUID file, same Marble address: the very same keys
    ours = our_premain(dep, base / "ours", WORKER, uuid_a)
    assert ours["SEAL_KEY"] == first["env"]["SEAL_KEY"]
    assert ours["OWN_KEY"] == first["env"]["OWN_KEY"]
    # every activation still gets its own TLS certificate
    assert len({first["env"]["MARBLE_CERT"], again["env"]["MARBLE_CERT"], ours["MARBLE_CERT"]}) == 3


def test_shared_keys_are_equal_across_both_premains(go_marble: GoMarble, deployment: Deployment) -> None:
    dep = deployment
    base = marble_dir(dep, "shared")
    go_a = activated(go_marble.run(base / "go-a", dep.env, WORKER, base / "uuid-a"), dep)["env"]
    go_b = activated(go_marble.run(base / "go-b", dep.env, WORKER, base / "uuid-b"), dep)["env"]
    ours = our_premain(dep, base / "ours", WORKER, base / "uuid-c")
    assert len(bytes.fromhex(go_a["SHARED_KEY"])) == 32
    assert go_a["SHARED_KEY"] == go_b["SHARED_KEY"] == ours["SHARED_KEY"]
    assert go_a["WEB_CERT"] == go_b["WEB_CERT"] == ours["WEB_CERT"]
    assert (
        x509.load_pem_x509_certificate(go_a["WEB_CERT"].encode()).subject.rfc4514_string() == "CN=web.example"
    )
    assert go_a["OWN_KEY"] != ours["OWN_KEY"]


def test_files_are_written_and_env_and_argv_are_applied(go_marble: GoMarble, deployment: Deployment) -> None:
    dep = deployment
    base = marble_dir(dep, "files")
    cwd = base / "cwd"
    report = activated(go_marble.run(cwd, dep.env, WORKER, base / "uuid"), dep)
    env = report["env"]
    assert sorted(report["files"]) == sorted([*REL_FILES, str(dep.abs_file)])
    assert (cwd / "out" / "seal.hex").read_text() == env["SEAL_KEY"]
    assert (cwd / "out" / "nested" / "own.key").read_bytes() == bytes.fromhex(env["OWN_KEY"])
    assert (cwd / "static.txt").read_text() == STATIC_TEXT
    assert dep.abs_file.read_text() == env["MARBLE_CERT"]
    for path in (
        cwd / "out" / "seal.hex",
        cwd / "out" / "nested" / "own.key",
        cwd / "static.txt",
        dep.abs_file,
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (cwd / "out", cwd / "out" / "nested", dep.abs_file.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert set(PREDEFINED) <= set(env)
    # no Argv in the manifest: MarbleRun's premain sets ["./marble"]
    assert report["argv"] == ["./marble"]

    with_argv = activated(go_marble.run(base / "argv", dep.env, WITH_ARGV, base / "uuid-argv"), dep)
    assert with_argv["argv"] == ["server", "--port", "8080"]
    assert with_argv["env"]["GREETING"] == "hello"


def _openssl_verify(workdir: Path, ca: bytes, leaf: bytes, untrusted: bytes | None) -> None:
    ca_file, leaf_file = workdir / "ca.pem", workdir / "leaf.pem"
    ca_file.write_bytes(ca)
    leaf_file.write_bytes(leaf)
    args = ["openssl", "verify", "-CAfile", str(ca_file)]
    if untrusted is not None:
        (workdir / "untrusted.pem").write_bytes(untrusted)
        args += ["-untrusted", str(workdir / "untrusted.pem")]
    result = subprocess.run([*args, str(leaf_file)], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def test_marble_certificate_chains_to_the_root_with_cn_uuid(
    go_marble: GoMarble, deployment: Deployment
) -> None:
    dep = deployment
    base = marble_dir(dep, "cert")
    dns = "localhost,worker.interop.test,10.0.0.7"
    report = activated(go_marble.run(base / "cwd", dep.env, WORKER, base / "uuid", dns_names=dns), dep)
    env = report["env"]
    leaf_pem = env["MARBLE_CERT"].encode()
    leaf = x509.load_pem_x509_certificate(leaf_pem)

    # subject: CN = the UUID, nothing else (the premain's CSR has an empty subject)
    assert leaf.subject.rfc4514_string() == f"CN={report['uuid']}"
    assert (
        str(uuid.UUID(leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value))
        == report["uuid"]
    )
    # SANs come from the premain's CSR: default IPs, the extra IP, the DNS names
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "worker.interop.test"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    # the Marble type extension carries the raw type bytes
    assert leaf.extensions.get_extension_for_oid(MARBLE_TYPE_OID).value.value == WORKER.encode()

    # leaf → intermediate → the Coordinator root that `marblekeep certificate root` shows
    _openssl_verify(base, dep.root_pem, leaf_pem, dep.intermediate_pem)
    # leaf → the Marble root the Marble was given
    _openssl_verify(base, env["MARBLE_PREDEFINED_ROOT_CA"].encode(), leaf_pem, None)
    assert env["MARBLE_PREDEFINED_COORDINATOR_ROOT_CA"].encode().strip() == dep.root_pem.strip()
    chain = x509.load_pem_x509_certificates(env["MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"].encode())
    assert chain[0] == leaf
    key = serialization.load_pem_private_key(env["MARBLE_PREDEFINED_PRIVATE_KEY"].encode(), password=None)
    assert key.public_key() == leaf.public_key()


def test_max_activations_is_exact_under_concurrency(
    go_marble: GoMarble, deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    dep = deployment
    marble_type = LIMITED[request.node.callspec.params["go_marble"]]
    base = marble_dir(dep, "limited")
    procs = [
        go_marble.start(base / f"m{i}", dep.env, marble_type, base / f"uuid-{i}") for i in range(CONCURRENT)
    ]
    results = [finish(p) for p in procs]
    ok = [r for r in results if r.returncode == 0]
    refused = [r for r in results if r.returncode != 0]
    assert len(ok) == MAX_ACTIVATIONS, [r.stderr for r in results]
    assert len(refused) == CONCURRENT - MAX_ACTIVATIONS
    for r in refused:
        assert r.stdout == ""
        assert "code = PermissionDenied" in r.stderr, r.stderr
        assert (
            f"reached max activations count ({MAX_ACTIVATIONS}) for marble type '{marble_type}'" in r.stderr
        )
        assert f"Marbles.{marble_type}.MaxActivations" in r.stderr  # our explanation survives gRPC
    assert len({json.loads(r.stdout)["env"]["SEAL_KEY"] for r in ok}) == MAX_ACTIVATIONS

    # one budget for both protocols: our premain is refused too
    cwd = base / "ours"
    cwd.mkdir()
    ours = run_marble_subprocess(
        cwd,
        dep.env,
        mesh_addr=dep.mesh_addr,
        marble_type=marble_type,
        uuid_file=base / "uuid-ours",
        program="print('must not run')",
        activation_timeout=20,
    )
    assert ours.returncode != 0
    assert "must not run" not in ours.stdout
    assert "reached max activations count" in ours.stderr


def test_a_refusal_exits_non_zero_with_our_reason(go_marble: GoMarble, deployment: Deployment) -> None:
    dep = deployment
    base = marble_dir(dep, "refused")
    cwd = base / "cwd"
    result = go_marble.run(cwd, dep.env, "no-such-type", base / "uuid")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "code = PermissionDenied" in result.stderr, result.stderr
    assert "unknown marble type 'no-such-type' requested" in result.stderr
    assert f"the manifest defines: {', '.join(sorted(manifest(dep.abs_file)['Marbles']))}" in result.stderr
    assert list(cwd.iterdir()) == [], "a refused Marble must not write any file"
    assert "Traceback" not in dep.coordinator.output
