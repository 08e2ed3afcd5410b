"""Crash safety: SIGKILL a writer at random moments; every acknowledged write must survive.

A writer process (store_crash_child.py, forked from a small fork server so that 200 runs
stay fast) commits random records through the sealed SQLite store and prints each write
before committing (``try``) and after ``commit`` returned (``ack``), flushed. The test
kills it with SIGKILL at random moments, 200 times, and after every kill reopens the
store and checks that the state is exactly the acknowledged state, or the acknowledged
state plus the whole in-flight commit (atomicity), never anything else. Kills also land
during start-up, during re-keying and between a commit and its rollback-anchor write.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marblekeep.store import Opened, SimulationKeyFileProvider, SQLiteStore, open_sealed_store

CHILD = Path(__file__).with_name("store_crash_child.py")
KILLS = 200
#: A generous bound for the writer to reach a point (only a hung writer hits it).
WAIT = 60.0


def parse_writes(line: str) -> dict[str, bytes | None]:
    writes: dict[str, bytes | None] = {}
    for item in line.split():
        key, _, value = item.partition("=")
        writes[key] = None if value == "-" else bytes.fromhex(value)
    return writes


def apply(state: dict[str, bytes], writes: dict[str, bytes | None]) -> dict[str, bytes]:
    new = dict(state)
    for key, value in writes.items():
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    return new


def wait_for(out: Path, what: str) -> None:
    """Wait until the writer's output holds ``what`` (a line), bounded only against a hung writer."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if out.exists() and what in out.read_text():
            return
        time.sleep(0.001)
    raise AssertionError(
        f"writer never printed {what!r}: {out.read_text() if out.exists() else '(no output)'}"
    )


@pytest.mark.slow
async def test_sigkill_never_loses_an_acknowledged_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="marblekeep.seal")
    db, key_file, out = tmp_path / "state.db", tmp_path / "simulation-kek", tmp_path / "writer.out"
    provider = SimulationKeyFileProvider(key_file)
    rnd = random.Random(20261127)
    state: dict[str, bytes] = {}
    acked_total = in_flight_landed = 0
    server = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), str(key_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    busy_kills = 0
    try:
        for kill in range(KILLS):
            out.unlink(missing_ok=True)
            server.stdin.write(f"run {rnd.randrange(1 << 30)} {out}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            if rnd.random() < 0.1:
                time.sleep(rnd.uniform(0.0, 0.01))  # somewhere in start-up
            else:
                # busy: the writer has acknowledged a write (an event, not a time budget), then a
                # random moment within its next writes
                wait_for(out, "\nack\n")
                busy_kills += 1
                time.sleep(rnd.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline() == "done\n"

            lines = out.read_text().split("\n")[:-1] if out.exists() else []  # drop a partial last line
            pending: dict[str, bytes | None] | None = None
            for line in lines:
                if line.startswith("try "):
                    pending = {} if line == "try rekey" else parse_writes(line[4:])
                elif line == "ack":
                    assert pending is not None
                    state = apply(state, pending)
                    pending = None
                    acked_total += 1

            result = await open_sealed_store(await SQLiteStore.open(db), provider)
            assert isinstance(result, Opened), f"kill {kill}: state did not load: {result}"
            stored = await result.store.list("")
            await result.store.close()
            if stored != state:
                assert pending is not None and stored == apply(state, pending), (
                    f"kill {kill}: state is neither the acknowledged one nor it plus the in-flight write"
                )
                state = stored
                in_flight_landed += 1
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    assert busy_kills > KILLS // 2 and acked_total >= busy_kills  # most kills hit a busy writer
    assert in_flight_landed > 0  # and some landed between commit and acknowledgement
