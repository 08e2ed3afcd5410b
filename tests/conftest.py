"""Shared test fixtures.

Tests may read ``../shared`` (design docs and test vectors), which CI places beside the
checkout. Tests that need it skip with a clear reason when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
VECTORS_DIR = SHARED_DIR / "vectors"


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the calling test when it is not there."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need ../shared (the vectors) beside the checkout")
    return path


@pytest.fixture
def dcap_vectors() -> Path:
    return shared_path("vectors", "dcap")


@pytest.fixture
def marblerun_samples() -> Path:
    return shared_path("vectors", "marblerun-samples")
