"""Fixtures for the API tests: in-process Coordinators on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import RunningCoordinator


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """A fresh simulation Coordinator accepting a manifest (state 2)."""
    with RunningCoordinator(tmp_path / "seal") as running:
        yield running


@pytest.fixture
def deployed(coordinator: RunningCoordinator) -> RunningCoordinator:
    """The same Coordinator after the test manifest was set (state 3)."""
    coordinator.set_manifest()
    return coordinator
