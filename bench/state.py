"""Commit latency of one secret write through the sealed SQLite store, empty vs. 10,000 secrets.

Measures what the Coordinator pays to persist one user-defined secret: ``revision()`` +
``commit()`` of one ~200-byte record through the encryption barrier (AES-256-GCM, sealed
index, epoch) into SQLite (WAL, synchronous=FULL, fsync per commit), plus the rollback
anchor write (pwrite + fsync). Run:

    .venv/bin/python bench/state.py [--iterations 500] [--records 10000] [--dir DIR]

Targets (issue #4): p50 < 20 ms at 10,000 records, and < 3x the latency at 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

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
        f"p50 at {args.records} = {p50_full:.3f} ms (target < 20), "
        f"ratio to empty = {ratio:.2f} (target < 3): "
        f"{'PASS' if ok else 'FAIL'}"
    )


if __name__ == "__main__":
    asyncio.run(main())
