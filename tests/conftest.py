"""Shared test fixtures.

Tests may read ``../shared`` (design docs and test vectors), which CI places beside the
checkout. Tests that need it skip with a clear reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from testsupport import REPO_ROOT, SHARED_DIR, VECTORS_DIR, shared_path

__all__ = ["REPO_ROOT", "SHARED_DIR", "VECTORS_DIR", "shared_path"]

# CI runs the property tests on a fixed set of examples (reproducible: a red CI is a real failure
# that reruns the same way); developers' runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def dcap_vectors() -> Path:
    return shared_path("vectors", "dcap")


@pytest.fixture
def marblerun_samples() -> Path:
    return shared_path("vectors", "marblerun-samples")
