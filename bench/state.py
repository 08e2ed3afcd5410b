"""Commit latency of one secret write, empty vs. 10,000 secrets: at the store and at the Coordinator.

1. Store: ``revision()`` + ``commit()`` of one ~200-byte record through the encryption barrier
   (AES-256-GCM, sealed index, epoch) into SQLite (WAL, synchronous=FULL, fsync per commit), plus
   the rollback anchor write (pwrite + fsync).
2. Coordinator: ``Coordinator.write_secrets`` of one user-defined secret, as ``POST
   /api/v2/secrets`` runs it after authentication: permission check, validation, template dry run
   of every Marble, the audit-log entry, the commit of the changed records, publishing the new
   state. The deployment's manifest defines 0 or 10,000 other user-defined secrets, all set.

Run:

    .venv/bin/python bench/state.py [--iterations 500] [--records 10000] [--dir DIR]

Targets (issue #4): p50 < 20 ms at 10,000 records, and < 3x the latency at 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store import Opened, SealedStore, SimulationKeyFileProvider, SQLiteStore, open_sealed_store

VALUE_SIZE = 200  # a user-defined secret's JSON record is about this size


async def open_store(directory: Path) -> SealedStore:
    result = await open_sealed_store(
        await SQLiteStore.open(directory / "state.db"),
        SimulationKeyFileProvider(directory / "simulation-kek"),
    )
    assert isinstance(result, Opened)
    return result.store


async def measure(directory: Path, records: int, iterations: int) -> tuple[list[float], float]:
    directory.mkdir(parents=True, exist_ok=True)
    store = await open_store(directory)
    batch = 1000
    for start in range(0, records, batch):
        writes: dict[str, bytes | None] = {
            f"secret:user-{i:06d}": os.urandom(VALUE_SIZE) for i in range(start, min(records, start + batch))
        }
        await store.commit(writes, expected_revision=await store.revision())
    await store.close()
    # reopen: the measured store has verified every record, as after a Coordinator restart
    open_started = time.perf_counter()
    store = await open_store(directory)
    open_ms = (time.perf_counter() - open_started) * 1000
    samples: list[float] = []
    for i in range(iterations):
        value = os.urandom(VALUE_SIZE)
        started = time.perf_counter()
        await store.commit({f"secret:bench-{i % 50}": value}, expected_revision=await store.revision())
        samples.append((time.perf_counter() - started) * 1000)
    await store.close()
    return samples, open_ms


def _manifest(secrets: int) -> bytes:
    user_cert = _user_cert()
    defs = {f"user-{i:06d}": {"Type": "plain", "UserDefined": True} for i in range(secrets)}
    defs["bench"] = {"Type": "plain", "UserDefined": True}
    return json.dumps(
        {
            "Packages": {"p": {"Debug": True, "SignerID": "00", "ProductID": 1, "SecurityVersion": 1}},
            "Marbles": {"m": {"Package": "p", "Parameters": {"Env": {"B": "{{ string .Secrets.bench }}"}}}},
            "Secrets": defs,
            "Users": {"admin": {"Certificate": user_cert, "Roles": ["writer"]}},
            "Roles": {
                "writer": {
                    "ResourceType": "Secrets",
                    "ResourceNames": sorted(defs),
                    "Actions": ["WriteSecret"],
                }
            },
        }
    ).encode()


def _user_cert() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _body(names: list[str]) -> dict[str, dict[str, str]]:
    return {n: {"Key": base64.b64encode(os.urandom(24).hex().encode()).decode()} for n in names}


async def measure_coordinator(directory: Path, secrets: int, iterations: int) -> list[float]:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=directory))
    await coord.set_manifest(_manifest(secrets))
    names = [f"user-{i:06d}" for i in range(secrets)]
    for start in range(0, len(names), 1000):  # fill the state: every secret has a value
        await coord.write_secrets("admin", _body(names[start : start + 1000]))
    samples: list[float] = []
    for _ in range(iterations):
        body = _body(["bench"])
        started = time.perf_counter()
        await coord.write_secrets("admin", body)
        samples.append((time.perf_counter() - started) * 1000)
    await coord.close()
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create the databases (default: a temp dir)"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the simulation key file announces itself on every open

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {}
        for records in (0, args.records):
            results[records] = await measure(Path(tmp) / f"n{records}", records, args.iterations)

    print(f"sealed SQLite store, one {VALUE_SIZE}-byte secret per commit, {args.iterations} commits each")
    print(f"{'records':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'open ms':>8}")
    for records, (samples, open_ms) in results.items():
        print(
            f"{records:>10} {percentile(samples, 50):>8.3f} {percentile(samples, 99):>8.3f} "
            f"{statistics.fmean(samples):>8.3f} {open_ms:>8.1f}"
        )
    p50_empty = percentile(results[0][0], 50)
    p50_full = percentile(results[args.records][0], 50)
    ratio = p50_full / p50_empty
    ok = p50_full < 20 and ratio < 3
    print(
        f"store: p50 at {args.records} = {p50_full:.3f} ms (target < 20), "
        f"ratio to empty = {ratio:.2f} (target < 3): "
        f"{'PASS' if ok else 'FAIL'}"
    )

    coord_iterations = max(20, args.iterations // 5)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        coord_results = {
            n: await measure_coordinator(Path(tmp) / f"c{n}", n, coord_iterations) for n in (0, args.records)
        }
    print()
    print(f"Coordinator.write_secrets of one user-defined secret, {coord_iterations} writes each")
    print(f"{'secrets':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for n, samples in coord_results.items():
        print(
            f"{n:>10} {percentile(samples, 50):>8.3f} {percentile(samples, 99):>8.3f} "
            f"{statistics.fmean(samples):>8.3f}"
        )
    c_empty = percentile(coord_results[0], 50)
    c_full = percentile(coord_results[args.records], 50)
    c_ratio = c_full / c_empty
    c_ok = c_full < 20 and c_ratio < 3
    print(
        f"coordinator: p50 at {args.records} = {c_full:.3f} ms (target < 20), "
        f"ratio to empty = {c_ratio:.2f} (target < 3): {'PASS' if c_ok else 'FAIL'}"
    )


if __name__ == "__main__":
    asyncio.run(main())
