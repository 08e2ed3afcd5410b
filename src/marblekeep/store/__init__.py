"""State storage: backends, the encryption barrier, key-encryption keys and the rollback anchor.

Layers, bottom up::

    Store (protocol)        MemoryStore, SQLiteStore            untrusted bytes, revision, CAS commits
    SealedStore             encryption barrier over any Store   AES-256-GCM(DEK), key as AAD, sealed index
    KeyEncryptionKeyProvider  Gramine sealing key / simulation key file: wraps the DEK
    RollbackAnchor          highest sealed epoch, kept beside the KEK

``open_sealed_store(inner, provider)`` returns :class:`Opened` (fresh or loaded) or
:class:`NeedsRecovery`; see :mod:`marblekeep.store.sealed`.
"""

from marblekeep.store.anchor import AnchorReading, AnchorStatus, RollbackAnchor
from marblekeep.store.base import MAX_KEY_LENGTH, Snapshot, Store, Transaction
from marblekeep.store.kek import (
    ANCHOR_FILE_NAME,
    DEFAULT_ATTESTATION_ROOT,
    KEK_INFO_PREFIX,
    GramineSealKeyProvider,
    KeyEncryptionKeyProvider,
    SimulationKeyFileProvider,
)
from marblekeep.store.memory import MemoryStore
from marblekeep.store.sealed import (
    DEK_SIZE,
    NeedsRecovery,
    Opened,
    OpenResult,
    PendingRecovery,
    SealedStore,
    open_sealed_store,
)
from marblekeep.store.sqlite import SQLiteStore

__all__ = [
    "ANCHOR_FILE_NAME",
    "DEFAULT_ATTESTATION_ROOT",
    "DEK_SIZE",
    "KEK_INFO_PREFIX",
    "MAX_KEY_LENGTH",
    "AnchorReading",
    "AnchorStatus",
    "GramineSealKeyProvider",
    "KeyEncryptionKeyProvider",
    "MemoryStore",
    "NeedsRecovery",
    "OpenResult",
    "Opened",
    "PendingRecovery",
    "RollbackAnchor",
    "SQLiteStore",
    "SealedStore",
    "SimulationKeyFileProvider",
    "Snapshot",
    "Store",
    "Transaction",
    "open_sealed_store",
]
