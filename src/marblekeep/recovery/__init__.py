"""Disaster recovery in MarbleRun's format: recovery secrets, Shamir shares, the upload state machine.

- :mod:`~marblekeep.recovery.keys` — a new DEK and the RSA-OAEP recovery secrets at SetManifest.
- :mod:`~marblekeep.recovery.shamir` — GF(2^8) Shamir split/combine (33-byte shares, x last).
- :mod:`~marblekeep.recovery.recoverer` — ``POST /api/v2/recover`` progress and signature checks.
- :mod:`~marblekeep.recovery.operator` — the key owner's side (decrypt, sign, encrypt for upload).

All pure: no files, sockets or clocks.
"""

from marblekeep.recovery.keys import (
    RecoveryKeyMaterial,
    generate_recovery_keys,
    parse_recovery_public_key,
    recovery_data_for,
    recovery_keys_changed,
)
from marblekeep.recovery.operator import (
    decrypt_recovery_secret,
    encrypt_for_coordinator,
    load_private_key,
    sign_recovery_secret,
)
from marblekeep.recovery.recoverer import (
    MSG_DONE,
    Recoverer,
    RecoverProgress,
    progress_message,
    verify_signatures,
)
from marblekeep.recovery.shamir import combine, split

__all__ = [
    "MSG_DONE",
    "RecoverProgress",
    "Recoverer",
    "RecoveryKeyMaterial",
    "combine",
    "decrypt_recovery_secret",
    "encrypt_for_coordinator",
    "generate_recovery_keys",
    "load_private_key",
    "parse_recovery_public_key",
    "progress_message",
    "recovery_data_for",
    "recovery_keys_changed",
    "sign_recovery_secret",
    "split",
    "verify_signatures",
]
