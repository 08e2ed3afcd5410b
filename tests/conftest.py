"""Shared test fixtures.

The DCAP vectors ship in the repository (tests/vectors/dcap). Only MarbleRun's sample manifests
come from the shared folder (``../shared`` beside the checkout, or ``MARBLEKEEP_SHARED_DIR``):
they are MarbleRun's files, not ours to ship, and their tests skip with a clear reason without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from testsupport import DCAP_VECTORS_DIR, REPO_ROOT, SHARED_DIR, VECTORS_DIR, shared_path

__all__ = ["DCAP_VECTORS_DIR", "REPO_ROOT", "SHARED_DIR", "VECTORS_DIR", "shared_path"]

# CI runs the property tests on a fixed set of examples (reproducible: a red CI is a real failure
# that reruns the same way); developers' runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def dcap_vectors() -> Path:
    """The repository's DCAP vectors (tests/vectors/dcap): present in every checkout."""
    return DCAP_VECTORS_DIR


@pytest.fixture
def marblerun_samples() -> Path:
    return shared_path("vectors", "marblerun-samples")
