"""The manifest's SealMode decides which platform key wraps the state, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marblekeep.core.deployment import CoordinatorState
from marblekeep.manifest.model import SealMode
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import SimulationKeyFileProvider


def _manifest(seal_mode: str) -> bytes:
    return json.dumps(
        {
            "Packages": {"p": {"Debug": True, "SignerID": "00", "ProductID": 1, "SecurityVersion": 1}},
            "Marbles": {"m": {"Package": "p"}},
            "Secrets": {"k": {"Type": "symmetric-key", "Size": 128, "Shared": True}},
            "Config": {"SealMode": seal_mode},
        }
    ).encode()


def _providers(tmp_path: Path) -> dict[SealMode, SimulationKeyFileProvider]:
    return {
        SealMode.PRODUCT_KEY: SimulationKeyFileProvider(tmp_path / "product.key"),
        SealMode.UNIQUE_KEY: SimulationKeyFileProvider(tmp_path / "unique.key"),
    }


async def _open(tmp_path: Path) -> Coordinator:
    config = CoordinatorConfig(simulation=True, seal_dir=tmp_path / "seal")
    return await Coordinator.open(config, seal_providers=_providers(tmp_path))


@pytest.mark.parametrize(("mode", "needed_key"), [("UniqueKey", "unique.key"), ("ProductKey", "product.key")])
async def test_state_is_sealed_with_the_manifests_seal_mode(
    tmp_path: Path, mode: str, needed_key: str
) -> None:
    coord = await _open(tmp_path)
    await coord.set_manifest(_manifest(mode))
    value = coord.deployment.secrets["k"].private
    root = coord.deployment.ca.root.cert_der
    await coord.close()

    # Restart: the Coordinator finds the right key by itself.
    coord = await _open(tmp_path)
    assert coord.state is CoordinatorState.ACCEPTING_MARBLES
    assert coord.deployment.secrets["k"].private == value
    assert coord.deployment.ca.root.cert_der == root
    await coord.close()

    # Only the key of the manifest's mode matters: losing the other one changes nothing,
    # losing this one means recovery.
    other = "product.key" if needed_key == "unique.key" else "unique.key"
    (tmp_path / other).unlink(missing_ok=True)
    coord = await _open(tmp_path)
    assert coord.state is CoordinatorState.ACCEPTING_MARBLES
    await coord.close()
    (tmp_path / needed_key).unlink()
    coord = await _open(tmp_path)
    assert coord.state is CoordinatorState.RECOVERY
    await coord.close()
