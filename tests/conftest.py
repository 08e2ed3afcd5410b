"""Shared test fixtures.

The test vectors ship in the repository (tests/vectors: the DCAP quotes and MarbleRun's sample
manifests, copied from ../shared/vectors), so a fresh clone runs every test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from etcd_support import EtcdMember
from testsupport import DCAP_VECTORS_DIR, REPO_ROOT, SHARED_DIR, VECTORS_DIR

__all__ = ["DCAP_VECTORS_DIR", "REPO_ROOT", "SHARED_DIR", "VECTORS_DIR"]

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
    """MarbleRun's sample manifests (tests/vectors/marblerun-samples; README there says how MarbleRun
    judges each)."""
    return VECTORS_DIR / "marblerun-samples"


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """One real etcd member for the whole test session (tests isolate themselves by key prefix)."""
    member = EtcdMember(tmp_path_factory.mktemp("etcd") / "session").start()
    try:
        yield member
    finally:
        member.stop()
