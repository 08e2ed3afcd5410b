"""Two Coordinators side by side, measured in alternating phases: is B cheaper than A per activation?

    .venv/bin/python bench/activation_ab.py --a REV:PROTOCOL --b REV:PROTOCOL
                                            [--level 16] [--rounds 6] [--seconds 3] [--clients 2]

REV is a git revision (exported with ``git archive`` into a temporary directory and run from there)
or ``.`` for the working tree; PROTOCOL is ``marblekeep`` (HTTPS + HPKE), ``marblerun`` (gRPC, grpcio
client) or ``marblerun-go`` (gRPC, grpc-go client as MarbleRun's premain: bench/goload, needs Go).
Examples: our protocol before the TLS layer against now, ``--a 259249e:marblekeep --b .:marblekeep``;
both protocols of the working tree, ``--a .:marblekeep --b .:marblerun``.

Both Coordinators (bench/serve_coordinator.py, each from its own tree) run for the whole
measurement; the phases alternate A, B, B, A, A, B, ... with the same load generator (this tree's
bench/activation.py) at concurrency ``--level``. On a machine shared with other work the rates and the
CPU seconds per activation drift from minute to minute; alternating short phases exposes A and B to
the same drift, and the medians over the rounds are compared. Printed: each phase, then for A and B
the median rate and the median server CPU per activation, and B/A for both. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation import PROTOCOL_OPS, Phase, coordinator, run_phase, set_manifest

OPS = PROTOCOL_OPS
ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    """The ``src`` directory of ``rev`` (``.``: this working tree's)."""
    if rev == ".":
        return ROOT / "src"
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def parse_side(value: str) -> tuple[str, str]:
    rev, _, protocol = value.rpartition(":")
    if not rev or protocol not in OPS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected REV:PROTOCOL with PROTOCOL one of {', '.join(OPS)}"
        )
    return rev, protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--a", type=parse_side, required=True, metavar="REV:PROTOCOL")
    parser.add_argument("--b", type=parse_side, required=True, metavar="REV:PROTOCOL")
    parser.add_argument("--level", type=int, default=16, help="concurrent Marbles N")
    parser.add_argument("--rounds", type=int, default=6, help="phases of each side")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each phase")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    args = parser.parse_args()
    sides = {"A": args.a, "B": args.b}
    results: dict[str, list[Phase]] = {"A": [], "B": []}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, (rev, _) in sides.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"marblekeep-ab-{name}-")))
            src = export(rev, tmp)
            servers[name] = stack.enter_context(coordinator(tmp, None, src))
            set_manifest(servers[name])
        print(f"A = {args.a[0]}:{args.a[1]}, B = {args.b[0]}:{args.b[1]}, N = {args.level}")
        print("round side  activations/s   p50 ms  errors  server CPU ms/activation")
        for i in range(args.rounds):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                protocol = sides[name][1]
                server = servers[name]
                ph = run_phase(
                    server, OPS[protocol], server.marble_url, args.level, args.seconds, args.clients
                )
                results[name].append(ph)
                print(
                    f"{i + 1:5d}    {name}  {ph.rate:13.0f}  {ph.p50_ms:7.1f}  {ph.errors:6d}"
                    f"  {ph.server_cpu_ms:10.2f}",
                    flush=True,
                )
    med = {
        name: (statistics.median(p.rate for p in ph), statistics.median(p.server_cpu_ms for p in ph))
        for name, ph in results.items()
    }
    print()
    for name in ("A", "B"):
        rev, protocol = sides[name]
        print(
            f"{name} {rev}:{protocol}: median {med[name][0]:.0f} activations/s,"
            f" server CPU {med[name][1]:.2f} ms"
        )
    print(
        f"B/A: rate {med['B'][0] / med['A'][0]:.0%},"
        f" server CPU per activation {med['B'][1] / med['A'][1]:.0%}"
    )


if __name__ == "__main__":
    main()
