"""Two Coordinator replicas on one real etcd, as real subprocesses on loopback (issue 10).

Both replicas run ``marblekeep coordinator --simulation --store etcd://127.0.0.1:PORT/PREFIX`` with
their own, fresh data directory: each has its own simulation KEK, nothing is copied. The second
replica gets the deployment KEK from the first by the attested key hand-over (marblekeep/handover.py):
while running (both started before the manifest) or at start (started after it).

Checked: the second replica follows the first one's manifest (status 3) by hand-over; one UUID gets the same
keys from either replica; ``MaxActivations: 3`` lets exactly 3 of 8 concurrent activations spread
over both replicas through; a secret written through one replica is read through the other; the
update log is one chain; after ``kill -9`` of one replica the other keeps serving and the killed
one rejoins; the last replica restarts alone.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_state_support import (
    STATUS_3,
    CoordinatorProcess,
    Site,
    User,
    cli,
    make_user,
    marble,
    run_marble,
    status_code,
)

from etcd_support import EtcdMember, unique_prefix
from harness import replica_manifest_doc

pytestmark = pytest.mark.slow


def manifest(admin: User) -> dict[str, Any]:
    return replica_manifest_doc(admin.cert_pem, max_activations=3)


def wait_status(site: Site, code: int, timeout: float = 30) -> float:
    start = time.monotonic()
    while status_code(site) != code:
        assert time.monotonic() - start < timeout, (
            f"replica at {site.client_addr} never reached status {code}"
        )
        time.sleep(0.1)
    return time.monotonic() - start


def pin(site: Site) -> tuple[str, str]:
    return ("--coordinator-cert", str(site.pin))


def write_token(site: Site, admin: User, value: bytes) -> None:
    path = site.path("token.json")
    path.write_text(json.dumps({"token": {"Key": base64.b64encode(value).decode()}}))
    cli(site, "secret", "set", str(path), site.client_addr, *admin.args, *pin(site))


def read_token(site: Site, admin: User) -> bytes:
    out = site.path("token-read.json")
    cli(site, "secret", "get", "token", site.client_addr, *admin.args, *pin(site), "-o", str(out))
    return base64.b64decode(json.loads(out.read_text())["token"]["Private"])


def update_log(site: Site) -> list[str]:
    response = httpx.get(f"https://{site.client_addr}/api/v2/update", verify=False, timeout=10)
    lines: list[str] = response.json()["data"]["updateLog"]
    return lines


def test_two_replicas_on_one_etcd(etcd_server: EtcdMember, tmp_path: Path) -> None:
    store = ("--store", etcd_server.url + unique_prefix().rstrip("/"))
    a = Site(tmp_path / "a")
    b = Site(tmp_path / "b")
    admin = make_user(a, "admin")
    for name in ("admin.crt", "admin.key"):
        shutil.copy(a.path(name), b.path(name))
    manifest_file = a.path("manifest.json")
    manifest_file.write_text(json.dumps(manifest(admin)))

    first = CoordinatorProcess(a, "1", *store)
    second: CoordinatorProcess | None = None
    try:
        # the second replica has its own data directory and its own KEK (see the module docstring)
        second = CoordinatorProcess(b, "1", *store)
        assert status_code(b) == 2
        cli(a, "manifest", "set", str(manifest_file), a.client_addr, "--insecure", *pin(a))
        wait_status(b, 3, timeout=60)  # generous: the hand-over itself takes a moment
        assert a.kek_file.read_bytes() != b.kek_file.read_bytes()
        assert "joined the shared state by key hand-over" in second.output
        assert "deployment key handed over to a joining replica" in first.output
        # both replicas serve one deployment: the same root certificate
        shutil.copy(a.pin, b.pin)
        assert cli(b, "status", b.client_addr, *pin(b)).stdout == f"3: {STATUS_3}\n"

        write_token(a, admin, b"written-through-a")
        assert read_token(b, admin) == b"written-through-a"
        write_token(b, admin, b"written-through-b")
        assert read_token(a, admin) == b"written-through-b"

        from_a = run_marble(a, "worker", "uuid-w")
        shutil.copy(a.path("uuid-w"), b.path("uuid-w"))  # the same Marble (UUID) moves to the other replica
        from_b = run_marble(b, "worker", "uuid-w")
        for var in ("MK_SEAL_KEY", "MK_OWN_KEY", "MK_TOKEN"):
            assert from_a[var] == from_b[var], f"{var} differs between the replicas for one UUID"
        assert from_a["MK_TOKEN"] == "written-through-b"

        # MaxActivations 3: exactly 3 of 8 concurrent activations over both replicas succeed
        sites = [a, b] * 4
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: marble(sites[i], "limited", f"uuid-l{i}"), range(8)))
        succeeded = [r for r in results if r.returncode == 0]
        assert len(succeeded) == 3, [r.stderr[-300:] for r in results]
        for refused in (r for r in results if r.returncode != 0):
            assert "activation" in refused.stderr.lower(), refused.stderr[-500:]

        # one update log, the same chain on both replicas
        assert update_log(a) == update_log(b) and update_log(a)

        # kill -9 of one replica: the other keeps serving; the killed one rejoins
        first.kill()
        write_token(b, admin, b"while-a-is-dead")
        assert read_token(b, admin) == b"while-a-is-dead"
        first = CoordinatorProcess(a, "2", *store)
        assert read_token(a, admin) == b"while-a-is-dead"
        assert run_marble(a, "worker", "uuid-w")["MK_SEAL_KEY"] == from_a["MK_SEAL_KEY"]
        assert marble(a, "limited", "uuid-l-late").returncode != 0, "the counter must hold across replicas"

        # the last replica restarts alone
        second.stop()
        second = None
        first.stop()
        first = CoordinatorProcess(a, "3", *store)
        assert cli(a, "status", a.client_addr, *pin(a)).stdout == f"3: {STATUS_3}\n"
        assert read_token(a, admin) == b"while-a-is-dead"

        # the replica that joined by hand-over also restarts alone: its own entry opens the state
        first.stop()
        second = CoordinatorProcess(b, "2", *store)
        assert cli(b, "status", b.client_addr, *pin(b)).stdout == f"3: {STATUS_3}\n"
        assert read_token(b, admin) == b"while-a-is-dead"
        assert "asking a running replica for the key" not in second.output
    finally:
        first.stop()
        if second is not None:
            second.stop()
    for process in (first,):
        assert "Traceback" not in process.output
