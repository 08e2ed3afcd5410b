"""The Coordinator's deployment state as one immutable value, and the pure transitions on it.

Rules of this module (it does no I/O; time and randomness are parameters):

- A :class:`Deployment` is a snapshot. Transitions return a new snapshot; the service layer
  persists the difference and swaps the snapshot in only after the commit succeeded, so a failed
  commit never leaves a half-applied state in memory.
- States only move forward: AcceptingManifest (2) → AcceptingMarbles (3). Recovery (1) is entered
  at startup when the sealed state cannot be opened; setting a manifest there starts afresh.
- The root CA and the seal master secret are created once per deployment and never rotate: the
  root is the deployment's identity, and rotating the seal master secret would make every Marble
  lose the data it sealed. The intermediate CA and the Marble root rotate on every manifest update.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from marblekeep.crypto.pki import CertifiedKey, create_intermediate, create_root_ca
from marblekeep.crypto.secretgen import generate_shared_secrets
from marblekeep.crypto.signing import sign_manifest
from marblekeep.errors import StateError
from marblekeep.manifest.model import Manifest, Secret

__all__ = [
    "CaSet",
    "CoordinatorState",
    "Deployment",
    "PendingUpdate",
    "new_deployment",
    "set_manifest",
]

Rng = Callable[[int], bytes]


class CoordinatorState(enum.IntEnum):
    """MarbleRun's state numbers, as ``/api/v2/status`` reports them."""

    UNINITIALIZED = 0
    RECOVERY = 1
    ACCEPTING_MANIFEST = 2
    ACCEPTING_MARBLES = 3


STATUS_MESSAGES: Mapping[CoordinatorState, str] = {
    CoordinatorState.RECOVERY: (
        "Coordinator is in recovery mode. Either upload a key to unseal the saved state, or set a new "
        "manifest. For more information on how to proceed, consult the documentation."
    ),
    CoordinatorState.ACCEPTING_MANIFEST: "Coordinator is ready to accept a manifest.",
    CoordinatorState.ACCEPTING_MARBLES: "Coordinator is running correctly and ready to accept marbles.",
}

NOT_IN_EXPECTED_STATE = "server is not in expected state"


@dataclass(frozen=True)
class CaSet:
    """The Coordinator root, the intermediate it signed, and the Marble root (same key as the
    intermediate, self-signed)."""

    root: CertifiedKey
    intermediate: CertifiedKey
    marble_root: CertifiedKey


@dataclass(frozen=True)
class PendingUpdate:
    """A full manifest update waiting for acknowledgements (it is state: it survives restarts).

    ``required_users`` are the users who held UpdateManifest when it was initiated (frozen then);
    ``required`` is how many acknowledgements apply it (the then-current UpdateThreshold, or all
    required users when that is 0); ``acknowledged`` lists who acknowledged, in order.
    """

    raw: bytes = field(repr=False)
    required_users: tuple[str, ...]
    required: int
    acknowledged: tuple[str, ...] = ()

    @property
    def missing(self) -> int:
        return max(self.required - len(self.acknowledged), 0)

    @property
    def missing_users(self) -> tuple[str, ...]:
        return tuple(u for u in self.required_users if u not in self.acknowledged)


@dataclass(frozen=True)
class Deployment:
    state: CoordinatorState
    ca: CaSet
    root_secret: bytes = field(repr=False)
    seal_master_secret: bytes = field(repr=False)
    previous_root_secret: bytes | None = field(default=None, repr=False)
    manifest: Manifest | None = None
    manifest_signature: bytes = b""
    #: Current values: shared and user-defined secrets carry values; per-Marble secrets are
    #: definitions (their values are derived or generated at each activation).
    secrets: Mapping[str, Secret] = field(default_factory=dict, repr=False)
    previous_secrets: Mapping[str, Secret] = field(default_factory=dict, repr=False)
    activations: Mapping[str, int] = field(default_factory=dict)
    #: Marbles' monotonic counters (MarbleRun's MonotonicCounter feature), by counter ID
    #: (activations.counter_id); values only grow. Kept across manifest updates.
    counters: Mapping[str, int] = field(default_factory=dict)
    #: Governance (core/governance.py): the hash-chained update log (JSON lines), its head
    #: signed by the root (core/auditlog.py encode_head), the pending full update, and the
    #: SecurityVersions raised by package updates (already applied to ``manifest.packages``;
    #: the raw manifest is unchanged).
    update_log: tuple[str, ...] = ()
    update_log_head: bytes = b""
    pending_update: PendingUpdate | None = None
    package_svns: Mapping[str, int] = field(default_factory=dict)

    def require(self, *states: CoordinatorState) -> None:
        if self.state not in states:
            raise StateError(NOT_IN_EXPECTED_STATE)


def new_ca(dns_names: Sequence[str], now: dt.datetime) -> CaSet:
    root = create_root_ca(dns_names, now)
    intermediate, marble_root = create_intermediate(root, dns_names, now)
    return CaSet(root=root, intermediate=intermediate, marble_root=marble_root)


def new_deployment(dns_names: Sequence[str], now: dt.datetime, rng: Rng = os.urandom) -> Deployment:
    """A fresh deployment: new root CA, intermediate, Marble root, root secret and seal master
    secret; ready to accept a manifest."""
    return Deployment(
        state=CoordinatorState.ACCEPTING_MANIFEST,
        ca=new_ca(dns_names, now),
        root_secret=rng(32),
        seal_master_secret=rng(32),
    )


def set_manifest(dep: Deployment, manifest: Manifest, now: dt.datetime, rng: Rng = os.urandom) -> Deployment:
    """Apply the first manifest: generate the shared secrets, store the user-defined ones with
    their initial values (if the manifest gives any), sign the raw bytes, accept Marbles.

    ``manifest`` has been validated already (it exists). Allowed in AcceptingManifest, and in
    Recovery (where it discards the old state: the caller passes a fresh deployment).
    """
    dep.require(CoordinatorState.ACCEPTING_MANIFEST, CoordinatorState.RECOVERY)
    generated = generate_shared_secrets(manifest.secrets, dep.ca.marble_root, now, rng)
    secrets: dict[str, Secret] = {}
    for name, definition in manifest.secrets.items():
        secrets[name] = generated.get(name, definition)
    return dataclasses.replace(
        dep,
        state=CoordinatorState.ACCEPTING_MARBLES,
        manifest=manifest,
        manifest_signature=sign_manifest(dep.ca.root.key, manifest.raw),
        secrets=secrets,
        previous_secrets=dict(secrets),
        activations={},
        counters={},
    )
