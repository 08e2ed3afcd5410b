"""Re-reading the state after another writer's commit (replicas on a shared store): a commit that
changed only activation counts and monotonic counters is applied without rebuilding the deployment;
anything else is rebuilt from the records; both give what a full rebuild gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marblekeep.core.records import deployment_from_records
from marblekeep.errors import IntegrityError
from marblekeep.service import Coordinator, CoordinatorConfig

MANIFEST = json.dumps(
    {
        "Packages": {"p": {"Debug": True, "SignerID": "00", "ProductID": 1, "SecurityVersion": 1}},
        "Marbles": {"m": {"Package": "p", "MaxActivations": 10}},
        "Secrets": {"k": {"Type": "symmetric-key", "Size": 128, "Shared": True}},
    }
).encode()


async def _other_writer_commits(coord: Coordinator, changes: dict[str, bytes | None]) -> None:
    """What another replica's commit looks like to this one: the store moved past its view."""
    store = coord._store
    assert store is not None
    await store.commit(changes, expected_revision=await store.revision())


async def test_a_counts_only_commit_is_applied_without_a_rebuild(tmp_path: Path) -> None:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path))
    try:
        await coord.set_manifest(MANIFEST)
        before = coord.deployment
        counter = (7).to_bytes(8, "little")
        await _other_writer_commits(coord, {"activations:m": b"3", "monotonicCounter:x": counter})
        await coord.sync()
        after = coord.deployment
        assert after.activations == {"m": 3}
        assert after.counters == {"x": 7}
        assert after.manifest is before.manifest and after.ca is before.ca  # nothing re-parsed
        store = coord._store
        assert store is not None
        rebuilt = deployment_from_records((await store.snapshot("")).records)
        assert rebuilt is not None
        assert (rebuilt.activations, rebuilt.counters) == (after.activations, after.counters)
        assert rebuilt.secrets == after.secrets and rebuilt.update_log == after.update_log
    finally:
        await coord.close()


async def test_any_other_change_is_rebuilt_from_the_records(tmp_path: Path) -> None:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path))
    try:
        await coord.set_manifest(MANIFEST)
        before = coord.deployment
        await _other_writer_commits(coord, {"activations:m": b"1", "manifestSignature": b"\x01" * 96})
        await coord.sync()
        after = coord.deployment
        assert after.activations == {"m": 1}
        assert after.manifest_signature == b"\x01" * 96
        assert after.manifest is not before.manifest  # rebuilt from the records
    finally:
        await coord.close()


async def test_a_malformed_count_is_refused_like_a_full_rebuild(tmp_path: Path) -> None:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path))
    try:
        await coord.set_manifest(MANIFEST)
        await _other_writer_commits(coord, {"activations:m": b"not-hex"})
        with pytest.raises(IntegrityError, match="activations:m"):
            await coord.sync()
    finally:
        await coord.close()
