"""Issue 11, finding 1: one Coordinator per data directory.

Two real ``marblekeep coordinator --simulation`` processes on one seal directory: the second
exits non-zero and names the first (pid, start time, address); the lock file never holds a
secret. After the first one is killed (no clean shutdown: the kernel drops the lock with the
process), a new Coordinator starts on the same directory and finds the state.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from e2e_state_support import KEK_FILE, CoordinatorProcess, Site, status_v2

from harness import CoordinatorSubprocess, free_port
from marblekeep.store.lock import LOCK_FILE_NAME


def second_coordinator(site: Site, log: Path) -> tuple[int, str]:
    """Another Coordinator (own ports) on ``site``'s seal directory; it must exit. (code, output)."""
    other = CoordinatorSubprocess(
        workdir=site.workdir,
        env=site.env,
        client_addr=f"127.0.0.1:{free_port()}",
        mesh_addr=f"127.0.0.1:{free_port()}",
        seal_dir=site.seal_dir,
        log=log,
        wait=False,
    )
    try:
        code = other.wait_exit(timeout=60)
    except subprocess.TimeoutExpired:
        other.kill()
        raise AssertionError(f"the second Coordinator kept running:\n{other.output}") from None
    return code, other.output


def test_a_second_coordinator_on_the_same_data_directory_exits_and_names_the_holder(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    first = CoordinatorProcess(site, "first")
    try:
        code, output = second_coordinator(site, site.path("second.log"))
        assert code == 2, output
        assert "in use by another Coordinator" in output and "Traceback" not in output
        assert f"pid {first.proc.pid}" in output and site.client_addr in output
        assert "started 20" in output  # the holder's start time (ISO 8601, UTC)
        assert "coordinator started" not in output
        lock_text = (site.seal_dir / LOCK_FILE_NAME).read_text()
        holder = json.loads(lock_text)
        assert holder["pid"] == first.proc.pid and holder["client_addr"] == site.client_addr
        assert set(holder) == {"pid", "host", "started", "client_addr", "mesh_addr"}
        assert (site.seal_dir / KEK_FILE).read_bytes().hex() not in lock_text
        assert status_v2(site)["code"] == 2  # the first Coordinator is unaffected
    finally:
        first.proc.send_signal(signal.SIGKILL)  # no clean release: the kernel drops the lock
        first.wait_exit()
    again = CoordinatorProcess(site, "again")
    try:
        assert status_v2(site)["code"] == 2
        assert json.loads((site.seal_dir / LOCK_FILE_NAME).read_text())["pid"] == again.proc.pid
    finally:
        assert again.stop() == 0
