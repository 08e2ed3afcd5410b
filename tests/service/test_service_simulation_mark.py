"""A state made in simulation is never promoted silently (issue 11, finding 5).

The state's public metadata carries ``SealedInSimulation`` (plaintext, authenticated by the sealed
index). A Coordinator that is not in simulation refuses such a state — at start when it can read
the mark, and again, authenticated, when a recovery key completes — unless the operator passes the
loud override. Non-simulation mode runs against a directory laid out like Gramine's
``/dev/attestation`` (sealing keys only; these tests need no quote).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from marblekeep.core.deployment import CoordinatorState
from marblekeep.core.publicmeta import PublicMetadata
from marblekeep.errors import ConfigError, RecoveryError
from marblekeep.manifest.model import SealMode
from marblekeep.recovery import decrypt_recovery_secret, sign_recovery_secret
from marblekeep.service import SIMULATION_KEK_FILE, STATE_DB, Coordinator, CoordinatorConfig
from marblekeep.store.kek import GramineSealKeyProvider, SimulationKeyFileProvider


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def marblekeep_argv() -> list[str]:
    return [str(Path(sys.executable).with_name("marblekeep"))]


@pytest.fixture(scope="module")
def owner() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def manifest(owner: rsa.RSAPrivateKey) -> bytes:
    pem = owner.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    doc = {
        "Packages": {"p": {"Debug": True}},
        "Marbles": {"m": {"Package": "p"}},
        "Secrets": {"k": {"Type": "symmetric-key", "Size": 128}},
        "RecoveryKeys": {"owner": pem.decode()},
    }
    return json.dumps(doc).encode()


def gramine_root(tmp_path: Path) -> Path:
    root = tmp_path / "attestation"
    (root / "keys").mkdir(parents=True)
    (root / "attestation_type").write_text("dcap")
    (root / "keys" / "_sgx_mrsigner").write_bytes(os.urandom(16))
    (root / "keys" / "_sgx_mrenclave").write_bytes(os.urandom(16))
    return root


def gramine_providers(root: Path, seal_dir: Path) -> dict[SealMode, GramineSealKeyProvider]:
    return {
        m: GramineSealKeyProvider(root, m, anchor_dir=seal_dir)
        for m in (SealMode.PRODUCT_KEY, SealMode.UNIQUE_KEY)
    }


def stored_meta(seal_dir: Path) -> PublicMetadata | None:
    conn = sqlite3.connect(seal_dir / STATE_DB)
    try:
        row = conn.execute("SELECT value FROM records WHERE key = ?", (b"meta:public",)).fetchone()
    finally:
        conn.close()
    return PublicMetadata.decode(None if row is None else bytes(row[0]))


async def simulation_state(seal_dir: Path, owner: rsa.RSAPrivateKey) -> tuple[bytes, dict[str, bytes]]:
    """A deployment made by a simulation Coordinator: (its root certificate, recovery secrets)."""
    coord = await Coordinator.open(CoordinatorConfig(seal_dir=seal_dir, simulation=True))
    try:
        secrets = await coord.set_manifest(manifest(owner))
        root = coord.deployment.ca.root.cert_der
    finally:
        await coord.close()
    meta = stored_meta(seal_dir)
    assert meta is not None and meta.sealed_in_simulation
    return root, secrets


async def test_a_production_coordinator_refuses_a_simulation_state_it_could_open(
    tmp_path: Path, owner: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """Even with the simulation key at hand (the KEK unwraps), the state is refused, then loaded only
    with the override, loudly, and keeps its mark."""
    seal = tmp_path / "seal"
    root, _ = await simulation_state(seal, owner)
    kek = SimulationKeyFileProvider(seal / SIMULATION_KEK_FILE)
    production = CoordinatorConfig(seal_dir=seal, simulation=False)
    with pytest.raises(ConfigError, match="created or held by a Coordinator in simulation mode") as refused:
        await Coordinator.open(production, kek_provider=kek)
    assert "--unsafe-accept-simulation-state" in refused.value.message
    caplog.set_level(logging.WARNING)
    unsafe = CoordinatorConfig(seal_dir=seal, simulation=False, accept_simulation_state=True)
    coord = await Coordinator.open(unsafe, kek_provider=kek)
    try:
        assert coord.state is CoordinatorState.ACCEPTING_MARBLES
        assert coord.deployment.ca.root.cert_der == root
    finally:
        await coord.close()
    assert "UNSAFE" in caplog.text
    meta = stored_meta(seal)
    assert meta is not None and meta.sealed_in_simulation  # sticky
    # and the lock was released after the refusal: a simulation Coordinator still opens it
    coord = await Coordinator.open(CoordinatorConfig(seal_dir=seal, simulation=True))
    await coord.close()


async def test_recovery_cannot_promote_a_simulation_state_to_production(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    seal = tmp_path / "seal"
    _root, secrets = await simulation_state(seal, owner)
    gramine = gramine_root(tmp_path)
    production = CoordinatorConfig(seal_dir=seal, simulation=False)
    # the Gramine key does not unwrap the state: it would enter Recovery, but the mark says simulation
    with pytest.raises(ConfigError, match="simulation mode"):
        await Coordinator.open(production, seal_providers=gramine_providers(gramine, seal))

    # the host strips the plaintext mark: Recovery starts, but the authenticated mark refuses it
    conn = sqlite3.connect(seal / STATE_DB)
    forged = PublicMetadata(json.loads(stored_meta_raw(seal))["RecoveryKeys"], False).encode()
    conn.execute("UPDATE records SET value = ? WHERE key = ?", (forged, b"meta:public"))
    conn.commit()
    conn.close()
    coord = await Coordinator.open(production, seal_providers=gramine_providers(gramine, seal))
    try:
        assert coord.state is CoordinatorState.RECOVERY
        dek = decrypt_recovery_secret(secrets["owner"], owner)
        with pytest.raises(RecoveryError, match=r"sealed index|simulation"):
            await coord.recover(dek, sign_recovery_secret(dek, owner))
        assert coord.state is CoordinatorState.RECOVERY
    finally:
        await coord.close()


async def test_with_the_override_recovery_loads_the_simulation_state_and_the_mark_stays(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    seal = tmp_path / "seal"
    root, secrets = await simulation_state(seal, owner)
    gramine = gramine_root(tmp_path)
    unsafe = CoordinatorConfig(seal_dir=seal, simulation=False, accept_simulation_state=True)
    coord = await Coordinator.open(unsafe, seal_providers=gramine_providers(gramine, seal))
    try:
        assert coord.state is CoordinatorState.RECOVERY
        dek = decrypt_recovery_secret(secrets["owner"], owner)
        assert (await coord.recover(dek, sign_recovery_secret(dek, owner)))[0] == 0
        assert coord.deployment.ca.root.cert_der == root
    finally:
        await coord.close()
    meta = stored_meta(seal)
    assert meta is not None and meta.sealed_in_simulation
    # now sealed with the (fake) Gramine key: a plain production start still refuses it
    with pytest.raises(ConfigError, match="simulation mode"):
        await Coordinator.open(
            CoordinatorConfig(seal_dir=seal, simulation=False),
            seal_providers=gramine_providers(gramine, seal),
        )


async def test_a_state_made_outside_simulation_is_not_marked(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    seal = tmp_path / "seal"
    gramine = gramine_root(tmp_path)
    config = CoordinatorConfig(seal_dir=seal, simulation=False)
    coord = await Coordinator.open(config, seal_providers=gramine_providers(gramine, seal))
    await coord.set_manifest(manifest(owner))
    await coord.close()
    meta = stored_meta(seal)
    assert meta is not None and not meta.sealed_in_simulation
    coord = await Coordinator.open(config, seal_providers=gramine_providers(gramine, seal))
    assert coord.state is CoordinatorState.ACCEPTING_MARBLES
    await coord.close()


def stored_meta_raw(seal_dir: Path) -> bytes:
    conn = sqlite3.connect(seal_dir / STATE_DB)
    try:
        return bytes(conn.execute("SELECT value FROM records WHERE key = ?", (b"meta:public",)).fetchone()[0])
    finally:
        conn.close()


async def test_the_coordinator_command_exits_and_names_the_override(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    """``marblekeep coordinator`` outside simulation (a Gramine-like directory) on a simulation state."""
    seal = tmp_path / "seal"
    await simulation_state(seal, owner)
    gramine = gramine_root(tmp_path)
    argv = [*marblekeep_argv(), "coordinator", "--attestation-root", str(gramine), "--seal-dir", str(seal)]
    argv += ["--client-addr", f"127.0.0.1:{free_port()}", "--mesh-addr", f"127.0.0.1:{free_port()}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDG_", "MARBLEKEEP_"))}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 2, result.stderr
    output = result.stdout + result.stderr
    assert "simulation mode" in output and "--unsafe-accept-simulation-state" in output
    assert "Traceback" not in output and "coordinator started" not in output
