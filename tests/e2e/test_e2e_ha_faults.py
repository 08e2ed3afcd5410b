"""Faults with real processes: two replicas on a three-member etcd cluster on loopback, under load.

Two ``marblekeep coordinator --simulation --store etcd://m0,m1,m2/PREFIX`` replicas (same simulation
KEK, own data directories) take concurrent activations of a ``MaxActivations`` Marble and secret
uploads, one writer thread per replica. Then, while the load runs:

1. replica A is killed with SIGKILL;
2. the etcd member both replicas talk to first is killed with SIGKILL.

Replica B must keep serving (successes after both kills), and in the end every write any replica
acknowledged is present: each secret holds its last acknowledged value (or a later one whose answer
was lost), the activation counter is at least the acknowledged activations and at most that plus the
ones whose answer was lost. Replica A is started again and serves the same values.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2e_state_support import CoordinatorProcess, Site, make_user

from etcd_support import EtcdCluster, unique_prefix
from harness import simulation_activation_request, writer_manifest_doc
from marblekeep.core.records import deployment_from_records
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    encode_activation_request,
    parse_challenge_response,
)
from marblekeep.store import Opened, SimulationKeyFileProvider, open_sealed_store
from marblekeep.store.etcd import EtcdStore

pytestmark = pytest.mark.slow

COUNTED = "counted"
SECRETS = {"a": ("a0", "a1"), "b": ("b0", "b1")}


def manifest(admin_pem: str) -> dict[str, object]:
    return writer_manifest_doc(admin_pem, COUNTED, [n for pair in SECRETS.values() for n in pair])


@dataclass
class Ledger:
    """One writer's acknowledged writes and the writes whose answer never came (may have landed)."""

    activations: int = 0
    uncertain_activations: int = 0
    secrets: dict[str, bytes] = field(default_factory=dict)
    uncertain: dict[str, list[bytes]] = field(default_factory=dict)
    successes: list[float] = field(default_factory=list)  # monotonic times of acknowledged writes
    failure: str = ""  # an unexpected answer (the writer stops)


def user_tls(site: Site) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(site.pin))
    ctx.check_hostname = False
    ctx.load_cert_chain(site.path("admin.crt"), site.path("admin.key"))
    return ctx


def activate(mesh: httpx.Client) -> httpx.Response:
    nonce = parse_challenge_response(mesh.post(CHALLENGE_PATH, content=b"{}").content)
    request = simulation_activation_request(COUNTED, nonce)
    return mesh.post(ACTIVATE_PATH, content=encode_activation_request(request))


def writer(site: Site, names: tuple[str, ...], ledger: Ledger, stop: threading.Event) -> None:
    try:
        _write(site, names, ledger, stop)
    except Exception as exc:  # reported by the test, not lost in the thread
        ledger.failure = f"{type(exc).__name__}: {exc}"


