"""The data-directory lock (issue 11, finding 1): exclusive, names its holder, released on close."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marblekeep.errors import DataDirLocked
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.lock import LOCK_FILE_NAME, DataDirLock

HOLD = """
import sys, time
from pathlib import Path
from marblekeep.store.lock import DataDirLock
lock = DataDirLock.acquire(Path(sys.argv[1]), {"client_addr": "127.0.0.1:4433"})
print("locked", flush=True)
sys.stdin.read()
"""


def test_the_lock_is_exclusive_between_processes_and_names_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(DataDirLocked) as refused:
            DataDirLock.acquire(tmp_path)
        message = refused.value.message
        assert f"pid {holder.pid}" in message and "127.0.0.1:4433" in message and "--seal-dir" in message
        assert refused.value.exit_code != 0
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    lock = DataDirLock.acquire(tmp_path)  # the holder exited: free again
    assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    lock.release()  # idempotent


def test_a_garbage_lock_file_does_not_block_and_is_rewritten(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE_NAME).write_bytes(b"\xff\x00 not json" * 1000)
    lock = DataDirLock.acquire(tmp_path, {"client_addr": "x"})
    try:
        assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["client_addr"] == "x"
    finally:
        lock.release()


async def test_a_second_coordinator_object_on_one_directory_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    config = CoordinatorConfig(seal_dir=tmp_path / "seal", simulation=True)
    first = await Coordinator.open(config)
    try:
        # flock locks belong to the open file: a second open in the same process is refused too
        with pytest.raises(DataDirLocked, match="in use by another Coordinator"):
            await Coordinator.open(config)
    finally:
        await first.close()
    second = await Coordinator.open(config)
    await second.close()
    await asyncio.sleep(0)
