"""Counting activations of limited types (activations.py, step 8): the render runs outside the lock,
the claims waiting at one moment are counted in one commit, a claim is decided on the current state
(re-rendered only when more than the counts changed), and the count stays exact and durable."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import marblekeep.activations as activations_module
from etcd_support import EtcdMember
from marblekeep.errors import ActivationRefused, StoreError
from marblekeep.marble.protocol import (
    ActivationRequest,
    ChallengeBook,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
)
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.location import EtcdLocation

BOUND = 30.0  # generous bound on waiting for a condition (never a timing assertion)


def manifest(max_activations: int) -> bytes:
    return json.dumps(
        {
            "Packages": {"p": {"Debug": True, "SignerID": "00", "ProductID": 1, "SecurityVersion": 1}},
            "Marbles": {
                "m": {
                    "Package": "p",
                    "MaxActivations": max_activations,
                    "Parameters": {"Env": {"K": "{{ hex .Secrets.k }}"}},
                }
            },
            "Secrets": {"k": {"Type": "symmetric-key", "Size": 128, "Shared": True}},
        }
    ).encode()


def body(coord: Coordinator) -> bytes:
    req = ActivationRequest(
        marble_type="m",
        uuid=uuid.uuid4(),
        dns_names=("localhost",),
        hpke_public_key=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        nonce=coord.challenge(),
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    return encode_activation_request(replace(req, evidence=expected_report_data(req)))


async def open_coordinator(seal_dir: Path, max_activations: int) -> Coordinator:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=seal_dir))
    coord.challenges = ChallengeBook(b"\x01" * 32, max_used=10_000, max_used_per_source=10_000)
    if coord.deployment.manifest is None:
        await coord.set_manifest(manifest(max_activations))
    return coord


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the renders (core activate calls) of every activation."""
    calls: list[int] = []
    real: Callable[..., Any] = activations_module.activate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(activations_module, "activate", counting)
    return calls


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.005)


def waiting(coord: Coordinator) -> int:
    return len(coord.marbles._counts._waiting)


async def outcomes(tasks: list[asyncio.Task[Any]]) -> tuple[int, list[BaseException]]:
    done = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [d for d in done if isinstance(d, BaseException)]
    return len(done) - len(errors), errors


async def test_waiting_claims_are_counted_in_one_commit_and_exactly(
    tmp_path: Path, renders: list[int]
) -> None:
    coord = await open_coordinator(tmp_path / "seal", 5)
    try:
        commits = coord.marbles._counts.commits
        async with coord.lock:  # a commit in progress: every activation renders, then waits
            tasks = [asyncio.create_task(coord.activate(body(coord), f"10.0.0.{i}")) for i in range(8)]
            await until(lambda: waiting(coord) == 8)
            assert coord.deployment.activations.get("m", 0) == 0  # nothing counted before its commit
        ok, errors = await outcomes(tasks)
        assert ok == 5
        assert len(errors) == 3
        assert all(isinstance(e, ActivationRefused) and e.reason == "max_activations" for e in errors)
        assert "reached max activations count (5)" in str(errors[0])
        assert coord.marbles._counts.commits == commits + 1  # one commit for the whole group
        assert len(renders) == 8  # each rendered once
        assert coord.deployment.activations == {"m": 5}
    finally:
        await coord.close()
    reopened = await open_coordinator(tmp_path / "seal", 5)  # durable: the count survives a restart
    try:
        assert reopened.deployment.activations == {"m": 5}
        with pytest.raises(ActivationRefused, match="reached max activations count"):
            await reopened.activate(body(reopened))
    finally:
        await reopened.close()


async def _other_writer_commits(coord: Coordinator, changes: dict[str, bytes | None]) -> None:
    """Another replica's commit, as this one sees it: the store moved past its view."""
    store = coord._store
    assert store is not None
    await store.commit(changes, expected_revision=await store.revision())


async def test_a_lost_compare_and_set_on_counts_only_is_decided_again_without_rendering(
    tmp_path: Path, renders: list[int]
) -> None:
    coord = await open_coordinator(tmp_path / "seal", 3)
    try:
        before = coord.deployment
        async with coord.lock:
            tasks = [asyncio.create_task(coord.activate(body(coord), f"10.0.1.{i}")) for i in range(2)]
            await until(lambda: waiting(coord) == 2)
            await _other_writer_commits(coord, {"activations:m": b"2"})  # the other replica counted 2
        ok, errors = await outcomes(tasks)
        assert (ok, len(errors)) == (1, 1)  # decided on the fresh count: one slot was left
        assert isinstance(errors[0], ActivationRefused) and errors[0].reason == "max_activations"
        assert len(renders) == 2  # nobody rendered again
        assert coord.deployment.activations == {"m": 3}
        assert coord.deployment.manifest is before.manifest
    finally:
        await coord.close()


