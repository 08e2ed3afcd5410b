"""Child side of test_store_crash.py: commits random records through the sealed SQLite store forever.

Started once as a fork server (``store_crash_child.py DB KEY_FILE``): it imports
everything, then for each ``run SEED OUT`` line on stdin forks a writer whose stdout is
the file OUT, answers ``<pid>`` and, once that writer is dead and reaped, ``done``.

A writer prints (one line each, flushed): ``ready`` after open; before each commit
``try <writes>``; after ``commit`` returned ``ack``. ``<writes>`` is ``key=hex`` or
``key=-`` (delete) separated by spaces; ``try rekey`` re-keys (values unchanged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from pathlib import Path

from marblekeep.store import Opened, SimulationKeyFileProvider, SQLiteStore, open_sealed_store


async def writer(db: Path, key_file: Path, seed: int) -> None:
    result = await open_sealed_store(await SQLiteStore.open(db), SimulationKeyFileProvider(key_file))
    if not isinstance(result, Opened):
        print(f"not opened: {result.reason.message}", file=sys.stderr)
        raise SystemExit(3)
    store = result.store
    rnd = random.Random(seed)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    while True:
        if rnd.random() < 0.05:
            out.write("try rekey\n")
            out.flush()
            await store.rekey(os.urandom(32))
        else:
            writes: dict[str, bytes | None] = {}
            for _ in range(rnd.randint(1, 4)):
                key = f"secret:{rnd.randrange(64)}"
                writes[key] = None if rnd.random() < 0.15 else os.urandom(rnd.randint(1, 300))
            out.write(
                "try " + " ".join(f"{k}={'-' if v is None else v.hex()}" for k, v in writes.items()) + "\n"
            )
            out.flush()
            await store.commit(writes, expected_revision=await store.revision())
        out.write("ack\n")
        out.flush()


def serve(db: Path, key_file: Path) -> None:
    for line in sys.stdin:
        _, seed, out_path = line.split()
        pid = os.fork()
        if pid == 0:
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.close(fd)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            try:
                asyncio.run(writer(db, key_file, int(seed)))
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("done", flush=True)


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
