"""The Coordinator service: load → apply → commit, around the pure core.

The service owns the current :class:`~marblekeep.core.deployment.Deployment` snapshot, the store it
is persisted in, and the per-instance ephemera (challenge nonces). Every state change follows the
same steps: compute the new snapshot with a pure function, write the changed records in one
compare-and-set commit, and only then publish the new snapshot. A failed commit leaves the
previous snapshot in place, so the API never reports a write that is not durable.

Mutations are serialised by one lock. Activations render their answer on the current snapshot
without it; those of Marbles with ``MaxActivations`` then take the lock only to count, many at
once in one commit (activations.py); the others write nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from marblekeep.activations import ActivationOutcome, MarbleActivations
from marblekeep.api.limits import ConnectionLimits
from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.evidence import parse_header, strip_oe_header
from marblekeep.attestation.signquote import sign_quote_payload
from marblekeep.core import governance
from marblekeep.core.activation import PreparedDeployment
from marblekeep.core.auditlog import LogHead, decode_head
from marblekeep.core.deployment import (
    NOT_IN_EXPECTED_STATE,
    STATUS_MESSAGES,
    CoordinatorState,
    Deployment,
    PendingUpdate,
    new_deployment,
    set_manifest,
)
from marblekeep.core.governance import Permission, UpdateOutcome, log_initial_manifest
from marblekeep.core.publicmeta import PublicMetadata
from marblekeep.core.readaudit import SecretReadAudit, TrailPage
from marblekeep.core.records import (
    COUNT_PREFIXES,
    K_MANIFEST,
    counts_from_records,
    deployment_changes,
    deployment_from_records,
    deployment_to_records,
)
from marblekeep.core.users import user_certificates
from marblekeep.errors import (
    AttestationError,
    AuthorizationError,
    ConfigError,
    ConflictError,
    IntegrityError,
    QuoteUnavailable,
    RecoveryError,
    RequestTooLarge,
    RollbackError,
    SealError,
    StateError,
)
from marblekeep.handover import HandoverClient, Identity, MemberSource, new_replica_id
from marblekeep.manifest import load_manifest, manifest_fingerprint
from marblekeep.manifest.model import Manifest, SealMode, Secret
from marblekeep.marble.evidence import EvidenceIssuer
from marblekeep.marble.protocol import ChallengeBook, EvidenceType
from marblekeep.recovery.keys import generate_recovery_keys
from marblekeep.recovery.recoverer import Recoverer
from marblekeep.replica import CONFLICT_RETRIES, Follower, Watchable
from marblekeep.store.base import Store
from marblekeep.store.kek import KeyEncryptionKeyProvider, SimulationKeyFileProvider
from marblekeep.store.location import SQLiteLocation, StoreLocation, open_backend
from marblekeep.store.lock import DataDirLock
from marblekeep.store.sealed import (
    HandoverNeeded,
    NeedsRecovery,
    Opened,
    PendingRecovery,
    SealedStore,
    open_sealed_store,
)

__all__ = ["ActivationOutcome", "Coordinator", "CoordinatorConfig", "EvidenceVerifier"]

log = logging.getLogger("marblekeep.coordinator")

_T = TypeVar("_T")

Clock = Callable[[], dt.datetime]
Rng = Callable[[int], bytes]

STATE_DB = "state.db"
SIMULATION_KEK_FILE = "simulation-kek.key"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class CoordinatorConfig:
    client_addr: str = ":4433"
    mesh_addr: str = ":2001"
    prometheus_addr: str = ""
    dns_names: tuple[str, ...] = ("localhost",)
    seal_dir: Path = Path("marblekeep-data")
    simulation: bool = False
    allow_rollback: bool = False
    attestation_root: Path = Path("/dev/attestation")
    log_format: str = "text"
    max_manifest_bytes: int = 4 * 1024 * 1024
    pccs_url: str = ""
    collateral_dir: Path | None = None
    #: Timeouts and the per-listener connection cap (api/limits.py, docs/operations.md).
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: Operator override: a non-simulation Coordinator loads a state made in simulation (logged).
    accept_simulation_state: bool = False
    #: Where the sealed state lives (``--store``): SQLite in ``seal_dir`` by default, or etcd.
    store: StoreLocation = field(default_factory=SQLiteLocation)
    #: The attested key hand-over on a shared store (marblekeep/handover.py, docs/ha.md §1): the
    #: address other replicas reach this one's Marble API at ("": derived from ``mesh_addr``) and
    #: how long a replica without its own key entry waits for a running one (0: enter Recovery).
    handover_addr: str = ""
    handover_wait: float = 60.0


def _simulation_state_refusal(seal_dir: Path) -> ConfigError:
    return ConfigError(
        f"refusing to use the sealed state in {seal_dir}: it was created or held by a Coordinator in "
        "simulation mode, so its keys (root certificate, secrets, seal keys) never had TEE protection "
        "and must not become production keys. Start a new deployment instead (move the seal directory "
        "away and set the manifest again), or, if you accept that risk, start with "
        "--unsafe-accept-simulation-state (logged at WARNING on every start)"
    )


def check_simulation_mark(config: CoordinatorConfig, meta: PublicMetadata | None) -> None:
    """Refuse a state made in simulation outside simulation, unless the operator overrides."""
    if meta is None or not meta.sealed_in_simulation or config.simulation:
        return
    if not config.accept_simulation_state:
        raise _simulation_state_refusal(config.seal_dir)
    log.warning(
        "UNSAFE: --unsafe-accept-simulation-state: using a state created or held in simulation "
        "mode; its keys never had TEE protection"
    )


class EvidenceVerifier(Protocol):
    """Turns SGX/TDX evidence into verified claims (quote signature, collateral, TCB)."""

    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims: ...


class NoQuoteVerifier:
    """Used when no collateral source is configured: every real quote is refused, with the fix."""

    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims:
        raise AttestationError(
            f"cannot verify {evidence_type} evidence: no collateral source is configured on the Coordinator "
            "(start it with --pccs-url URL or --collateral-dir DIR)"
        )


class Coordinator:
    """One Coordinator instance. Build it with :meth:`open`; close it with :meth:`close`."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        deployment: Deployment,
        store: SealedStore | None,
        records: Mapping[str, bytes],
        pending_recovery: PendingRecovery | None = None,
        recovery_reason: str = "",
        verifier: EvidenceVerifier | None = None,
        quote_issuer: EvidenceIssuer | None = None,
        clock: Clock = utcnow,
        rng: Rng = os.urandom,
        seal_providers: Mapping[SealMode, KeyEncryptionKeyProvider] | None = None,
        seal_mode_in_use: SealMode = SealMode.PRODUCT_KEY,
        store_revision: int = 0,
    ) -> None:
        self.config = config
        #: The store revision the in-memory deployment was read at: commits are conditioned on it.
        self._view_revision = store_revision
        #: Follows the other replicas' commits when the store is shared (etcd).
        self.follower: Follower | None = None
        self._seal_providers = dict(seal_providers or {})
        self._seal_mode_in_use = seal_mode_in_use
        self.simulation = config.simulation
        #: Whether the state was created or held in simulation mode (sticky; see core/publicmeta.py).
        self._sealed_in_simulation = config.simulation
        self.clock = clock
        self.rng = rng
        self.verifier: EvidenceVerifier = verifier or NoQuoteVerifier()
        self.quote_issuer = quote_issuer
        self.challenges = ChallengeBook(rng(32))
        self.read_audit = SecretReadAudit()
        self._store = store
        #: The deployment as the store holds it (None: nothing stored yet), to commit only changes.
        self._persisted: Deployment | None = deployment if records else None
        self._pending_recovery = pending_recovery
        self._recoverer: Recoverer | None = None
        self.recovery_reason = recovery_reason
        self.lock = asyncio.Lock()
        #: The backend under the sealed state (the etcd store registers replicas for the hand-over).
        self.backend: Store | None = None
        #: This process's name among the replicas (marblekeep/handover.py).
        self.replica_id = ""
        self._handover_identity: Identity | None = None
        self._dir_lock: DataDirLock | None = None
        self.observers: list[Callable[[Deployment], None]] = []
        self._publish(deployment)
        self.marbles = MarbleActivations(self)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        config: CoordinatorConfig,
        *,
        verifier: EvidenceVerifier | None = None,
        quote_issuer: EvidenceIssuer | None = None,
        kek_provider: KeyEncryptionKeyProvider | None = None,
        seal_providers: Mapping[SealMode, KeyEncryptionKeyProvider] | None = None,
        clock: Clock = utcnow,
        rng: Rng = os.urandom,
    ) -> Coordinator:
        """Open (or create) the sealed state in ``config.seal_dir`` and resume where it was.

        A state whose data-encryption key cannot be unwrapped puts the Coordinator in Recovery
        with a temporary root certificate; damaged data is an :class:`IntegrityError`.
        """
        seal_dir = config.seal_dir
        try:
            seal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the seal directory {seal_dir}: {exc.strerror}") from None
        # One Coordinator per data directory, held until close() (or process exit).
        dir_lock = DataDirLock.acquire(
            seal_dir, {"client_addr": config.client_addr, "mesh_addr": config.mesh_addr}
        )
        try:
            coord = await cls._open_locked(
                config,
                verifier=verifier,
                quote_issuer=quote_issuer,
                kek_provider=kek_provider,
                seal_providers=seal_providers,
                clock=clock,
                rng=rng,
            )
        except BaseException:
            dir_lock.release()
            raise
        coord._dir_lock = dir_lock
        return coord

    @classmethod
    async def _open_locked(
        cls,
        config: CoordinatorConfig,
        *,
        verifier: EvidenceVerifier | None,
        quote_issuer: EvidenceIssuer | None,
        kek_provider: KeyEncryptionKeyProvider | None,
        seal_providers: Mapping[SealMode, KeyEncryptionKeyProvider] | None,
        clock: Clock,
        rng: Rng,
    ) -> Coordinator:
        seal_dir = config.seal_dir
        if seal_providers is None:
            provider = kek_provider
            if provider is None:
                if not config.simulation:
                    raise ConfigError(
                        "no key-encryption key provider: outside simulation the Coordinator seals its "
                        "state with the TEE's sealing key (run it under Gramine-SGX)"
                    )
                provider = SimulationKeyFileProvider(seal_dir / SIMULATION_KEK_FILE)
            seal_providers = {SealMode.PRODUCT_KEY: provider, SealMode.UNIQUE_KEY: provider}
        inner: Store = await open_backend(config.store, seal_dir / STATE_DB)
        log.info("state store opened", extra={"store": config.store.describe()})
        try:
            # The seal mode is part of the sealed manifest, so it is not known before unsealing: try the
            # product key first (MarbleRun's default), then the unique key.
            opened: Opened | NeedsRecovery | None = None
            mode_in_use = SealMode.PRODUCT_KEY
            for mode in (SealMode.PRODUCT_KEY, SealMode.UNIQUE_KEY):
                candidate = seal_providers.get(mode)
                if candidate is None:
                    continue
                attempt = await open_sealed_store(
                    inner, candidate, allow_rollback=config.allow_rollback, rng=rng
                )
                if opened is None or isinstance(attempt, Opened):
                    opened, mode_in_use = attempt, mode
                if isinstance(attempt, Opened):
                    break
            if opened is None:
                raise ConfigError("no key-encryption key provider for SealMode ProductKey or UniqueKey")
            replica_id = new_replica_id()
            handed_over = False
            if isinstance(opened, NeedsRecovery) and opened.handover_possible and hasattr(inner, "members"):
                joined = await _join_by_handover(
                    inner, config, seal_providers, replica_id, verifier, quote_issuer, clock, rng
                )
                if joined is not None:
                    opened, mode_in_use, handed_over = joined, SealMode.PRODUCT_KEY, True
            now = clock()
            common = {
                "verifier": verifier,
                "quote_issuer": quote_issuer,
                "clock": clock,
                "rng": rng,
                "seal_providers": seal_providers,
                "seal_mode_in_use": mode_in_use,
            }
            if isinstance(opened, NeedsRecovery):
                # the plaintext mark (checked again, authenticated, once a recovery key is complete)
                check_simulation_mark(config, PublicMetadata.decode(opened.recovery.public_metadata))
                log.warning(
                    "sealed state cannot be opened: entering recovery mode",
                    extra={"reason": opened.reason.message},
                )
                temp = new_deployment(config.dns_names, now, rng)
                temp = Deployment(
                    state=CoordinatorState.RECOVERY,
                    ca=temp.ca,
                    root_secret=temp.root_secret,
                    seal_master_secret=temp.seal_master_secret,
                )
                coord = cls(
                    config,
                    deployment=temp,
                    store=None,
                    records={},
                    pending_recovery=opened.recovery,
                    recovery_reason=opened.reason.message,
                    **common,  # type: ignore[arg-type]
                )
                coord.backend, coord.replica_id = inner, replica_id
                return coord
            store = opened.store
            snap = await store.snapshot("")
            records = dict(snap.records)
            dep = deployment_from_records(records)
            if dep is None:
                dep = new_deployment(config.dns_names, now, rng)
                records = {}
            else:
                log.info(
                    "sealed state loaded",
                    extra={"state": dep.state.name, "records": len(records)},
                )
            meta = PublicMetadata.decode(store.public_metadata) if records else None
            check_simulation_mark(config, meta)
            coord = cls(
                config,
                deployment=dep,
                store=store,
                records=records,
                store_revision=snap.revision,
                **common,  # type: ignore[arg-type]
            )
            coord.backend, coord.replica_id = inner, replica_id
            if handed_over and dep.manifest is not None:
                await coord._follow_seal_mode(dep)  # the entry under the manifest's seal mode's key
            if records:
                coord._sealed_in_simulation = config.simulation or (
                    meta is not None and meta.sealed_in_simulation
                )
                await coord._store_public_metadata(dep)
            if hasattr(inner, "watch_head"):  # a shared store: other replicas may commit
                coord.follower = Follower(cast(Watchable, inner), coord.sync, lambda: coord._view_revision)
                coord.follower.start()
            return coord
        except BaseException:
            await inner.close()
            raise

    async def close(self) -> None:
        try:
            if self.follower is not None:
                await self.follower.stop()
                self.follower = None
            if self._store is not None:
                await self._store.close()
                self._store = None
            if self._pending_recovery is not None:
                await self._pending_recovery.close()
        finally:
            if self._dir_lock is not None:
                self._dir_lock.release()
                self._dir_lock = None

    # ------------------------------------------------------------------ replicas (shared store)

    @property
    def handover_identity(self) -> Identity:
        """How this replica attests itself and checks the other side in a key hand-over."""
        if self._handover_identity is None:
            self._handover_identity = Identity(self.simulation, self.quote_issuer, self.verifier, self.clock)
        return self._handover_identity

    async def _adopt_by_handover(self) -> bool:
        """A fresh replica whose shared store got its first state from another replica: obtain that
        replica's deployment KEK by the attested hand-over (bounded wait). Caller holds the lock."""
        if self._store is None or self.backend is None or not hasattr(self.backend, "members"):
            return False
        client = HandoverClient(
            cast(MemberSource, self.backend),
            self.handover_identity,
            self.replica_id,
            wait=min(self.config.handover_wait, 15.0),
        )
        got = await client.obtain()
        if got is None:
            return False
        await self._store.adopt_handover(*got)
        log.info("joined the shared state by key hand-over", extra={"epoch": self._store.epoch})
        return True

    def can_hand_over(self) -> bool:
        """Whether this replica holds a stored state whose deployment KEK it can hand over."""
        return (
            self._store is not None
            and self._store.written
            and self._dep.state is not CoordinatorState.RECOVERY
            and self._store.deployment_kek_for_handover() is not None
        )

    def handover_material(self) -> tuple[bytes, bytes, int, str]:
        """``(deployment KEK, store id, epoch, seal mode)`` for an attested hand-over (handover.py)."""
        store = self._store
        dkek = None if store is None or not self.can_hand_over() else store.deployment_kek_for_handover()
        if store is None or dkek is None:
            raise StateError(
                "this replica holds no stored state yet (or is in recovery): ask another replica"
            )
        manifest = self._dep.manifest
        seal_mode = SealMode.PRODUCT_KEY if manifest is None else manifest.config.seal_mode
        return dkek, store.store_id, store.epoch, seal_mode.value

    async def sync(self, seen: int | None = None) -> None:
        """Re-read the state if another replica committed since this view was read (``seen``: the
        store revision a watch reported; nothing to do if this view is already at or past it)."""
        async with self.lock:
            if seen is not None and seen <= self._view_revision:
                return
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        """Take the other replicas' commits since this view (caller holds :attr:`lock`).

        On etcd, first only the records changed since the view (one read): a commit that changed
        only activation counts and monotonic counters (the common case under load) is applied to
        the view as it is. Anything else, and stores that cannot list changes, re-read the whole
        state."""
        store = self._store
        if store is None:
            return
        changes = await store.changes_since(self._view_revision, likely=COUNT_PREFIXES)
        if changes is not None:
            if changes.revision == self._view_revision:
                return
            dep = self._counts_applied(changes.records)
            if dep is not None:
                self._adopt_view(dep, changes.revision, counts_only=True)
                return
        else:
            try:
                revision = await store.revision()
            except HandoverNeeded:  # another replica stored the first state: get its key, then read it
                if not await self._adopt_by_handover():
                    raise  # 503 for a request; the follower logs it and tries again
                revision = await store.revision()
            if revision == self._view_revision:
                return
        snap = await store.snapshot("")
        if snap.revision == self._view_revision:
            return
        counted = self._counts_only_change(snap.records)
        dep = counted or deployment_from_records(snap.records)
        if dep is None:
            return  # nothing stored yet
        self._adopt_view(dep, snap.revision, counts_only=counted is not None)

    def _adopt_view(self, dep: Deployment, revision: int, *, counts_only: bool) -> None:
        self._persisted = dep
        self._view_revision = revision
        self._publish(dep)
        # counts follow at the activation rate: not worth a line each
        log.log(
            logging.DEBUG if counts_only else logging.INFO,
            "state re-read at a newer store revision",
            extra={"revision": revision},
        )

    def _counts_applied(self, changed: Mapping[str, bytes]) -> Deployment | None:
        """The view with ``changed`` applied, when those are only activation counts and monotonic
        counters (no re-parsing of the manifest, keys and secrets); None otherwise."""
        base = self._persisted
        if base is None or base.manifest is None or not changed:
            return None
        if not all(k.startswith(COUNT_PREFIXES) for k in changed):
            return None
        activations, counters = counts_from_records(changed)  # IntegrityError for a malformed one
        return dataclasses.replace(
            base,
            activations={**base.activations, **activations} if activations else base.activations,
            counters={**base.counters, **counters} if counters else base.counters,
        )

    def _counts_only_change(self, records: Mapping[str, bytes]) -> Deployment | None:
        """The view with new counts, when another replica's commits changed nothing but activation
        counts and monotonic counters, judged on the whole state's records (stores that cannot list
        changes). None when anything else changed (the caller rebuilds everything)."""
        base = self._persisted
        if base is None or base.manifest is None:
            return None
        known = deployment_to_records(base)
        changed = {k for k in known.keys() | records.keys() if known.get(k) != records.get(k)}
        if not changed or not all(k.startswith(COUNT_PREFIXES) for k in changed):
            return None
        activations, counters = counts_from_records(records)
        return dataclasses.replace(base, activations=activations, counters=counters)

    async def catch_up_locked(self) -> None:
        """Take the commits the follower's watch already reported and this view lacks, before a
        change is computed on it (caller holds :attr:`lock`): its compare-and-set would lose anyway.
        No store round trip when the view is current."""
        if self.follower is not None and self.follower.seen > self._view_revision:
            await self._sync_locked()

    async def _fresh_locked(self) -> None:
        """On a shared store, make sure the view is current before computing a change (caller holds lock)."""
        if self.follower is not None and self._store is not None:
            await self._sync_locked()

    async def mutate(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``attempt`` (compute from the current view, then commit) under the lock; when another
        replica committed first, the commit's compare-and-set fails, the view is re-read and the change
        computed again on it (never lost, never applied twice)."""
        for tries in range(CONFLICT_RETRIES):
            async with self.lock:
                try:
                    await self.catch_up_locked()
                    return await attempt()
                except ConflictError:
                    if tries == CONFLICT_RETRIES - 1:
                        raise
            await asyncio.sleep(0.001 * (tries + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ snapshot

    def _publish(self, dep: Deployment, prepared: PreparedDeployment | None = None) -> None:
        old = getattr(self, "_dep", None)
        self._dep = dep
        if prepared is None or prepared.deployment is not dep:
            prepared = self._prepare_now(dep)
        self._prepared = prepared
        if old is not None and old.manifest is not dep.manifest:
            self.user_certificates = user_certificates(dep.manifest)
            for observer in self.observers:
                observer(dep)
        elif old is None:
            self.user_certificates = user_certificates(dep.manifest)

    @property
    def deployment(self) -> Deployment:
        return self._dep

    @property
    def state(self) -> CoordinatorState:
        return self._dep.state

    @staticmethod
    def _persists(dep: Deployment) -> bool:
        return dep.manifest is not None and dep.manifest.config.seal_mode is not SealMode.DISABLED

    def _prepare_now(self, dep: Deployment) -> PreparedDeployment:
        previous = getattr(self, "_prepared", None)
        return PreparedDeployment(dep, previous, coordinator_dns_names=self.config.dns_names)

    async def _prepare(self, new: Deployment) -> PreparedDeployment:
        """Compile ``new``'s templates off the event loop (a new manifest's can take a while)."""
        return await _in_thread_to_the_end(self._prepare_now, new)

    async def commit(self, new: Deployment, prepared: PreparedDeployment | None = None) -> None:
        """Persist ``new`` (only the changed records) and publish it. Caller holds :attr:`lock`.

        ``prepared``: ``new`` already prepared (:meth:`_prepare`), else it is prepared here."""
        if prepared is None and self._dep.manifest is not new.manifest:
            prepared = await self._prepare(new)
        manifest = new.manifest
        # SealMode Disabled keeps a deployment in memory only if its first manifest says so; once a
        # state is on disk, an update to Disabled must not leave an older state there to come back
        # at the next restart, so persisting goes on.
        persist = self._persists(new) or (manifest is not None and self._persisted is not None)
        if persist and self._store is not None:
            changes = deployment_changes(self._persisted, new)
            if changes:
                try:
                    self._view_revision = await self._store.commit(
                        changes, expected_revision=self._view_revision
                    )
                except ConflictError:
                    await self._sync_locked()  # another replica committed first: take its state
                    raise ConflictError(
                        "another Coordinator replica changed the state at the same time; retry"
                    ) from None
            self._persisted = new
            await self._follow_seal_mode(new)
        self._publish(new, prepared)

    async def _follow_seal_mode(self, dep: Deployment) -> None:
        """Re-wrap the DEK when the manifest asks for another seal mode than the one in use."""
        assert dep.manifest is not None and self._store is not None
        wanted = dep.manifest.config.seal_mode
        if wanted is SealMode.DISABLED or wanted is self._seal_mode_in_use:
            return
        current = self._seal_providers.get(self._seal_mode_in_use)
        target = self._seal_providers.get(wanted)
        if target is None:
            return
        if target is not current:
            self._view_revision = await self._store.rewrap(target)
            log.info("state re-sealed for the manifest's seal mode", extra={"seal_mode": wanted.value})
        self._seal_mode_in_use = wanted

    # ------------------------------------------------------------------ client API operations

    def status(self) -> tuple[int, str]:
        state = self._dep.state
        return int(state), STATUS_MESSAGES.get(state, "Cannot determine coordinator status.")

    def certificate_chain_pem(self) -> bytes:
        """Intermediate then root, as MarbleRun's quote endpoint returns them."""
        ca = self._dep.ca
        return ca.intermediate.cert_pem + ca.root.cert_pem

    def quote(self, nonce: bytes | None) -> bytes:
        """The Coordinator's own quote over SHA-256(root DER ‖ nonce); empty in simulation."""
        if self.simulation or self.quote_issuer is None:
            return b""
        digest = hashlib.sha256(self._dep.ca.root.cert_der + (nonce or b"")).digest()
        try:
            return self.quote_issuer.issue(digest + bytes(32))
        except AttestationError as exc:
            log.error("the Coordinator's own quote failed", extra={"reason": exc.message})
            raise QuoteUnavailable(
                f"the Coordinator cannot produce a quote right now: {exc.message}"
            ) from None

    async def set_manifest(self, raw: bytes) -> dict[str, bytes]:
        """Validate and apply the first manifest; returns the recovery secrets (name → encrypted)."""
        if len(raw) > self.config.max_manifest_bytes:
            raise RequestTooLarge(
                f"manifest is {len(raw)} bytes, more than the limit of {self.config.max_manifest_bytes}"
            )
        self._dep.require(CoordinatorState.ACCEPTING_MANIFEST, CoordinatorState.RECOVERY)
        # Validation and the dry run are CPU work: off the event loop, and before the lock.
        manifest = await asyncio.to_thread(load_manifest, raw)
        async with self.lock:
            await self._fresh_locked()
            dep = self._dep
            dep.require(CoordinatorState.ACCEPTING_MANIFEST, CoordinatorState.RECOVERY)
            now = self.clock()
            if dep.state is CoordinatorState.RECOVERY:
                # Setting a manifest in Recovery discards the old state (as MarbleRun).
                # The temporary root served during Recovery (which the user may have verified
                # through the quote endpoint) becomes the new deployment's root.
                if self._pending_recovery is not None:
                    self._store = await self._pending_recovery.discard()
                    self._view_revision = await self._store.revision()
                    self._pending_recovery = None
                    self._recoverer = None
                self._persisted = None
                log.warning("manifest set in recovery mode: the old sealed state was discarded")
            self._sealed_in_simulation = self.simulation  # a new state, made by this Coordinator
            new = await _in_thread_to_the_end(_first_manifest, dep, manifest, now, self.rng)
            material = generate_recovery_keys(
                manifest.recovery_keys, manifest.config.recovery_threshold, rng=self.rng
            )
            if self._persists(new) and self._store is not None:
                # The state is sealed under the DEK the recovery secrets open; the recovery public
                # keys are stored beside R so that uploads can be checked before the DEK is known.
                self._view_revision = await self._store.rekey(
                    material.dek,
                    recovery_data=material.recovery_data,
                    public_metadata=self._public_metadata(manifest),
                    expected_revision=self._view_revision,
                )
            await self.commit(new)
        log.info(
            "manifest set",
            extra={"fingerprint": manifest_fingerprint(raw), "marbles": len(manifest.marbles)},
        )
        return dict(material.secrets)

    async def _reissue_recovery(self, manifest: Manifest) -> dict[str, bytes]:
        """New DEK and recovery secrets for ``manifest``'s recovery keys (a full update changed them).

        The caller holds :attr:`lock` and commits the update afterwards."""
        material = generate_recovery_keys(
            manifest.recovery_keys, manifest.config.recovery_threshold, rng=self.rng
        )
        if self._store is not None and manifest.config.seal_mode is not SealMode.DISABLED:
            self._view_revision = await self._store.rekey(
                material.dek,
                recovery_data=material.recovery_data,
                public_metadata=self._public_metadata(manifest),
                expected_revision=self._view_revision,
            )
        return dict(material.secrets)

    # ------------------------------------------------------------------ recovery

    def _public_metadata(self, manifest: Manifest) -> bytes:
        return PublicMetadata(manifest.recovery_keys, self._sealed_in_simulation).encode()

    async def _store_public_metadata(self, dep: Deployment) -> None:
        """Keep ``meta:public`` in line: states written before it existed get it now, and a state a
        simulation Coordinator holds gets the simulation mark (one commit, only when it changes)."""
        store = self._store
        if store is None or dep.manifest is None or not self._persists(dep):
            return
        wanted = self._public_metadata(dep.manifest)
        if store.public_metadata != wanted:
            await store.set_public_metadata(wanted)
            log.info("the sealed state's public metadata (recovery public keys, simulation mark) was stored")
            # That commit moved the store's revision: re-read, so that the view's revision (which
            # conditions the next commit) is current and covers any other replica's commit meanwhile.
            await self._sync_locked()

    def _check_simulation_mark(self, meta: PublicMetadata | None) -> None:
        check_simulation_mark(self.config, meta)

    def _require_recovery(self) -> Recoverer:
        if self._dep.state is not CoordinatorState.RECOVERY or self._pending_recovery is None:
            raise StateError(NOT_IN_EXPECTED_STATE)
        if self._recoverer is None:
            pending = self._pending_recovery

            def recovery_keys(dek: bytes) -> tuple[Mapping[str, str], int]:
                # the simulation mark, now authenticated (an attacker may strip the plaintext one)
                self._check_simulation_mark(PublicMetadata.decode(pending.verified_public_metadata(dek)))
                raw = pending.peek(dek, K_MANIFEST)
                if raw is None:
                    raise RecoveryError("the recovered state holds no manifest; set a new manifest instead")
                stored = load_manifest(raw)
                return stored.recovery_keys, stored.config.recovery_threshold

            meta = PublicMetadata.decode(pending.public_metadata)
            public = None if meta is None else meta.recovery_keys
            if public is None:
                log.warning(
                    "the sealed state does not store its recovery public keys (written by an older "
                    "marblekeep): recovery uploads are checked only once a key is complete, and only the "
                    "last uploads are kept"
                )
            self._recoverer = Recoverer(
                pending.recovery_data, pending.try_key, recovery_keys, public_keys=public
            )
        return self._recoverer

    async def recovery_public_key(self) -> bytes:
        """The ephemeral RSA-4096 key (PKIX DER) for encrypted recovery uploads; Recovery only.

        Made on first use (about a second of CPU): in a worker thread, not on the event loop."""
        async with self.lock:
            recoverer = self._require_recovery()
            return await _in_thread_to_the_end(recoverer.public_key_der)

    async def recover(self, secret: bytes, signature: bytes) -> tuple[int, str]:
        """One recovery secret upload; when the key is complete, load the sealed state.

        The RSA and combination work runs in a worker thread, so status and other clients are
        answered meanwhile; uploads are serialised by :attr:`lock`."""
        async with self.lock:
            recoverer = self._require_recovery()
            progress = await _in_thread_to_the_end(recoverer.upload, secret, signature)
            if not progress.complete:
                return progress.remaining, progress.message
            assert self._pending_recovery is not None and progress.dek is not None
            keep: dict[str, object] = {}
            if progress.recovery_data is not None:
                keep["recovery_data"] = progress.recovery_data
            store = await self._pending_recovery.complete(
                progress.dek,
                allow_rollback=self.config.allow_rollback,
                **keep,  # type: ignore[arg-type]
            )
            records = await store.list("")
            dep = deployment_from_records(records)
            if dep is None:
                raise RecoveryError("the recovered state holds no deployment; set a new manifest instead")
            self._store = store
            self._view_revision = await store.revision()
            self._persisted = dep
            meta = PublicMetadata.decode(store.public_metadata)
            self._sealed_in_simulation = self.simulation or (meta is not None and meta.sealed_in_simulation)
            await self._store_public_metadata(dep)
            # Recovery re-sealed the state under the first (product) key provider.
            self._seal_mode_in_use = SealMode.PRODUCT_KEY
            if self._persists(dep):
                await self._follow_seal_mode(dep)
            self._pending_recovery = None
            self._recoverer = None
            self.recovery_reason = ""
            self._publish(dep)
        log.warning("recovery successful: the sealed state was loaded with the recovered key")
        return 0, progress.message

    def manifest(self) -> tuple[bytes, bytes, str] | None:
        """(raw manifest, signature, hex fingerprint), or None when no manifest is set."""
        dep = self._dep
        if dep.manifest is None:
            return None
        return dep.manifest.raw, dep.manifest_signature, manifest_fingerprint(dep.manifest.raw)

    def collateral_status(self) -> list[dict[str, object]]:
        """Age and expiry of the cached attestation collateral (for status and metrics)."""
        cache = getattr(self.verifier, "cache", None)
        return list(cache.status()) if cache is not None else []

    async def sign_quote(self, quote: bytes) -> tuple[str, bytes]:
        """MarbleRun's sign-quote: verify ``quote`` (no package policy), then sign
        SHA-256(base64(quote as submitted) ‖ TCB status) with the root key."""
        manifest = self._dep.manifest
        if manifest is None or not manifest.config.feature_enabled("SignQuoteEndpoint"):
            raise AuthorizationError(
                "the sign-quote endpoint is disabled: add SignQuoteEndpoint to the manifest's "
                "Config.FeatureGates to enable it"
            )
        raw = strip_oe_header(quote)
        kind = parse_header(raw).kind
        evidence_type = EvidenceType.TDX if kind is TeeKind.TDX else EvidenceType.SGX_DCAP
        claims = await self.verifier.verify(evidence_type, quote, self.clock())
        digest = sign_quote_payload(quote, claims.tcb_status)
        signature = self._dep.ca.root.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return claims.tcb_status, signature

    # ------------------------------------------------------------------ governance (core/governance.py)

    def _check_manifest_size(self, raw: bytes) -> None:
        if len(raw) > self.config.max_manifest_bytes:
            raise RequestTooLarge(
                f"manifest is {len(raw)} bytes, more than the limit of {self.config.max_manifest_bytes}"
            )

    async def read_secrets(self, user: str, names: Sequence[str]) -> dict[str, Secret]:
        """The secrets ``names`` (ReadSecret on all). The read is recorded in the secret-read audit
        trail and the Coordinator's log (not in the public update log; nothing is written)."""
        async with self.lock:
            await self._fresh_locked()  # another replica's latest write is read too
            secrets = governance.read_secrets(self._dep, user, names)
        self.read_audit.record(self.clock(), user, [(name, s.type.value) for name, s in secrets.items()])
        log.info("secrets read", extra={"user": user, "secrets": sorted(secrets)})
        return secrets

    def secret_reads(self, user: str, since: int, limit: int = 1000) -> TrailPage:
        """The audit trail's entries after ``since`` that ``user`` may see (core/readaudit.py)."""
        manifest = self._dep.manifest
        if manifest is None:
            raise StateError(NOT_IN_EXPECTED_STATE)
        sees_all = governance.is_permitted(manifest, user, Permission.UPDATE_MANIFEST, ())

        def owned(name: str) -> bool:
            return governance.is_permitted(manifest, user, Permission.WRITE_SECRET, (name,))

        return self.read_audit.page(since, sees_all=sees_all, viewer=user, owned=owned, limit=limit)

    async def write_secrets(self, user: str, body: object) -> None:
        """Set user-defined secrets (all or nothing; see governance.write_secrets)."""

        async def attempt() -> None:
            new = await _in_thread_to_the_end(governance.write_secrets, self._dep, user, body, self.clock())
            await self.commit(new)

        await self.mutate(attempt)
        names = sorted(str(n) for n in body) if isinstance(body, Mapping) else []
        log.info("user-defined secrets set", extra={"user": user, "secrets": names})

    async def _commit_update(self, outcome: UpdateOutcome) -> dict[str, bytes] | None:
        """Commit an update outcome (caller holds :attr:`lock`). An applied full update that changed
        the recovery keys first gets a new DEK and recovery secrets, which are returned."""
        recovery: dict[str, bytes] | None = None
        if outcome.error is None and outcome.new_recovery_manifest is not None:
            recovery = await self._reissue_recovery(outcome.new_recovery_manifest)
        await self.commit(outcome.deployment)
        return recovery

    def _after_update(self, outcome: UpdateOutcome) -> None:
        """Log a committed outcome; raise its error (the cancellation is committed by then)."""
        if outcome.error is not None:
            log.warning(
                "manifest update cancelled: it could not be applied", extra={"reason": outcome.error.message}
            )
            raise outcome.error
        if outcome.applied:
            manifest = outcome.deployment.manifest
            log.info(
                "manifest updated (restart running Marbles to pick up the change)",
                extra={
                    "kind": outcome.kind.value,
                    "fingerprint": manifest_fingerprint(manifest.raw) if manifest else "",
                },
            )

    async def update_manifest(self, user: str, raw: bytes) -> tuple[UpdateOutcome, dict[str, bytes] | None]:
        """A package update, or the start of a full update (applied at once if no one else must
        acknowledge). Returns the outcome and the new recovery secrets (when the keys changed)."""
        self._check_manifest_size(raw)
        async with self.lock:
            await self._fresh_locked()
            outcome = await _in_thread_to_the_end(
                governance.update_manifest, self._dep, user, raw, self.clock(), self.rng
            )
            recovery = await self._commit_update(outcome)
        self._after_update(outcome)
        return outcome, recovery

    async def acknowledge_update(
        self, user: str, raw: bytes
    ) -> tuple[UpdateOutcome, dict[str, bytes] | None]:
        """Acknowledge the pending update with its exact bytes; the last one applies it."""
        self._check_manifest_size(raw)
        async with self.lock:
            await self._fresh_locked()
            outcome = await _in_thread_to_the_end(
                governance.acknowledge_update, self._dep, user, raw, self.clock(), self.rng
            )
            recovery = await self._commit_update(outcome)
        self._after_update(outcome)
        return outcome, recovery

    async def cancel_update(self, user: str) -> None:
        async def attempt() -> None:
            await self.commit(governance.cancel_update(self._dep, user, self.clock()))

        await self.mutate(attempt)
        log.info("pending manifest update cancelled", extra={"user": user})

    def pending_update(self) -> PendingUpdate | None:
        return self._dep.pending_update

    def update_log(self) -> tuple[tuple[str, ...], LogHead | None]:
        """The update log's entries and its signed head (None before the first entry)."""
        dep = self._dep
        dep.require(CoordinatorState.ACCEPTING_MARBLES)
        return dep.update_log, decode_head(dep.update_log_head)

    # ------------------------------------------------------------------ Marble API operations
    # (activations.py: both activation protocols share one path; monotonic counters)

    @property
    def prepared(self) -> PreparedDeployment:
        """The current snapshot's preparation for activations (compiled templates, leaf issuer)."""
        return self._prepared

    def challenge(self) -> bytes:
        return self.marbles.challenge()

    async def activate(self, body: bytes, source: str = "") -> ActivationOutcome:
        """marblekeep's protocol: one activation request body → the sealed Parameters."""
        return await self.marbles.activate_hpke(body, source)


