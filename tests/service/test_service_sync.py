"""Re-reading the state after another writer's commit (replicas on a shared store): a commit that
changed only activation counts and monotonic counters is applied without rebuilding the deployment
(on etcd from the changed records alone); anything else is rebuilt from the records; both give what
a full rebuild gives."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from etcd_support import EtcdMember
from marblekeep.core.records import deployment_from_records
from marblekeep.errors import IntegrityError
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.base import Snapshot
from marblekeep.store.location import EtcdLocation

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


async def test_on_etcd_a_replica_applies_another_ones_counts_from_the_changed_records_alone(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    location = EtcdLocation(etcd_server.config())
    a = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path / "a", store=location))
    b: Coordinator | None = None
    try:
        (tmp_path / "b").mkdir(mode=0o700)  # the same KEK: no hand-over needed for this test
        shutil.copy(tmp_path / "a" / "simulation-kek.key", tmp_path / "b" / "simulation-kek.key")
        config_b = CoordinatorConfig(simulation=True, seal_dir=tmp_path / "b", store=location)
        b = await Coordinator.open(config_b)
        await a.set_manifest(MANIFEST)
        await b.sync()
        before = b.deployment
        store = b._store
        assert store is not None and before.manifest is not None
        full_reads: list[str] = []
        real_snapshot = store.snapshot

        async def counting_snapshot(prefix: str = "") -> Snapshot:
            full_reads.append(prefix)
            return await real_snapshot(prefix)

        store.snapshot = counting_snapshot  # type: ignore[method-assign]
        async with a.lock:
            await a.commit(dataclasses.replace(a.deployment, activations={"m": 4}, counters={"x": 9}))
        await b.sync()
        after = b.deployment
        assert (after.activations, after.counters) == ({"m": 4}, {"x": 9})
        assert after.manifest is before.manifest and after.secrets is before.secrets  # nothing rebuilt
        assert full_reads == []  # only the changed records were read
        # anything else is rebuilt from a full read
        async with a.lock:
            await a.commit(dataclasses.replace(a.deployment, manifest_signature=b"\x02" * 96))
        await b.sync()
        assert b.deployment.manifest_signature == b"\x02" * 96
        assert b.deployment.activations == {"m": 4}
        assert full_reads == [""]
    finally:
        if b is not None:
            await b.close()
        await a.close()
