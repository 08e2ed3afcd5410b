"""SealMode Disabled: in memory only when the first manifest says so; never a stale state on disk."""

from __future__ import annotations

import json
from pathlib import Path

from marblekeep.core.deployment import CoordinatorState
from marblekeep.service import Coordinator, CoordinatorConfig
from testsupport import self_signed_user_cert


def _user_cert() -> str:
    return self_signed_user_cert()[0]


CERT = _user_cert()


def _manifest(seal_mode: str, secret: str) -> bytes:
    return json.dumps(
        {
            "Packages": {"p": {"Debug": True, "SignerID": "00", "ProductID": 1, "SecurityVersion": 1}},
            "Marbles": {"m": {"Package": "p"}},
            "Secrets": {secret: {"Type": "symmetric-key", "Size": 128, "Shared": True}},
            "Users": {"admin": {"Certificate": CERT, "Roles": ["updater"]}},
            "Roles": {"updater": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]}},
            "Config": {"SealMode": seal_mode},
        }
    ).encode()


async def _open(seal_dir: Path) -> Coordinator:
    return await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=seal_dir))


async def test_first_manifest_disabled_is_not_persisted(tmp_path: Path) -> None:
    coord = await _open(tmp_path)
    await coord.set_manifest(_manifest("Disabled", "a"))
    root = coord.deployment.ca.root.cert_der
    await coord.close()
    coord = await _open(tmp_path)
    try:
        assert coord.state is CoordinatorState.ACCEPTING_MANIFEST  # as MarbleRun: nothing was stored
        assert coord.deployment.ca.root.cert_der != root
    finally:
        await coord.close()


async def test_update_to_disabled_keeps_the_stored_state_current(tmp_path: Path) -> None:
    coord = await _open(tmp_path)
    await coord.set_manifest(_manifest("ProductKey", "a"))
    outcome, _ = await coord.update_manifest("admin", _manifest("Disabled", "b"))
    assert outcome.applied
    assert set(coord.deployment.secrets) == {"b"}
    await coord.close()
    # after a restart the updated state is back, not the state from before the update
    coord = await _open(tmp_path)
    try:
        assert coord.state is CoordinatorState.ACCEPTING_MARBLES
        assert set(coord.deployment.secrets) == {"b"}
        assert coord.deployment.manifest is not None
        assert coord.deployment.manifest.raw == _manifest("Disabled", "b")
    finally:
        await coord.close()
