"""The public surface of marblekeep.store and marblekeep.recovery (what the service wires)."""

from __future__ import annotations

import marblekeep.recovery as recovery
import marblekeep.store as store


def test_store_exports() -> None:
    assert set(store.__all__) >= {
        "Store",
        "Transaction",
        "MemoryStore",
        "SQLiteStore",
        "SealedStore",
        "open_sealed_store",
        "Opened",
        "NeedsRecovery",
        "PendingRecovery",
        "GramineSealKeyProvider",
        "SimulationKeyFileProvider",
        "KeyEncryptionKeyProvider",
        "RollbackAnchor",
    }
    assert all(hasattr(store, name) for name in store.__all__)


def test_recovery_exports() -> None:
    assert set(recovery.__all__) >= {
        "generate_recovery_keys",
        "Recoverer",
        "split",
        "combine",
        "decrypt_recovery_secret",
        "sign_recovery_secret",
        "encrypt_for_coordinator",
    }
    assert all(hasattr(recovery, name) for name in recovery.__all__)
