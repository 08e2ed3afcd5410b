"""Building the Go test clients on first use (tests/interop and bench/goload share this): where the
``go`` command is, and one ``go build`` at a time per output directory, with the flags
tests/interop/build.sh uses (no cgo, the local toolchain only, go.sum as pinned)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["find_go", "go_build"]


def find_go() -> str | None:
    """The go command: on PATH, else where the official tarball and Debian's golang-go put it."""
    found = shutil.which("go")
    if found:
        return found
    for candidate in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def go_build(go: str, source: Path, out: Path, done: Callable[[], bool]) -> str | None:
    """``go build`` the package in ``source`` into ``out``, under a lock in ``out``'s directory;
    ``done()`` is asked again under the lock (another process may have built it meanwhile).
    Returns None on success, else the end of the build's error output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done():
            return None
        tmp = out.with_name(out.name + ".tmp")
        env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-trimpath -buildvcs=false")
        built = subprocess.run(
            [go, "build", "-mod=readonly", "-o", str(tmp), "."],
            cwd=source,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if built.returncode != 0:
            tmp.unlink(missing_ok=True)
            return built.stderr.strip()[-4000:]
        tmp.replace(out)
    return None
