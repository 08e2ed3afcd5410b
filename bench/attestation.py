"""Quote verification throughput: one core in-process vs. the process pool, side by side.

    .venv/bin/python bench/attestation.py [--seconds 1.5] [--workers 2] [--rounds 5] [--concurrency 64]

Verifies the real SGX quote from tests/vectors/dcap (dcap-qvl, full signature chain, TCB
evaluation) at a fixed time inside its collateral window. Rounds alternate sequential and
pool measurements so that both see the same machine load; the best round of each is
reported (the machine is shared: the best round is the least disturbed one), with the
medians beside them, then the ratio. Target: pool(2) >= 1.6x one core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import time
from pathlib import Path

from marblekeep.attestation.dcap import Collateral, QuoteVerifierPool, verify_quote

VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "dcap"
AT = dt.datetime(2025, 6, 25, tzinfo=dt.UTC)


def _worker_cpu(pool: QuoteVerifierPool) -> float:
    """CPU seconds used so far by the pool's worker processes (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for worker in pool._pool:
        try:
            fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def sequential(quote: bytes, collateral: Collateral, seconds: float) -> tuple[float, float]:
    """(verifications/s, CPU seconds per verification)."""
    done = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            verify_quote(quote, collateral, AT)
        done += 50
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start), (time.process_time() - cpu0) / done


async def pooled(
    pool: QuoteVerifierPool, quote: bytes, collateral: Collateral, seconds: float, in_flight: int = 64
) -> tuple[float, float, float]:
    """(verifications/s, worker CPU s per verification, event-loop CPU s per verification)."""
    done = 0
    cpu0, workers0 = time.process_time(), _worker_cpu(pool)
    start = time.perf_counter()
    deadline = start + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            claims = await pool.verify(quote, collateral, AT)
            assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
            done += 1

    await asyncio.gather(*(client() for _ in range(in_flight)))  # 64 concurrent activations
    rate = done / (time.perf_counter() - start)
    return rate, (_worker_cpu(pool) - workers0) / done, (time.process_time() - cpu0) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.5, help="duration of each measurement")
    parser.add_argument("--workers", type=int, default=2, help="pool worker processes")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--concurrency", type=int, default=64, help="verifications in flight (pool)")
    args = parser.parse_args()

    quote = (VECTORS / "sgx_quote").read_bytes()
    collateral = Collateral.from_json((VECTORS / "sgx_quote_collateral.json").read_bytes())
    verify_quote(quote, collateral, AT)  # warm the in-process caches

    load_before = os.getloadavg()[0]
    seq_runs: list[tuple[float, float]] = []
    pool_runs: list[tuple[float, float, float]] = []
    with QuoteVerifierPool(args.workers) as pool:
        pool.start()
        asyncio.run(pooled(pool, quote, collateral, 0.5))  # warm the workers
        for _ in range(args.rounds):
            seq_runs.append(sequential(quote, collateral, args.seconds))
            pool_runs.append(asyncio.run(pooled(pool, quote, collateral, args.seconds, args.concurrency)))
    load_after = os.getloadavg()[0]

    seq_rates = [r for r, _ in seq_runs]
    pool_rates = [r for r, _, _ in pool_runs]
    seq, par = max(seq_rates), max(pool_rates)
    print(f"dcap-qvl verify, SGX quote v3, {args.rounds} alternating rounds of {args.seconds:.1f} s")
    print(
        f"  one core, in-process : {seq:8.0f} verifications/s  ({1e3 / seq:.3f} ms each)"
        f"  rounds: {', '.join(f'{r:.0f}' for r in seq_rates)}"
    )
    print(
        f"  pool, {args.workers} workers      : {par:8.0f} verifications/s"
        f"  rounds: {', '.join(f'{r:.0f}' for r in pool_rates)}"
    )
    print(
        f"  ratio (best/best)    : {par / seq:8.2f}x   (median/median "
        f"{statistics.median(pool_rates) / statistics.median(seq_rates):.2f}x; target >= 1.6x)"
    )
    # CPU cost does not depend on what else runs on the machine: it shows what the pool would
    # reach with its cores to itself.
    seq_cpu = statistics.median(c for _, c in seq_runs)
    worker_cpu = statistics.median(w for _, w, _ in pool_runs)
    loop_cpu = statistics.median(p for _, _, p in pool_runs)
    if worker_cpu > 0:
        cores = min(args.workers, os.cpu_count() or 1)
        projected = cores * seq_cpu / (worker_cpu + loop_cpu)
        print(
            f"  CPU per verification : in-process {seq_cpu * 1e3:.3f} ms; pool {worker_cpu * 1e3:.3f} ms"
            f" (worker) + {loop_cpu * 1e3:.3f} ms (event loop) -> {projected:.2f}x on {cores} idle cores"
        )
    print(f"  load average         : {load_before:.2f} before, {load_after:.2f} after (shared machine)")


if __name__ == "__main__":
    main()
