"""The attested key hand-over (issue 10 step 4): what one exchange and one join cost.

    .venv/bin/python bench/handover.py [--iterations 200] [--records 10000]

Measures, in one process:

1. one exchange, server and client together (``answer_join`` and ``HandoverClient``'s request
   building, answer check and HPKE opening), in simulation: the protocol's own CPU cost without
   TEE quotes (on SGX each side adds one quote and one DCAP verification, measured by
   bench/attestation.py);
2. the joiner's ``open_sealed_store`` with the handed-over key on a SQLite state of ``--records``
   secrets (verifies every record, stores its own entry): the part of a join that grows with the
   state.

Nothing asserts on time; the figures are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from marblekeep.handover import HandoverClient, Identity, answer_join
from marblekeep.service import NoQuoteVerifier, utcnow
from marblekeep.store import SimulationKeyFileProvider, SQLiteStore, open_sealed_store
from marblekeep.store.sealed import HandoverFloor, Opened


class _Source:
    def __init__(self) -> None:
        self.key, self.store_id = os.urandom(32), os.urandom(16)

    def handover_material(self) -> tuple[bytes, bytes, int, str]:
        return self.key, self.store_id, 7, "ProductKey"


class _Members:
    async def members(self, limit: int = 64) -> dict[str, bytes]:
        return {"server": json.dumps({"address": "127.0.0.1:1"}).encode()}


async def exchange(iterations: int) -> list[float]:
    identity = Identity(True, None, NoQuoteVerifier(), utcnow)
    source = _Source()

    async def post(address: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        data = await answer_join(body, source, identity, "bench")
        return 200, json.dumps({"status": "success", "data": data}).encode()

    client = HandoverClient(_Members(), identity, "joiner", wait=0, post=post)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        await client._ask("server", "127.0.0.1:1")
        times.append(time.perf_counter() - start)
    return times


async def join_open(records: int, work: Path) -> float:
    db = work / "state.db"
    a = SimulationKeyFileProvider(work / "a.key")
    b = SimulationKeyFileProvider(work / "b.key")
    opened = await open_sealed_store(await SQLiteStore.open(db), a)
    assert isinstance(opened, Opened)
    store = opened.store
    batch = 1000
    for first in range(0, max(records, 1), batch):
        writes: dict[str, bytes | None] = {
            f"secret:s{i:06d}": os.urandom(64) for i in range(first, min(first + batch, records))
        }
        await store.commit(writes or {"secret:none": b"x"}, expected_revision=await store.revision())
    dkek = store.deployment_kek_for_handover()
    assert dkek is not None
    floor = HandoverFloor(store.store_id, store.epoch)
    await store.close()
    start = time.perf_counter()
    joined = await open_sealed_store(await SQLiteStore.open(db), b, deployment_kek=dkek, handover=floor)
    elapsed = time.perf_counter() - start
    assert isinstance(joined, Opened)
    await joined.store.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--records", type=int, default=10000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    times = asyncio.run(exchange(args.iterations))
    print(
        f"one hand-over exchange (simulation, server + client, no quotes), {args.iterations} runs: "
        f"p50 {statistics.median(times) * 1000:.2f} ms  max {max(times) * 1000:.2f} ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for records in (0, args.records):
            sub = Path(tmp) / str(records)
            sub.mkdir()
            elapsed = asyncio.run(join_open(records, sub))
            what = "joiner opens the state with the handed-over key"
            print(f"{what}, {records:6d} secrets: {elapsed * 1000:.1f} ms")


if __name__ == "__main__":
    main()
