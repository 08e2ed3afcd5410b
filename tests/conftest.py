"""Shared test fixtures.

Tests may read ``../shared`` (design docs and test vectors), which CI places beside the
checkout. Tests that need it skip with a clear reason when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testsupport import REPO_ROOT, SHARED_DIR, VECTORS_DIR, shared_path

__all__ = ["REPO_ROOT", "SHARED_DIR", "VECTORS_DIR", "shared_path"]


@pytest.fixture
def dcap_vectors() -> Path:
    return shared_path("vectors", "dcap")


@pytest.fixture
def marblerun_samples() -> Path:
    return shared_path("vectors", "marblerun-samples")
