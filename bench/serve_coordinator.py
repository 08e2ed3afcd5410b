"""The Coordinator process of the activation benches: ``marblekeep.api.server.serve`` in simulation
mode, exactly what ``marblekeep coordinator --simulation`` runs.

    python bench/serve_coordinator.py CLIENT_ADDR,MARBLE_ADDR,STATE_DIR [--profile FILE]

It imports only what every version of marblekeep has (``serve``, ``CoordinatorConfig``,
``configure_logging``), so ``bench/activation_ab.py`` can start it with ``PYTHONPATH`` pointing at
another source tree (an earlier commit). ``--profile FILE`` runs it under cProfile, timed by the CPU
time of the event-loop thread (on a shared machine a wall-clock profile charges every preemption to
whatever was running, such as a socket send).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
from pathlib import Path

from marblekeep.api.server import serve
from marblekeep.logs import configure_logging
from marblekeep.service import CoordinatorConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("spec", metavar="CLIENT,MARBLE,DIR")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    client_addr, marble_addr, seal_dir = args.spec.split(",", 2)
    configure_logging("text")
    config = CoordinatorConfig(
        client_addr=client_addr, mesh_addr=marble_addr, seal_dir=Path(seal_dir), simulation=True
    )
    if args.profile is None:
        asyncio.run(serve(config))
        return
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        asyncio.run(serve(config))
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
