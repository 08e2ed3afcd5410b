"""Where the interop tests find the Go binaries that tests/interop/build.sh builds, and how they run them.

- ``premain`` (our MarbleRun-style premain on google.golang.org/grpc) is required: when it is missing
  or older than its source, the test FAILS and says to run tests/interop/build.sh, unless
  ``MARBLEKEEP_SKIP_GO_INTEROP=1`` opts out (for developers without Go; CI never sets it).
- ``marblerun-premain-mock`` and ``marblerun`` (MarbleRun v1.5.2's own premain and CLI) can only be
  built where MarbleRun's source is at hand: the Go module proxy refuses the module. When they are
  missing the tests that need them are skipped, with that reason.

``MARBLEKEEP_INTEROP_BIN`` overrides the directory (default: tests/interop/bin).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gobuild import find_go, go_build
from harness import clean_env

INTEROP_DIR = Path(__file__).resolve().parent
SKIP_ENV = "MARBLEKEEP_SKIP_GO_INTEROP"
BIN_ENV = "MARBLEKEEP_INTEROP_BIN"

#: Our premain, always built by build.sh; its source directory (for the staleness check).
OUR_GO_PREMAIN = "premain"
#: MarbleRun v1.5.2's premain.PreMainMock and CLI, built only from MarbleRun's source.
GENUINE_PREMAIN = "marblerun-premain-mock"
GENUINE_CLI = "marblerun"

_SOURCES = {OUR_GO_PREMAIN: INTEROP_DIR / "premain", GENUINE_PREMAIN: INTEROP_DIR / "premain_mock"}

NOT_ON_PROXY = (
    "tests/interop/build.sh built no {name}: the Go module proxy does not serve MarbleRun v1.5.2 (HTTP "
    "403 'This module version is not available'; build.sh prints the reason); build it from git "
    "repositories of edgelesssys/marblerun and edgelesssys/ego: MARBLERUN_GIT=... EGO_GIT=... "
    "tests/interop/build.sh (tests/interop/README.md)"
)


def bin_dir() -> Path:
    return Path(os.environ.get(BIN_ENV) or INTEROP_DIR / "bin")


def _opted_out() -> bool:
    return os.environ.get(SKIP_ENV, "") not in ("", "0")


def _stale_reason(path: Path, source: Path | None) -> str | None:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return "is missing"
    if source is not None:
        newest = max(p.stat().st_mtime for p in source.iterdir() if p.is_file())
        if newest > path.stat().st_mtime:
            return f"is older than its source in {source}"
    return None


def _build_our_premain(path: Path, source: Path, hint: str) -> None:
    """Build our Go premain as build.sh does (one build at a time, so the README's plain ``pytest``
    works on a machine with Go without running build.sh first)."""
    go = find_go()
    if go is None:
        pytest.fail(f"{path} is missing and Go is not installed: {hint}", pytrace=False)
    failed = go_build(go, source, path, lambda: _stale_reason(path, source) is None)
    if failed is not None:
        pytest.fail(f"building {path} failed ({hint}):\n{failed}", pytrace=False)


def required_binary(name: str) -> Path:
    """A binary build.sh always builds: built here when missing or stale (Go needed); the test fails
    (not skips) when it cannot be built."""
    if _opted_out():
        pytest.skip(f"{SKIP_ENV} is set: the Go interop tests are skipped")
    path = bin_dir() / name
    hint = f"run tests/interop/build.sh (needs Go >= 1.22), or set {SKIP_ENV}=1 to skip the Go interop tests"
    source = _SOURCES.get(name)
    reason = _stale_reason(path, source)
    if reason is not None:
        if source is None:
            pytest.fail(f"{path} {reason}: {hint}", pytrace=False)
        _build_our_premain(path, source, hint)
        reason = _stale_reason(path, source)
        if reason is not None:
            pytest.fail(f"{path} {reason} after building it: {hint}", pytrace=False)
    return path


def genuine_binary(name: str) -> Path:
    """A MarbleRun v1.5.2 binary: skipped with the reason when build.sh could not build it."""
    if _opted_out():
        pytest.skip(f"{SKIP_ENV} is set: the Go interop tests are skipped")
    path = bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(NOT_ON_PROXY.format(name=name))
    return path


@dataclass(frozen=True)
class GoMarble:
    """How to start one Go premain as a Marble subprocess."""

    binary: Path
    mesh_addr: str
    env_names: Sequence[str]
    file_names: Sequence[str] = ()

    def env(
        self, base: Mapping[str, str], marble_type: str, uuid_file: Path, dns_names: str = "localhost"
    ) -> dict[str, str]:
        return dict(
            clean_env(base),
            EDG_MARBLE_TYPE=marble_type,
            EDG_MARBLE_COORDINATOR_ADDR=self.mesh_addr,
            EDG_MARBLE_UUID_FILE=str(uuid_file),
            EDG_MARBLE_DNS_NAMES=dns_names,
            # read by the MarbleRun PreMainMock wrapper only (it cannot see the parameters otherwise)
            MARBLEKEEP_INTEROP_ENV=",".join(self.env_names),
            MARBLEKEEP_INTEROP_FILES=",".join(self.file_names),
        )

    def start(
        self,
        cwd: Path,
        base: Mapping[str, str],
        marble_type: str,
        uuid_file: Path,
        dns_names: str = "localhost",
    ) -> subprocess.Popen[str]:
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [str(self.binary)],
            cwd=cwd,
            env=self.env(base, marble_type, uuid_file, dns_names),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(
        self,
        cwd: Path,
        base: Mapping[str, str],
        marble_type: str,
        uuid_file: Path,
        dns_names: str = "localhost",
    ) -> subprocess.CompletedProcess[str]:
        proc = self.start(cwd, base, marble_type, uuid_file, dns_names)
        return finish(proc)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Wait for a started Marble; a Marble that hangs is killed and reported."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the Marble did not finish within {timeout} s:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
