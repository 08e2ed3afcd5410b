"""High availability on etcd (issue 10): activations with one and two replicas, CPU and secret writes.

    .venv/bin/python bench/ha.py [--seconds 4] [--rounds 5] [--concurrency 32] [--clients 2]
                                 [--iterations 100] [--records 10000] [--control]

Starts a real etcd member (Debian's ``etcd``) on free loopback ports in a temporary directory, then
in one run measures:

1. activations/s over HTTPS (bench/activation.py's premain-like load: new TLS connection,
   challenge, simulation evidence, activate, open the sealed Parameters) against
   ``marblekeep coordinator --simulation`` subprocesses: on SQLite; one replica on etcd; and two
   replicas behind the same etcd with the load split evenly. The Marble has ``MaxActivations``
   (one billion), so every activation commits its counter: the store is on the path, and with
   two replicas they contend for the same counter (compare-and-set, re-read, decide again).
   All servers run for the whole measurement and the configurations are measured **in turns**:
   ``--rounds`` rounds of ``--seconds`` each, the order rotated every round, so that load from
   other work on the machine falls on all of them alike. Each line is the mean over the rounds
   (CPU per activation over all of them); the rounds are printed too. ``--control`` adds two
   *separate* deployments on the same etcd (no shared state) with the load split the same way:
   what splitting the load over two processes costs, apart from anything replicas do together.
2. server CPU per activation (user + system time of the Coordinator processes, from /proc) on
   etcd against SQLite, same load; etcd's own CPU is printed beside it.
3. the p50 of one ``Coordinator.write_secrets`` (as in bench/state.py) on etcd against SQLite, at 0
   and at ``--records`` stored secrets;
4. the p50 of one replica taking another replica's counts-only commit (``Coordinator.sync``: what
   each counted activation on one replica costs the others) at 0 and ``--records`` secrets.

Targets (issue 10): two replicas >= one replica in activations/s on these 2 shared cores; server CPU
per activation on etcd <= 1.3x SQLite; a secret write on etcd p50 < 20 ms at 10,000 secrets.
Nothing asserts on time; the figures are printed with the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from activation import Phase, Server, free_port, run_phase, supervised  # the premain-like load generator
from state import _body, _manifest, percentile

from core import MANIFEST
from etcd_support import EtcdMember  # starts a real etcd on free loopback ports
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.etcd import EtcdConfig, EtcdEndpoint
from marblekeep.store.location import EtcdLocation, SQLiteLocation, StoreLocation

COUNTED = copy.deepcopy(MANIFEST)
COUNTED["Marbles"]["app"]["MaxActivations"] = 1_000_000_000


def marblekeep_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("marblekeep")
    return [str(beside)] if beside.exists() else ["marblekeep"]


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Group(Server):
    """Several Coordinator replicas measured as one server (CPU summed; the load split over them)."""

    def __init__(self, servers: list[Server]) -> None:
        first = servers[0]
        super().__init__(first.proc, first.client_url, first.marble_url, first.log_path, first.root_pem_path)
        self.servers = servers

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(s.proc.pid) for s in self.servers)


@contextlib.contextmanager
def replica(workdir: Path, name: str, store: str | None, kek: Path | None = None) -> Iterator[Server]:
    client_port, marble_port = free_port(), free_port()
    seal_dir = workdir / name
    seal_dir.mkdir(parents=True, exist_ok=True)
    if kek is not None:  # the same simulation KEK: no hand-over in the measurement
        (seal_dir / "simulation-kek.key").write_bytes(kek.read_bytes())
        (seal_dir / "simulation-kek.key").chmod(0o600)
    log_path = workdir / f"{name}.log"
    argv = [*marblekeep_cmd(), "coordinator", "--simulation", "--seal-dir", str(seal_dir)]
    argv += ["--client-addr", f"127.0.0.1:{client_port}", "--mesh-addr", f"127.0.0.1:{marble_port}"]
    if store:
        argv += ["--store", store]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    root_pem = workdir / f"{name}-root.pem"  # MarbleRun-protocol loads pin it; ours ignores it
    root_pem.write_bytes(b"")
    server = Server(
        proc, f"https://127.0.0.1:{client_port}", f"https://127.0.0.1:{marble_port}", log_path, root_pem
    )
    with supervised(proc, log_path, f"replica {name}", stop_timeout=20):
        yield server


def set_manifest(server: Server, manifest: dict[str, object]) -> None:
    body = {"manifest": base64.b64encode(json.dumps(manifest).encode()).decode()}
    response = httpx.post(f"{server.client_url}/api/v2/manifest", json=body, verify=False, timeout=30)
    if response.status_code != 200:
        raise SystemExit(f"setting the manifest failed: {response.status_code} {response.text}")


def wait_state_3(server: Server) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.client_url}/api/v2/status", verify=False).json()["data"]["code"] != 3:
        if time.monotonic() > deadline:
            raise SystemExit("the second replica did not follow the manifest")
        time.sleep(0.1)


def split_phase(servers: list[Server], seconds: float, concurrency: int, clients: int) -> Phase:
    """The load split evenly over the replicas (each gets its own load generators)."""
    if len(servers) == 1:
        return run_phase(servers[0], "activation", servers[0].marble_url, concurrency, seconds, clients)
    group = Group(servers)
    cpu0 = group.cpu_seconds()
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        futures = [
            pool.submit(
                run_phase,
                s,
                "activation",
                s.marble_url,
                concurrency // len(servers),
                seconds,
                max(1, clients // len(servers)),
            )
            for s in servers
        ]
        phases = [f.result() for f in futures]
    cpu1 = group.cpu_seconds()
    count = sum(p.count for p in phases)
    return Phase(
        label="activation",
        concurrency=concurrency,
        rate=sum(p.rate for p in phases),
        p50_ms=statistics.median([p.p50_ms for p in phases]),
        p99_ms=max(p.p99_ms for p in phases),
        count=count,
        errors=sum(p.errors for p in phases),
        server_cpu_ms=(cpu1 - cpu0) * 1e3 / max(count, 1),
        client_cpu_ms=statistics.fmean(p.client_cpu_ms for p in phases),
        first_error=next((p.first_error for p in phases if p.first_error), ""),
    )


def report(label: str, phase: Phase, etcd_cpu_ms: float | None = None) -> None:
    extra = "" if etcd_cpu_ms is None else f"  etcd CPU {etcd_cpu_ms:.2f} ms"
    print(
        f"{label:<28} {phase.rate:8.0f}/s  p50 {phase.p50_ms:6.1f} ms  p99 {phase.p99_ms:6.1f} ms  "
        f"server CPU {phase.server_cpu_ms:5.2f} ms/activation{extra}  errors {phase.errors}",
        flush=True,
    )
    if phase.first_error:
        print(f"    first error: {phase.first_error}")


async def write_p50(store: StoreLocation, seal_dir: Path, secrets: int, iterations: int) -> float:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=seal_dir, store=store))
    try:
        await coord.set_manifest(_manifest(secrets))
        names = [f"user-{i:06d}" for i in range(secrets)]
        for start in range(0, len(names), 1000):
            await coord.write_secrets("admin", _body(names[start : start + 1000]))
        samples = []
        for _ in range(iterations):
            body = _body(["bench"])
            started = time.perf_counter()
            await coord.write_secrets("admin", body)
            samples.append((time.perf_counter() - started) * 1000)
        return percentile(samples, 50)
    finally:
        await coord.close()


async def follow_p50(store: StoreLocation, seal_dir: Path, secrets: int, iterations: int) -> float:
    """p50 of one replica taking another replica's counts-only commit (``Coordinator.sync``) on a
    state of ``secrets`` secrets: what every counted activation elsewhere costs a follower."""
    def config(name: str) -> CoordinatorConfig:
        return CoordinatorConfig(simulation=True, seal_dir=seal_dir / name, store=store)

    first = await Coordinator.open(config("a"))
    second: Coordinator | None = None
    try:
        (seal_dir / "b").mkdir(mode=0o700)  # the same KEK: no hand-over in the measurement
        shutil.copy(seal_dir / "a" / "simulation-kek.key", seal_dir / "b" / "simulation-kek.key")
        second = await Coordinator.open(config("b"))
        await first.set_manifest(_manifest(secrets))
        names = [f"user-{i:06d}" for i in range(secrets)]
        for start in range(0, len(names), 1000):
            await first.write_secrets("admin", _body(names[start : start + 1000]))
        await second.sync()
        if second.follower is not None:
            await second.follower.stop()  # the measurement syncs by hand
        samples = []
        for n in range(iterations):
            async with first.lock:
                await first.commit(dataclasses.replace(first.deployment, activations={"bench": n + 1}))
            started = time.perf_counter()
            await second.sync()
            samples.append((time.perf_counter() - started) * 1000)
        assert second.deployment.activations == {"bench": iterations}
        return percentile(samples, 50)
    finally:
        if second is not None:
            await second.close()
        await first.close()


def mean_phase(label: str, phases: list[Phase]) -> Phase:
    """Rounds of one configuration as one line: mean rate, median p50, CPU over all activations."""
    count = sum(p.count for p in phases)
    return Phase(
        label=label,
        concurrency=phases[0].concurrency,
        rate=statistics.fmean(p.rate for p in phases),
        p50_ms=statistics.median(p.p50_ms for p in phases),
        p99_ms=max(p.p99_ms for p in phases),
        count=count,
        errors=sum(p.errors for p in phases),
        server_cpu_ms=sum(p.server_cpu_ms * p.count for p in phases) / max(count, 1),
        client_cpu_ms=sum(p.client_cpu_ms * p.count for p in phases) / max(count, 1),
        first_error=next((p.first_error for p in phases if p.first_error), ""),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="one measurement of one configuration")
    parser.add_argument("--rounds", type=int, default=5, help="turns over all configurations")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes in all")
    parser.add_argument("--iterations", type=int, default=100, help="secret writes per measurement")
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument(
        "--control", action="store_true", help="also measure two separate deployments (no shared state)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"machine: {os.cpu_count()} CPU(s) shared by etcd, the Coordinator replica(s) and "
        f"{args.clients} load-generator process(es); N = {args.concurrency} concurrent Marbles; the Marble "
        f"has MaxActivations, so every activation commits its counter; {args.rounds} round(s) of "
        f"{args.seconds:g} s per configuration, in turns"
    )
    sqlite_label, one_label, two_label = "SQLite, 1 process", "etcd, 1 replica", "etcd, 2 replicas"
    control_label = "etcd, 2 separate deployments"
    with tempfile.TemporaryDirectory(prefix="marblekeep-ha-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        etcd = EtcdMember(work / "etcd").start()
        stack.callback(etcd.stop)
        servers = stack.enter_context(contextlib.ExitStack())
        url = f"etcd://127.0.0.1:{etcd.client_port}"
        assert etcd.proc is not None
        etcd_pid = etcd.proc.pid
        sqlite = servers.enter_context(replica(work / "sqlite", "r1", None))
        one = servers.enter_context(replica(work / "one", "r1", url + "/one"))
        first = servers.enter_context(replica(work / "two", "r1", url + "/two"))
        kek = work / "two" / "r1" / "simulation-kek.key"
        second = servers.enter_context(replica(work / "two", "r2", url + "/two", kek=kek))
        configs: dict[str, list[Server]] = {
            sqlite_label: [sqlite],
            one_label: [one],
            two_label: [first, second],
        }
        if args.control:
            separate = servers.enter_context(replica(work / "separate", "r1", url + "/separate"))
            configs[control_label] = [one, separate]
        for server in (sqlite, one, first, *configs.get(control_label, [])[1:]):
            set_manifest(server, COUNTED)
        wait_state_3(second)
        rounds: dict[str, list[Phase]] = {label: [] for label in configs}
        etcd_ms: dict[str, float] = dict.fromkeys(configs, 0.0)
        labels = list(configs)
        for n in range(args.rounds):
            order = labels[n % len(labels) :] + labels[: n % len(labels)]
            for label in order:
                e0 = proc_cpu(etcd_pid)
                phase = split_phase(configs[label], args.seconds, args.concurrency, args.clients)
                etcd_ms[label] += (proc_cpu(etcd_pid) - e0) * 1e3
                rounds[label].append(phase)
            print(
                f"  round {n + 1}: "
                + ", ".join(f"{label} {rounds[label][-1].rate:.0f}/s" for label in labels),
                flush=True,
            )
        results = {label: mean_phase(label, phases) for label, phases in rounds.items()}
        for label in labels:
            etcd_cpu = None if label == sqlite_label else etcd_ms[label] / max(results[label].count, 1)
            report(label, results[label], etcd_cpu)
        servers.close()  # the secret writes run alone

        logging.disable(logging.WARNING)
        config = EtcdConfig((EtcdEndpoint("127.0.0.1", etcd.client_port),), prefix="/writes/")
        writes: dict[tuple[str, int], float] = {}
        for n in (0, args.records):
            writes[("sqlite", n)] = asyncio.run(
                write_p50(SQLiteLocation(), work / f"w-sqlite-{n}", n, args.iterations)
            )
            etcd_loc = EtcdLocation(EtcdConfig(config.endpoints, prefix=f"/writes-{n}/"))
            writes[("etcd", n)] = asyncio.run(write_p50(etcd_loc, work / f"w-etcd-{n}", n, args.iterations))
            follow_loc = EtcdLocation(EtcdConfig(config.endpoints, prefix=f"/follow-{n}/"))
            writes[("follow", n)] = asyncio.run(
                follow_p50(follow_loc, work / f"follow-{n}", n, args.iterations)
            )
        one_etcd_cpu = etcd_ms[one_label] / max(results[one_label].count, 1)
        two_etcd_cpu = etcd_ms[two_label] / max(results[two_label].count, 1)

    print()
    print(f"Coordinator.write_secrets of one secret, p50 of {args.iterations}:")
    for n in (0, args.records):
        print(
            f"  {n:>6} secrets: SQLite {writes[('sqlite', n)]:6.2f} ms   etcd {writes[('etcd', n)]:6.2f} ms"
        )
    print(f"a replica taking another one's counts-only commit (etcd), p50 of {args.iterations}:")
    for n in (0, args.records):
        print(f"  {n:>6} secrets: {writes[('follow', n)]:6.2f} ms")
    print()
    one, two, sqlite_phase = results[one_label], results[two_label], results[sqlite_label]
    won = sum(t.rate >= o.rate for t, o in zip(rounds[two_label], rounds[one_label], strict=True))
    cpu_ratio = one.server_cpu_ms / sqlite_phase.server_cpu_ms
    verdict = {True: "met", False: "MISSED"}
    print(
        f"two replicas >= one: {two.rate:.0f}/s vs {one.rate:.0f}/s ({verdict[two.rate >= one.rate]}; "
        f"two replicas ahead in {won} of {args.rounds} round(s))"
    )
    print(
        f"server CPU per activation etcd/SQLite = {cpu_ratio:.2f} "
        f"(target <= 1.3: {verdict[cpu_ratio <= 1.3]})"
    )
    p50 = writes[("etcd", args.records)]
    print(
        f"secret write on etcd at {args.records} secrets p50 = {p50:.2f} ms "
        f"(target < 20: {verdict[p50 < 20]})"
    )
    per_core = 1000 / one.server_cpu_ms if one.server_cpu_ms else 0
    # etcd's CPU per activation grows with the replicas (each commits its own groups and reads the
    # others' commits): about (two replicas' figure / 2) x k with k replicas
    per_replica_etcd = two_etcd_cpu / 2
    k_max = (1000 / (per_replica_etcd * per_core)) ** 0.5 if per_replica_etcd and per_core else 0
    print(
        f"projection: one replica needs {one.server_cpu_ms:.2f} ms CPU per activation (~{per_core:.0f}/s per "
        f"core it has to itself); etcd {one_etcd_cpu:.2f} ms per activation with one replica, "
        f"{two_etcd_cpu:.2f} ms with two (~{per_replica_etcd:.2f} ms x k with k replicas); with k replicas "
        f"on their own cores the rate grows ~k x {per_core:.0f}/s until one etcd core is busy at "
        f"k ~ {k_max:.1f} (~{k_max * per_core:.0f} counted activations/s; more with larger groups or "
        "faster disks, less with slower ones)"
    )
    print(f"(whole run {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
