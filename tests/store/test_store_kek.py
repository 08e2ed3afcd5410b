"""KEK providers: Gramine sealing keys under a configurable attestation root, the simulation key file."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from marblekeep.errors import ConfigError, SealError
from marblekeep.manifest.model import SealMode
from marblekeep.store import (
    GramineSealKeyProvider,
    KeyEncryptionKeyProvider,
    MemoryStore,
    NeedsRecovery,
    Opened,
    SimulationKeyFileProvider,
    open_sealed_store,
)


def gramine_root(tmp_path: Path, mrsigner: bytes, mrenclave: bytes) -> Path:
    root = tmp_path / "attestation"
    (root / "keys").mkdir(parents=True, exist_ok=True)
    (root / "keys" / "_sgx_mrsigner").write_bytes(mrsigner)
    (root / "keys" / "_sgx_mrenclave").write_bytes(mrenclave)
    return root


def test_gramine_kek_is_hkdf_of_the_mode_key(tmp_path: Path) -> None:
    signer, enclave = os.urandom(16), os.urandom(16)
    root = gramine_root(tmp_path, signer, enclave)
    product = GramineSealKeyProvider(root, SealMode.PRODUCT_KEY)
    unique = GramineSealKeyProvider(root, SealMode.UNIQUE_KEY)
    assert isinstance(product, KeyEncryptionKeyProvider)
    expected = HKDF(hashes.SHA256(), 32, None, b"marblekeep/kek/v1/ProductKey").derive(signer)
    assert product.load_kek() == expected
    assert unique.load_kek() == HKDF(hashes.SHA256(), 32, None, b"marblekeep/kek/v1/UniqueKey").derive(
        enclave
    )
    assert product.load_kek() != unique.load_kek()
    assert product.anchor_path is None
    anchored = GramineSealKeyProvider(root, SealMode.UNIQUE_KEY, anchor_dir=tmp_path)
    assert anchored.anchor_path == tmp_path / "rollback-anchor"
    assert "_sgx_mrenclave" in anchored.description


def test_gramine_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Disabled"):
        GramineSealKeyProvider(tmp_path, SealMode.DISABLED)
    with pytest.raises(ConfigError, match="not running inside Gramine"):
        GramineSealKeyProvider(tmp_path / "nowhere", SealMode.PRODUCT_KEY).load_kek()
    root = gramine_root(tmp_path, b"short", os.urandom(16))
    with pytest.raises(SealError, match="expected 16"):
        GramineSealKeyProvider(root, SealMode.PRODUCT_KEY).load_kek()


async def test_enclave_update_product_key_keeps_state_unique_key_needs_recovery(tmp_path: Path) -> None:
    signer = os.urandom(16)
    old = gramine_root(tmp_path / "v1", signer, os.urandom(16))
    new = gramine_root(tmp_path / "v2", signer, os.urandom(16))  # same signer, new MRENCLAVE
    for mode, survives in [(SealMode.PRODUCT_KEY, True), (SealMode.UNIQUE_KEY, False)]:
        inner = MemoryStore()
        first = await open_sealed_store(inner, GramineSealKeyProvider(old, mode))
        assert isinstance(first, Opened)
        await first.store.commit({"k": b"v"}, expected_revision=0)
        second = await open_sealed_store(inner, GramineSealKeyProvider(new, mode))
        assert isinstance(second, Opened if survives else NeedsRecovery), mode


def test_simulation_key_file_created_private_and_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "simulation-kek"
    provider = SimulationKeyFileProvider(path)
    assert "INSECURE" in provider.description
    with caplog.at_level(logging.WARNING, logger="marblekeep.seal"):
        key = provider.load_kek()
        assert len(key) == 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == key
        assert provider.load_kek() == key
        assert SimulationKeyFileProvider(path).load_kek() == key
    warnings = [r for r in caplog.records if r.name == "marblekeep.seal" and r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("INSECURE" in r.getMessage() for r in warnings)
    assert key.hex() not in caplog.text
    assert provider.anchor_path == tmp_path / "simulation-kek.anchor"


def test_simulation_key_file_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kek"
    path.write_bytes(b"x" * 31)
    with pytest.raises(SealError, match="31 bytes"):
        SimulationKeyFileProvider(path).load_kek()
    path.write_bytes(b"x" * 32)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="marblekeep.seal"):
        SimulationKeyFileProvider(path).load_kek()
    assert "chmod 600" in caplog.text
    with pytest.raises(ConfigError, match="writable"):
        SimulationKeyFileProvider(tmp_path / "missing-dir" / "kek").load_kek()