async def _join_by_handover(
    inner: Store,
    config: CoordinatorConfig,
    seal_providers: Mapping[SealMode, KeyEncryptionKeyProvider],
    replica_id: str,
    verifier: EvidenceVerifier | None,
    quote_issuer: EvidenceIssuer | None,
    clock: Clock,
    rng: Rng,
) -> Opened | None:
    """Obtain the deployment KEK from a running replica and open the state with it (None: nobody
    handed it over within ``config.handover_wait``; the caller enters Recovery)."""
    provider = seal_providers.get(SealMode.PRODUCT_KEY) or seal_providers.get(SealMode.UNIQUE_KEY)
    if provider is None or config.handover_wait <= 0:
        return None
    log.info(
        "this replica's key has no entry for the shared state: asking a running replica for the key",
        extra={"wait_s": config.handover_wait},
    )
    identity = Identity(config.simulation, quote_issuer, verifier or NoQuoteVerifier(), clock)
    client = HandoverClient(cast(MemberSource, inner), identity, replica_id, wait=config.handover_wait)
    got = await client.obtain()
    if got is None:
        return None
    dkek, floor = got
    try:
        opened = await open_sealed_store(inner, provider, rng=rng, deployment_kek=dkek, handover=floor)
    except (IntegrityError, RollbackError):
        raise
    except SealError as exc:
        log.error("the key handed over does not open the state", extra={"reason": exc.message})
        return None
    if not isinstance(opened, Opened):
        return None
    log.info(
        "joined by key hand-over: own key entry stored, rollback anchor seeded",
        extra={"epoch": opened.store.epoch},
    )
    return opened


async def _in_thread_to_the_end(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)`` in a worker thread. If the caller is cancelled (a client went away), wait
    for the thread to finish before passing the cancellation on, so the caller's lock is never
    released while the thread still works on the state it protects."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait({job})
        if not job.cancelled():
            job.exception()  # retrieved: the caller is gone, its outcome with it
        raise


def _first_manifest(dep: Deployment, manifest: Manifest, now: dt.datetime, rng: Rng) -> Deployment:
    """The deployment with its first manifest (secrets generated) and the update log's first entry."""
    return log_initial_manifest(set_manifest(dep, manifest, now, rng), now)
