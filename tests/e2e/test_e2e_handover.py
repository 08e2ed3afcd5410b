"""The attested key hand-over between replicas, with real processes on loopback and a real etcd.

- A replica started with its own fresh data directory *after* the manifest was set on another one
  finds no entry for its KEK, asks the registered replica, and serves the same keys (status 3
  within the start-up bound); after ``kill -9`` of the first it keeps serving, the first one
  restarts on its own entry, and the joiner restarts alone too.
- A replica with another identity (here: a non-simulation replica with Gramine-directory fakes
  asking a simulation replica) is refused the key, with a log line on both sides, and enters
  Recovery once its bounded wait ends.
- A replica with nobody registered (the only replica killed, its lease run out) enters Recovery.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from e2e_state_support import STATUS_3, CoordinatorProcess, Site, cli, run_marble, status_code

from etcd_support import EtcdMember, unique_prefix
from harness import marblekeep_argv
from testsupport import stop_gracefully

pytestmark = pytest.mark.slow

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dcap"


def manifest_doc() -> dict[str, object]:
    return {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {
            "worker": {
                "Package": "app",
                "Parameters": {
                    "Env": {"MK_SEAL_KEY": "{{ hex .MarbleRun.SealKey }}", "MK_K": "{{ hex .Secrets.k }}"}
                },
            }
        },
        "Secrets": {"k": {"Type": "symmetric-key", "Size": 256}},
    }


def wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def set_manifest(site: Site) -> None:
    path = site.path("manifest.json")
    path.write_text(json.dumps(manifest_doc()))
    cli(
        site,
        "manifest",
        "set",
        str(path),
        site.client_addr,
        "--insecure",
        "--coordinator-cert",
        str(site.pin),
    )


def test_replica_started_later_joins_by_handover_and_restarts_alone(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    store = ("--store", etcd_server.url + unique_prefix().rstrip("/"))
    a, b = Site(tmp_path / "a"), Site(tmp_path / "b")
    first = CoordinatorProcess(a, "1", *store)
    second: CoordinatorProcess | None = None
    try:
        set_manifest(a)
        # the first replica registers once it holds a stored state
        wait_for(lambda: "registered for the key hand-over" in first.output, "the first replica registers")
        second = CoordinatorProcess(b, "1", *store)  # its own fresh data directory, its own KEK
        wait_for(lambda: status_code(b) == 3, "the second replica serves the deployment", timeout=30)
        assert "this replica's key has no entry for the shared state" in second.output
        assert "joined by key hand-over: own key entry stored, rollback anchor seeded" in second.output
        assert "deployment key handed over to a joining replica after attestation" in first.output
        assert "--allow-rollback" not in second.output
        assert a.kek_file.read_bytes() != b.kek_file.read_bytes()

        shutil.copy(a.pin, b.pin)
        from_a = run_marble(a, "worker", "uuid")
        shutil.copy(a.path("uuid"), b.path("uuid"))
        from_b = run_marble(b, "worker", "uuid")
        assert from_a["MK_SEAL_KEY"] == from_b["MK_SEAL_KEY"] and from_a["MK_K"] == from_b["MK_K"]

        # kill -9 of the first: the second keeps serving; the first rejoins on its own entry
        first.kill()
        assert run_marble(b, "worker", "uuid")["MK_K"] == from_a["MK_K"]
        first = CoordinatorProcess(a, "2", *store)
        assert status_code(a) == 3
        assert "asking a running replica" not in first.output
        assert run_marble(a, "worker", "uuid")["MK_K"] == from_a["MK_K"]

        # the joiner restarts alone (nobody else running): its own entry opens the state
        first.stop()
        second.stop()
        second = CoordinatorProcess(b, "2", *store)
        assert cli(b, "status", b.client_addr, "--coordinator-cert", str(b.pin)).stdout == f"3: {STATUS_3}\n"
        assert "asking a running replica" not in second.output
        assert run_marble(b, "worker", "uuid")["MK_K"] == from_a["MK_K"]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    for process in (first, second):
        if process is not None:
            assert "Traceback" not in process.output


def gramine_fake(root: Path) -> Path:
    """A Gramine attestation directory: sealing keys of another CPU, a real SGX quote as evidence."""
    (root / "keys").mkdir(parents=True)
    (root / "attestation_type").write_text("dcap")
    (root / "keys" / "_sgx_mrsigner").write_bytes(b"\x01" * 16)
    (root / "keys" / "_sgx_mrenclave").write_bytes(b"\x02" * 16)
    (root / "quote").write_bytes((VECTORS / "sgx_quote").read_bytes())
    return root


def test_replica_with_another_identity_is_refused(etcd_server: EtcdMember, tmp_path: Path) -> None:
    store = ["--store", etcd_server.url + unique_prefix().rstrip("/")]
    a, b = Site(tmp_path / "a"), Site(tmp_path / "b")
    first = CoordinatorProcess(a, "1", *store)
    proc: subprocess.Popen[bytes] | None = None
    log = b.path("coordinator-tee.log")
    try:
        set_manifest(a)
        wait_for(lambda: "registered for the key hand-over" in first.output, "the first replica registers")
        root = gramine_fake(tmp_path / "attestation")
        argv = [*marblekeep_argv(), "coordinator", "--client-addr", b.client_addr, "--mesh-addr", b.mesh_addr]
        argv += ["--seal-dir", str(b.seal_dir), "--attestation-root", str(root), *store]
        argv += ["--handover-wait", "3", "--unsafe-accept-simulation-state"]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=b.workdir, env=b.env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "coordinator started" in log.read_text(errors="replace"), "the TEE replica starts")
        output = log.read_text(errors="replace")
        # the joiner: refused with the reason, then Recovery as without any replica
        assert "refused the key hand-over" in output and "runs with --simulation" in output
        assert "no replica handed the deployment key over" in output
        assert status_code(b) == 1
        # the server: a clear refusal naming the reason
        assert "key hand-over refused" in first.output
        assert "the joiner sent TEE evidence, but this replica runs with --simulation" in first.output
        assert "deployment key handed over" not in first.output
    finally:
        if proc is not None:
            stop_gracefully(proc)
        first.stop()
    assert "Traceback" not in log.read_text(errors="replace") + first.output


def test_nobody_registered_means_recovery(etcd_server: EtcdMember, tmp_path: Path) -> None:
    store = ("--store", etcd_server.url + unique_prefix().rstrip("/"))
    a, b = Site(tmp_path / "a"), Site(tmp_path / "b")
    first = CoordinatorProcess(a, "1", *store)
    try:
        set_manifest(a)
        wait_for(lambda: "registered for the key hand-over" in first.output, "the first replica registers")
    finally:
        first.stop()  # a graceful stop revokes its lease: nobody is registered any more
    second = CoordinatorProcess(b, "1", *store, "--handover-wait", "2")
    try:
        assert status_code(b) == 1
        assert "waiting for a replica to hand the deployment key over" in second.output
        assert "registered=0" in second.output or '"registered": 0' in second.output
    finally:
        second.stop()
