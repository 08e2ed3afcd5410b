"""The data-directory lock: one Coordinator per sealed state.

Two Coordinators on one data directory would each confirm their own writes while
overwriting the other's (compare-and-set only protects a single commit), so a
confirmed secret or audit entry could vanish at the next restart. The first process
to open the directory takes an exclusive ``flock`` on ``<seal dir>/coordinator.lock``
and holds it for its lifetime; the kernel releases it when the process exits, even
after ``kill -9``, so a stale lock file never blocks a restart.

The lock file holds who holds the lock — process id, start time, host name and the
listen addresses, as JSON — so that the refusal names the holder. It never holds a
secret. The lock is advisory and per host: it does not protect a state on a network
file system shared by two machines (docs/operations.md, "One Coordinator per data
directory").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from marblekeep.errors import ConfigError, DataDirLocked

__all__ = ["LOCK_FILE_NAME", "DataDirLock"]

LOCK_FILE_NAME = "coordinator.lock"
_MAX_HOLDER_BYTES = 4096


def _describe_holder(raw: bytes) -> str:
    """A one-line description of the holder from the lock file's JSON (defensive: any bytes)."""
    try:
        doc = json.loads(raw[:_MAX_HOLDER_BYTES].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "an unknown process (the lock file does not name it)"
    if not isinstance(doc, dict):
        return "an unknown process (the lock file does not name it)"
    parts = []
    for label, key in (
        ("pid", "pid"),
        ("host", "host"),
        ("started", "started"),
        ("client API", "client_addr"),
    ):
        value = doc.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            parts.append(f"{label} {str(value)[:200]}")
    return ", ".join(parts) if parts else "an unknown process (the lock file does not name it)"


class DataDirLock:
    """An exclusive lock on a data directory, held until :meth:`release` (or process exit)."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE_NAME
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, holder: Mapping[str, object] | None = None) -> DataDirLock:
        """Lock ``directory`` or raise :class:`DataDirLocked` naming the process that holds it.

        ``holder`` (e.g. the listen addresses) is written into the lock file with the pid, host
        and start time. It must not contain secrets: the file is readable by the directory's owner.
        """
        path = Path(directory) / LOCK_FILE_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the data-directory lock {path}: {exc.strerror}; check that the seal "
                "directory is writable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raw = os.pread(fd, _MAX_HOLDER_BYTES, 0)
            except OSError:
                raw = b""
            os.close(fd)
            raise DataDirLocked(
                f"the data directory {directory} is in use by another Coordinator "
                f"({_describe_holder(raw)}; lock file {path}). Two Coordinators on one state would "
                "lose each other's writes: stop the other one first, or give this one its own "
                "--seal-dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"cannot lock the data directory {directory} ({path}): {exc.strerror}; use a local "
                "file system that supports flock"
            ) from None
        info: dict[str, object] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        info.update(holder or {})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info, sort_keys=True).encode() + b"\n", 0)
        except OSError:
            pass  # the lock is held; only the description of the holder is missing
        return cls(Path(directory), fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays; its content describes the last holder."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