def _write(site: Site, names: tuple[str, ...], ledger: Ledger, stop: threading.Event) -> None:
    n = 0
    with (
        httpx.Client(base_url=f"https://{site.client_addr}", verify=user_tls(site), timeout=15) as api,
        httpx.Client(base_url=f"https://{site.mesh_addr}", verify=False, timeout=15) as mesh,
    ):
        while not stop.is_set():
            n += 1
            if n % 2:
                try:
                    response = activate(mesh)
                except httpx.TransportError:
                    ledger.uncertain_activations += 1
                    return  # this replica is gone
                if response.status_code == 200:
                    ledger.activations += 1
                    ledger.successes.append(time.monotonic())
                else:
                    assert response.status_code in (409, 503), response.text
                    ledger.uncertain_activations += 1
                continue
            name = names[n // 2 % len(names)]
            value = f"{name}-{n}".encode()
            body = {"secrets": {name: {"Key": base64.b64encode(value).decode()}}}
            try:
                response = api.post("/api/v2/secrets", json=body)
            except httpx.TransportError:
                ledger.uncertain.setdefault(name, []).append(value)
                return
            if response.status_code == 200:
                ledger.secrets[name] = value
                ledger.uncertain.pop(name, None)
                ledger.successes.append(time.monotonic())
            else:
                assert response.status_code in (409, 503), response.text
                ledger.uncertain.setdefault(name, []).append(value)


def api_secrets(site: Site, names: list[str]) -> dict[str, bytes]:
    response = httpx.get(
        f"https://{site.client_addr}/api/v2/secrets",
        params=[("s", n) for n in names],
        verify=user_tls(site),
        timeout=15,
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]["secrets"]
    return {n: base64.b64decode(data[n]["Private"] or "") for n in names}


async def stored_counter(cluster: EtcdCluster, prefix: str, kek: Path, tmp: Path) -> int:
    """The activation counter as stored in etcd, read in-process with the replicas' KEK."""
    (tmp / "inspect").mkdir()
    shutil.copy(kek, tmp / "inspect" / "kek")
    alive = [m for m in cluster.members if m.proc is not None and m.proc.poll() is None]
    config = dataclasses.replace(
        cluster.config(prefix),
        endpoints=tuple(
            e for e in cluster.config(prefix).endpoints if any(m.client_port == e.port for m in alive)
        ),
    )
    inner = await EtcdStore.open(config)
    try:
        # a fresh anchor directory: this inspection never saw the state, so it may not vouch for it
        opened = await open_sealed_store(
            inner, SimulationKeyFileProvider(tmp / "inspect" / "kek"), allow_rollback=True
        )
        assert isinstance(opened, Opened)
        dep = deployment_from_records(await opened.store.list(""))
        assert dep is not None
        return dep.activations.get(COUNTED, 0)
    finally:
        await inner.close()


async def test_replica_and_etcd_member_killed_under_load_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    prefix = unique_prefix()
    store = ("--store", cluster.url + prefix.rstrip("/"))
    a, b = Site(tmp_path / "a"), Site(tmp_path / "b")
    admin = make_user(a, "admin")
    for name in ("admin.crt", "admin.key"):
        shutil.copy(a.path(name), b.path(name))
    replica_a = CoordinatorProcess(a, "1", *store)
    replica_b: CoordinatorProcess | None = None
    ledgers = {"a": Ledger(), "b": Ledger()}
    stops = {"a": threading.Event(), "b": threading.Event()}
    threads: list[threading.Thread] = []
    try:
        b.seal_dir.mkdir()
        shutil.copy(a.kek_file, b.kek_file)
        replica_b = CoordinatorProcess(b, "1", *store)
        raw = json.dumps(manifest(admin.cert_pem)).encode()
        response = httpx.post(
            f"https://{a.client_addr}/api/v2/manifest",
            json={"manifest": base64.b64encode(raw).decode()},
            verify=False,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        root = httpx.get(f"https://{a.client_addr}/api/v2/quote", verify=False, timeout=10).json()["data"][
            "cert"
        ]
        for site in (a, b):
            site.pin.write_text(root)
        deadline = time.monotonic() + 30
        while httpx.get(f"https://{b.client_addr}/api/v2/status", verify=False).json()["data"]["code"] != 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        for key, site in (("a", a), ("b", b)):
            t = threading.Thread(
                target=writer, args=(site, SECRETS[key], ledgers[key], stops[key]), daemon=True
            )
            t.start()
            threads.append(t)
        time.sleep(2.0)
        replica_a.kill()  # kill -9 of a replica under load
        time.sleep(0.5)
        cluster.members[0].kill()  # kill -9 of the etcd member the replicas talk to first
        killed_at = time.monotonic()

        def after_kills() -> int:
            return len([t for t in ledgers["b"].successes if t > killed_at])

        deadline = killed_at + 90  # etcd elects a new leader; the replica fails over to the next member
        while after_kills() < 20 and time.monotonic() < deadline and threads[1].is_alive():
            time.sleep(0.1)
        stops["b"].set()
        for t in threads:
            t.join(timeout=60)
        assert not ledgers["a"].failure and not ledgers["b"].failure, ledgers
        assert after_kills() >= 20, "replica B stopped serving after a member of etcd was killed"
        assert ledgers["a"].activations + len(ledgers["a"].secrets) > 0, "replica A served nothing"

        # every acknowledged secret is there, through the surviving replica
        names = [n for pair in SECRETS.values() for n in pair]
        served = api_secrets(b, names)
        for key, ledger in ledgers.items():
            for name in SECRETS[key]:
                allowed = [ledger.secrets.get(name, b""), *ledger.uncertain.get(name, [])]
                assert served[name] in allowed, f"{name}: {served[name]!r} not in {allowed!r}"
        acknowledged = sum(led.activations for led in ledgers.values())
        uncertain = sum(led.uncertain_activations for led in ledgers.values())
        counter = await stored_counter(cluster, prefix, a.kek_file, tmp_path)
        assert acknowledged <= counter <= acknowledged + uncertain, (counter, acknowledged, uncertain)

        # the killed replica rejoins and serves the same values
        replica_a = CoordinatorProcess(a, "2", *store)
        assert api_secrets(a, names) == served
    finally:
        for stop in stops.values():
            stop.set()
        replica_a.stop()
        if replica_b is not None:
            replica_b.stop()
        cluster.stop()
