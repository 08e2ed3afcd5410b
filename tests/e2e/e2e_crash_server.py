"""Fork server for test_e2e_crash.py: starts real Coordinators quickly, many times.

``python e2e_crash_server.py SEAL_DIR CLIENT_ADDR MESH_ADDR`` imports the Coordinator once, then
for each ``run OUT`` line on stdin forks a child that runs exactly what ``marblekeep coordinator
--simulation`` runs (``configure_logging`` + ``asyncio.run(serve(config))``: HTTPS Client and
Marble APIs, the sealed SQLite state in SEAL_DIR) with stdout and stderr going to the file OUT. It
answers the child's pid, and ``done`` once the child has died (the test SIGKILLs it) and was reaped.
Forking after the imports saves ~0.5 s of interpreter start-up per Coordinator start; everything
after the fork (opening and verifying the state, TLS credentials, listeners) is a real start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from pathlib import Path

from marblekeep.api.server import serve
from marblekeep.logs import configure_logging
from marblekeep.service import CoordinatorConfig


def child(out_path: str, config: CoordinatorConfig) -> None:
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        configure_logging("text", logging.INFO)
        asyncio.run(serve(config))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def main() -> None:
    seal_dir, client_addr, mesh_addr = sys.argv[1:4]
    config = CoordinatorConfig(
        client_addr=client_addr, mesh_addr=mesh_addr, seal_dir=Path(seal_dir), simulation=True
    )
    for line in sys.stdin:
        command, out_path = line.split()
        assert command == "run"
        pid = os.fork()
        if pid == 0:
            child(out_path, config)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("done", flush=True)


if __name__ == "__main__":
    main()
