"""Fixtures for the governance tests: in-process Coordinators on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import RunningCoordinator, governance_manifest_bytes


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """A simulation Coordinator with the governance test manifest set (UpdateThreshold 0)."""
    rc = RunningCoordinator(tmp_path / "seal")
    try:
        rc.set_manifest(governance_manifest_bytes())
        yield rc
    finally:
        rc.stop()
