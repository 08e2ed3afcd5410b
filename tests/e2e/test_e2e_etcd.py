"""A Coordinator on real etcd (``--store etcd://...``), as real subprocesses on loopback.

The manifest is set and secrets are uploaded with the CLI, Marbles run with ``marblekeep marble
run``; the Coordinator is killed with SIGKILL and started again with a *new, empty* data directory
holding only its key file (the state itself lives in etcd); everything a user observes stays the
same. Then etcd is stopped: a write answers 503 naming etcd, the process keeps running, and once
etcd is back the acknowledged data is served again and writes work, without a restart.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_state_support import STATUS_3, CoordinatorProcess, Site, User, cli, make_user, marble, run_marble

from etcd_support import EtcdMember, raw_range, unique_prefix
from harness import replica_manifest_doc

pytestmark = pytest.mark.slow


def manifest(admin: User) -> dict[str, Any]:
    return replica_manifest_doc(admin.cert_pem, max_activations=2)


def pin(site: Site) -> tuple[str, str]:
    return ("--coordinator-cert", str(site.pin))


def write_token(site: Site, admin: User, value: bytes, *, ok: bool = True) -> str:
    body = {"token": {"Key": base64.b64encode(value).decode()}}
    path = site.path("token.json")
    path.write_text(json.dumps(body))
    return cli(site, "secret", "set", str(path), site.client_addr, *admin.args, *pin(site), ok=ok).output


def read_token(site: Site, admin: User) -> bytes:
    out = site.path("token-read.json")
    cli(site, "secret", "get", "token", site.client_addr, *admin.args, *pin(site), "-o", str(out))
    return base64.b64decode(json.loads(out.read_text())["token"]["Private"])


def secret_set_status(site: Site, admin: User, value: bytes) -> tuple[int, dict[str, Any]]:
    """POST /api/v2/secrets directly, to see the HTTP status and body."""
    body = {"secrets": {"token": {"Key": base64.b64encode(value).decode()}}}
    context = ssl.create_default_context(cafile=str(site.pin))
    context.load_cert_chain(admin.cert, admin.key)
    with httpx.Client(verify=context, trust_env=False, timeout=30) as client:
        response = client.post(f"https://{site.client_addr}/api/v2/secrets", json=body)
    return response.status_code, response.json()


def test_coordinator_on_etcd_survives_kill_and_a_new_data_dir(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    site = Site(tmp_path / "site")
    prefix = unique_prefix()
    store = ("--store", etcd_server.url + prefix.rstrip("/"))
    admin = make_user(site, "admin")
    manifest_file = site.path("manifest.json")
    manifest_file.write_text(json.dumps(manifest(admin)))

    first = CoordinatorProcess(site, "1", *store)
    try:
        cli(site, "manifest", "set", str(manifest_file), site.client_addr, "--insecure", *pin(site))
        write_token(site, admin, b"first-token")
        before = run_marble(site, "worker", "uuid-a")
        run_marble(site, "limited", "uuid-l1")
        run_marble(site, "limited", "uuid-l2")
    finally:
        first.kill()
    log = first.output
    assert "state store opened" in log and prefix.rstrip("/") in log
    assert not site.db.exists(), "the state must live in etcd, not in a SQLite file"
    keys = raw_range(etcd_server, prefix)
    assert any(k.startswith(b"r/data:") for k in keys), sorted(keys)[:5]
    assert b"first-token" not in b"".join(keys.values()), "etcd must only see sealed records"

    # a new data directory that holds only the key file (the simulation KEK): the state is in etcd
    kek = site.kek_file.read_bytes()
    shutil.rmtree(site.seal_dir)
    site.seal_dir.mkdir()
    site.kek_file.write_bytes(kek)
    site.kek_file.chmod(0o600)
    second = CoordinatorProcess(site, "2", *store, "--allow-rollback")  # the anchor went with the old dir
    try:
        assert cli(site, "status", site.client_addr, *pin(site)).stdout == f"3: {STATUS_3}\n"
        assert read_token(site, admin) == b"first-token"
        after = run_marble(site, "worker", "uuid-a")
        for var in ("MK_SEAL_KEY", "MK_OWN_KEY", "MK_TOKEN"):
            assert after[var] == before[var]
        refused = marble(site, "limited", "uuid-l3")
        assert refused.returncode != 0, "the activation counter must survive on etcd"
    finally:
        second.stop()


def test_etcd_outage_is_503_and_the_coordinator_recovers_on_its_own(tmp_path: Path) -> None:
    member = EtcdMember(tmp_path / "etcd").start()
    site = Site(tmp_path / "site")
    admin = make_user(site, "admin")
    manifest_file = site.path("manifest.json")
    manifest_file.write_text(json.dumps(manifest(admin)))
    coordinator = CoordinatorProcess(site, "1", "--store", member.url)
    try:
        cli(site, "manifest", "set", str(manifest_file), site.client_addr, "--insecure", *pin(site))
        write_token(site, admin, b"acknowledged")
        member.stop()
        status, body = secret_set_status(site, admin, b"during-outage")
        assert status == 503, body
        assert "etcd" in json.dumps(body) and "unreachable" in json.dumps(body)
        assert coordinator.proc.poll() is None, "the Coordinator must keep running without etcd"
        assert cli(site, "status", site.client_addr, *pin(site)).stdout == f"3: {STATUS_3}\n"
        member.start()
        deadline = time.monotonic() + 60
        while True:  # the Coordinator reconnects by itself
            status, body = secret_set_status(site, admin, b"after-outage")
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200, body
        assert read_token(site, admin) == b"after-outage"
    finally:
        coordinator.stop()
        member.stop()
    assert "Traceback" not in coordinator.output


def test_coordinator_started_before_etcd_waits_for_it(tmp_path: Path) -> None:
    member = EtcdMember(tmp_path / "etcd")  # ports chosen, not started yet
    site = Site(tmp_path / "site")
    coordinator = CoordinatorProcess(site, "1", "--store", member.url, wait=False)
    try:
        deadline = time.monotonic() + 30
        while "waiting for etcd" not in coordinator.output:
            assert coordinator.proc.poll() is None, coordinator.output
            assert time.monotonic() < deadline, coordinator.output
            time.sleep(0.1)
        member.start()
        coordinator.wait_started()
        assert cli(site, "status", site.client_addr, "--insecure").stdout.endswith(
            "2: Coordinator is ready to accept a manifest.\n"
        )
    finally:
        coordinator.stop()
        member.stop()
