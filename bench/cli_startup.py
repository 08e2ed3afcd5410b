"""How long ``marblekeep --help`` and ``marblekeep --version`` take, as a user sees it.

Each run is a fresh process (the installed console script, or ``python -m marblekeep.cli.main``
with ``--module``), so the figure includes the interpreter's start-up and every import the command
pays for. Prints the median, the best and the worst of N runs per command, and the interpreter's
own start-up (``python -c pass``) as the floor. Never asserts on time.

    .venv/bin/python bench/cli_startup.py [-n 20] [--also "status --help"]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _command() -> list[str]:
    script = Path(sys.executable).parent / "marblekeep"
    if script.exists():
        return [str(script)]
    found = shutil.which("marblekeep")
    if found:
        return [found]
    return [sys.executable, "-m", "marblekeep.cli.main"]


def _time(argv: list[str], runs: int) -> list[float]:
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--runs", type=int, default=20, help="runs per command (default 20)")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="ARGS",
        help='another command line, e.g. "status --help"',
    )
    args = parser.parse_args()
    base = _command()
    cases = [("python -c pass (floor)", [sys.executable, "-c", "pass"])]
    cases += [(f"marblekeep {a}", [*base, *a.split()]) for a in ("--help", "--version", *args.also)]
    print(f"{args.runs} runs each, wall-clock per process ({' '.join(base)})")
    for label, argv in cases:
        _time(argv, 2)  # warm the page cache
        times = _time(argv, args.runs)
        print(
            f"  {label:32s} median {statistics.median(times) * 1000:7.1f} ms"
            f"   best {min(times) * 1000:7.1f} ms   worst {max(times) * 1000:7.1f} ms"
        )


if __name__ == "__main__":
    main()