async def test_a_claim_rendered_on_a_state_that_changed_beyond_the_counts_is_rendered_again(
    tmp_path: Path, renders: list[int]
) -> None:
    coord = await open_coordinator(tmp_path / "seal", 3)
    try:
        async with coord.lock:
            task = asyncio.create_task(coord.activate(body(coord)))
            await until(lambda: waiting(coord) == 1)
            # another replica changed something an answer depends on (here the manifest signature)
            await _other_writer_commits(coord, {"manifestSignature": b"\x01" * 96})
        await task
        assert len(renders) == 2  # rendered again on the new state, then counted
        assert coord.deployment.activations == {"m": 1}
        assert coord.deployment.manifest_signature == b"\x01" * 96
    finally:
        await coord.close()


async def test_a_claim_whose_client_went_away_before_its_commit_takes_no_slot(tmp_path: Path) -> None:
    coord = await open_coordinator(tmp_path / "seal", 3)
    try:
        async with coord.lock:
            tasks = [asyncio.create_task(coord.activate(body(coord), f"10.0.2.{i}")) for i in range(3)]
            await until(lambda: waiting(coord) == 3)
            tasks[0].cancel()
        ok, errors = await outcomes(tasks)
        assert ok == 2 and len(errors) == 1 and isinstance(errors[0], asyncio.CancelledError)
        assert coord.deployment.activations == {"m": 2}
    finally:
        await coord.close()


async def test_a_failed_commit_fails_the_whole_group_and_counts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = await open_coordinator(tmp_path / "seal", 3)
    try:
        store = coord._store
        assert store is not None

        async def unreachable(*args: Any, **kwargs: Any) -> int:
            raise StoreError("the store is unreachable (test)")

        async with coord.lock:
            tasks = [asyncio.create_task(coord.activate(body(coord), f"10.0.3.{i}")) for i in range(2)]
            await until(lambda: waiting(coord) == 2)
            monkeypatch.setattr(store, "commit", unreachable)
        ok, errors = await outcomes(tasks)
        assert ok == 0 and all(isinstance(e, StoreError) for e in errors)
        monkeypatch.undo()
        assert coord.deployment.activations.get("m", 0) == 0
        await coord.activate(body(coord))  # the next group works
        assert coord.deployment.activations == {"m": 1}
    finally:
        await coord.close()


async def test_a_replica_takes_the_commits_its_watch_reported_before_deciding(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    """On etcd: a group decided on a view the watch already knows to be old would lose its
    compare-and-set; the replica takes the newer commits first and commits once."""
    location = EtcdLocation(etcd_server.config())
    a = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path / "a", store=location))
    b: Coordinator | None = None
    try:
        (tmp_path / "b").mkdir(mode=0o700)  # the same KEK: no hand-over needed for this test
        shutil.copy(tmp_path / "a" / "simulation-kek.key", tmp_path / "b" / "simulation-kek.key")
        config_b = CoordinatorConfig(simulation=True, seal_dir=tmp_path / "b", store=location)
        b = await Coordinator.open(config_b)
        for coord in (a, b):
            coord.challenges = ChallengeBook(b"\x01" * 32, max_used=10_000, max_used_per_source=10_000)
        await a.set_manifest(manifest(3))
        await b.sync()
        assert b.follower is not None
        await b.follower.stop()  # hold b's view back, as between a watch event and its re-read
        await a.activate(body(a))
        await a.activate(body(a))
        b.follower.seen = a._view_revision  # what the watch reported
        store = b._store
        assert store is not None
        commits: list[int] = []
        real_commit = store.commit

        async def counting_commit(writes: Any, *, expected_revision: int) -> int:
            commits.append(expected_revision)
            return await real_commit(writes, expected_revision=expected_revision)

        store.commit = counting_commit  # type: ignore[method-assign]
        await b.activate(body(b))
        assert commits == [a._view_revision]  # one commit, on the view the watch reported
        assert b.deployment.activations == {"m": 3}
        with pytest.raises(ActivationRefused, match="reached max activations count"):
            await b.activate(body(b))
    finally:
        if b is not None:
            await b.close()
        await a.close()
