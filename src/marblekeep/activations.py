"""Marble operations of the Coordinator: activation by either protocol, and monotonic counters.

Both activation protocols run **one path**; they differ only in how the evidence is bound:

1. parse and bound the request — ours: the JSON body (400); MarbleRun's: the protobuf message, the
   UUID and the CSR, whose signature must verify (InvalidArgument);
2. ours only: consume the challenge nonce (403 ``replay``; 429 past the used-nonce set's bounds); a
   TLS handshake is fresh by itself;
3. the state accepts Marbles (409 / FailedPrecondition);
4. MarbleRun's only: the Marble presented a TLS client certificate (Unauthenticated);
5. the evidence verifies and is bound — ours: report data = the binding digest of every request
   field; MarbleRun's: report data[0:32] = SHA-256 of the client certificate of *this* handshake
   (an empty quote is accepted only in simulation);
6. the core, the same function for both (core/activation.py): type, package, package policy,
   ``MaxActivations``, nil UUID, credentials, templates;
7. the answer — ours: the Parameters sealed with HPKE; MarbleRun's: ``rpc.ActivationResp``;
8. only then a limited type's counter is committed, so a request that fails at any step uses up no
   activation.

Steps 6–7 (the expensive part: the Marble's key and certificate) run in a worker thread on the
current snapshot, outside the Coordinator's lock, for every type. A type with ``MaxActivations`` then
claims its slot (:class:`_Counts`): under the lock, the claims waiting at that moment are checked
against the **current** state and counted in **one** commit (a group commit), in the order they
came: each gets a slot while the type has one left, the others are refused; no claim is answered
before that commit is durable. A claim rendered on a snapshot that has since changed in anything but
the counts (a secret, the manifest, the keys) is rendered again on the new one; a commit that lost
the compare-and-set against another replica is re-checked on that replica's state and committed
again, without rendering again. So the count is exact, across replicas and protocols, and an answer
always matches the state its count was committed on; unlimited types read the snapshot and write
nothing.

Monotonic counters (MarbleRun's ``MonotonicCounter`` feature): a Marble, authenticated by the Marble
certificate it got at activation, raises a named counter; the value only grows; the answer is the
previous value. Counters are part of the sealed state (``monotonicCounter:<id>``, 8-byte LE).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from cryptography import x509

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.evidence import parse_header, strip_oe_header
from marblekeep.core.activation import (
    ActivationInput,
    ActivationResult,
    activate,
    max_activations_refusal,
    refusal,
)
from marblekeep.core.deployment import CoordinatorState, Deployment
from marblekeep.crypto.pki import marble_identity
from marblekeep.errors import (
    AttestationError,
    AuthenticationError,
    AuthorizationError,
    CollateralError,
    ConflictError,
    RequestError,
    StateError,
    TooManyRequests,
)
from marblekeep.marble.marblerun import (
    expected_report_data_prefix,
    leaf_subject,
    parse_marblerun_request,
)
from marblekeep.marble.marblerun_wire import ActivationReq, MarbleRunParameters, encode_activation_resp
from marblekeep.marble.protocol import (
    REPORT_DATA_SIZE,
    ChallengeVerdict,
    EvidenceType,
    MarbleParameters,
    expected_report_data,
    parse_activation_request,
    seal_parameters,
)
from marblekeep.replica import CONFLICT_RETRIES

if TYPE_CHECKING:
    from marblekeep.service import Coordinator

__all__ = [
    "MAX_COUNTER_NAME_BYTES",
    "ActivationOutcome",
    "MarbleActivations",
    "counter_id",
]

log = logging.getLogger("marblekeep.coordinator")

T = TypeVar("T")

NOT_ACCEPTING = "cannot accept marbles in current state: set a manifest first"
#: Parameters that rendered to at most this many bytes are rendered on the event loop next time
#: (:meth:`MarbleActivations._render`); larger ones, and every first render, in a worker thread.
INLINE_RENDER_MAX_BYTES = 64 * 1024
MAX_COUNTER_NAME_BYTES = 1024
_U64 = 1 << 64


@dataclass(frozen=True)
class ActivationOutcome:
    """What the edge sends back: ``payload`` is the sealed Parameters (ours) or the encoded
    ``rpc.ActivationResp`` (MarbleRun's)."""

    payload: bytes = field(repr=False)
    marble_type: str
    uuid: str

    @property
    def sealed(self) -> bytes:  # the name of our protocol's payload
        return self.payload


def counter_id(marble_type: str, uuid_bytes: bytes, name: str) -> str:
    """MarbleRun's counter ID: base64(type) ":" base64(16 UUID bytes) ":" base64(name), standard base64."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"{b64(marble_type.encode('utf-8'))}:{b64(uuid_bytes)}:{b64(name.encode('utf-8'))}"


class MarbleActivations:
    """The Marble-facing operations of one :class:`~marblekeep.service.Coordinator`."""

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord
        self._counts = _Counts(coord)
        #: Rendered size of each Marble type's Parameters at its last activation on ``_sizes_dep``
        #: (reset when the state changes in more than its counts): see :meth:`_render`.
        self._sizes_dep: Deployment | None = None
        self._sizes: dict[str, int] = {}

    # ------------------------------------------------------------------ evidence

    async def _verified_claims(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims:
        try:
            return await self._coord.verifier.verify(evidence_type, evidence, now)
        except CollateralError as exc:
            # The Coordinator's collateral is missing or expired: its problem, not the Marble's. It is
            # retryable (503 / Unavailable) while the collateral is refreshed.
            log.error("cannot verify a Marble's quote", extra={"reason": exc.message})
            raise
        except AttestationError as exc:
            raise refusal("attestation", f"invalid quote: {exc.message}") from None

    async def _claims_hpke(
        self, evidence_type: str, evidence: bytes, expected: bytes, now: dt.datetime
    ) -> TeeClaims:
        if evidence_type == EvidenceType.SIMULATION:
            if not self._coord.simulation:
                raise refusal(
                    "attestation",
                    "simulation evidence was sent to a Coordinator that is not in simulation mode: run the "
                    "Marble inside a TEE (SGX/TDX) so that it sends a real quote",
                )
            if not hmac.compare_digest(evidence, expected):
                raise refusal(
                    "binding", "simulation evidence does not match the activation request's binding"
                )
            return TeeClaims(kind=TeeKind.SIMULATION, report_data=evidence)
        claims = await self._verified_claims(evidence_type, evidence, now)
        # All 64 bytes (docs/protocol.md §4.1): the digest and the 32 zero bytes after it.
        if not hmac.compare_digest(claims.report_data, expected):
            raise refusal(
                "binding",
                "the quote's report data does not match the activation request's binding (nonce, key, "
                "type, UUID or DNS names were altered, or the quote belongs to another request)",
            )
        return claims

    async def _claims_marblerun(self, quote: bytes, client_cert_der: bytes, now: dt.datetime) -> TeeClaims:
        expected = expected_report_data_prefix(client_cert_der)
        if not quote:
            if not self._coord.simulation:
                raise refusal(
                    "attestation",
                    "invalid quote: the Marble sent an empty quote (its premain could not produce one; it "
                    "is not running inside an enclave): only a Coordinator in simulation mode accepts it",
                )
            return TeeClaims(kind=TeeKind.SIMULATION, report_data=expected + bytes(REPORT_DATA_SIZE - 32))
        try:
            kind = parse_header(strip_oe_header(quote)).kind
        except AttestationError as exc:
            raise refusal("attestation", f"invalid quote: {exc.message}") from None
        evidence_type = EvidenceType.TDX if kind is TeeKind.TDX else EvidenceType.SGX_DCAP
        claims = await self._verified_claims(evidence_type, quote, now)
        if not hmac.compare_digest(claims.report_data[:32], expected):
            raise refusal(
                "binding",
                "invalid quote: its report data is not SHA-256 of the TLS client certificate presented on "
                "this connection (the quote was made for another certificate)",
            )
        return claims

    # ------------------------------------------------------------------ the one path

    async def _activate(
        self, inp: ActivationInput, now: dt.datetime, answer: Callable[[ActivationResult], T]
    ) -> T:
        """Steps 6–8: the core and the answer (outside the lock), then the count of a limited type."""
        for _ in range(CONFLICT_RETRIES):
            result, out, rendered_on = await self._render(inp, now, answer)
            if result.new_activation_count is None:  # no MaxActivations in the snapshot it was rendered on
                return out
            # Answer before counting: a request that cannot be answered (e.g. a low-order HPKE key)
            # must not use up one of the type's activations.
            if await self._counts.claim(inp.marble_type, rendered_on):
                return out
            # the state changed in more than the counts since the render: render again on it
        raise ConflictError("the state kept changing while this activation was prepared; retry")

    async def _render(
        self, inp: ActivationInput, now: dt.datetime, answer: Callable[[ActivationResult], T]
    ) -> tuple[ActivationResult, T, Deployment]:
        """The core and the answer on the current snapshot (which is returned too): pure CPU work,
        bounded (core/activation.py), run in a worker thread so that the event loop keeps serving
        meanwhile, unless this Marble type's Parameters rendered to at most
        :data:`INLINE_RENDER_MAX_BYTES` at its last activation on the same state (counts aside):
        then the work (mostly the Marble's key and certificate, well under a millisecond) runs on the
        event loop, which saves the hand-over to a thread and back. After any other change (a
        manifest, secrets, keys) the first activation of each type runs in a thread again."""
        coord = self._coord
        prepared, simulation, rng = coord.prepared, coord.simulation, coord.rng
        dep = prepared.deployment
        if self._sizes_dep is None or not same_but_counts(self._sizes_dep, dep):
            self._sizes = {}
        self._sizes_dep = dep
        sizes = self._sizes

        def work() -> tuple[ActivationResult, T]:
            result = activate(prepared, inp, now, simulation=simulation, rng=rng)
            return result, answer(result)

        if sizes.get(inp.marble_type, INLINE_RENDER_MAX_BYTES + 1) <= INLINE_RENDER_MAX_BYTES:
            result, out = work()
        else:
            result, out = await asyncio.to_thread(work)
        sizes[inp.marble_type] = sum(map(len, result.files.values())) + sum(map(len, result.env.values()))
        return result, out, dep

    def _require_accepting(self) -> None:
        if self._coord.state is not CoordinatorState.ACCEPTING_MARBLES:
            raise StateError(NOT_ACCEPTING)

    # ------------------------------------------------------------------ marblekeep's protocol

    def challenge(self) -> bytes:
        return self._coord.challenges.issue(self._coord.clock(), self._coord.rng)

    def _consume_challenge(self, nonce: bytes, now: dt.datetime, source: str) -> None:
        book = self._coord.challenges
        verdict = book.consume(nonce, now, source)
        if verdict is ChallengeVerdict.ACCEPTED:
            return
        if verdict.fresh_challenge_helps:
            what = {
                ChallengeVerdict.UNKNOWN: "this one is unknown: not issued by this Coordinator, or before it "
                "restarted",
                ChallengeVerdict.EXPIRED: f"this one expired: a challenge is valid for {book.ttl.seconds} s",
                ChallengeVerdict.USED: "this one was already used: a replayed request?",
            }[verdict]
            raise refusal(
                "replay",
                f"unknown, expired or already used challenge nonce ({what}): request a new challenge and "
                "activate again",
            )
        log.warning("activation request refused: too many from one address", extra={"source": source})
        raise TooManyRequests(
            "too many activation requests within a minute "
            + ("from this address" if verdict is ChallengeVerdict.SOURCE_BUSY else "in all")
            + ": retry later"
        )

    async def activate_hpke(self, body: bytes, source: str = "") -> ActivationOutcome:
        """Our protocol (docs/protocol.md §1-7): one activation request body → sealed Parameters.

        ``source`` is the client's quota key for the used-nonce set (``client_source``).
        Raises RequestError (malformed), StateError (not ready: retry later), ActivationRefused,
        TooManyRequests or CollateralError (retry later)."""
        coord = self._coord
        req = parse_activation_request(body)
        now = coord.clock()
        self._consume_challenge(req.nonce, now, source)
        self._require_accepting()
        claims = await self._claims_hpke(req.evidence_type, req.evidence, expected_report_data(req), now)
        inp = ActivationInput(req.marble_type, req.uuid, req.dns_names, claims)

        def seal(result: ActivationResult) -> bytes:
            params = MarbleParameters(files=result.files, env=result.env, argv=result.argv)
            return seal_parameters(params, req)

        return ActivationOutcome(await self._activate(inp, now, seal), req.marble_type, str(req.uuid))

    # ------------------------------------------------------------------ MarbleRun's protocol

    async def activate_marblerun(
        self, msg: ActivationReq, client_cert_der: bytes | None
    ) -> ActivationOutcome:
        """MarbleRun's ``rpc.Marble/Activate``: ``client_cert_der`` is the leaf certificate the Marble
        presented in this connection's TLS handshake (None: none). Returns the encoded
        ``rpc.ActivationResp``. Raises as :meth:`activate_hpke`, plus AuthenticationError."""
        coord = self._coord
        req = parse_marblerun_request(msg)
        now = coord.clock()
        self._require_accepting()
        if not client_cert_der:
            raise AuthenticationError(
                "the Marble presented no TLS client certificate: MarbleRun's protocol binds the quote to it"
            )
        claims = await self._claims_marblerun(req.quote, client_cert_der, now)
        subject = leaf_subject(req.uuid, req.subject_extra) if req.subject_extra else None
        inp = ActivationInput(req.marble_type, req.uuid, req.dns_names, claims, subject=subject)

        def encode(result: ActivationResult) -> bytes:
            params = MarbleRunParameters(files=result.files, env=result.env, argv=result.argv)
            return encode_activation_resp(params)

        return ActivationOutcome(await self._activate(inp, now, encode), req.marble_type, str(req.uuid))

    # ------------------------------------------------------------------ monotonic counters

    def authenticate_marble(self, client_cert_der: bytes | None) -> tuple[str, bytes]:
        """(Marble type, 16 UUID bytes) of the Marble whose certificate is ``client_cert_der``: it must
        verify against the **current** Marble root, have a UUID CN and the Marble-type extension
        (MarbleRun's rules; only the TLS leaf is considered). Raises AuthenticationError."""
        if not client_cert_der:
            raise AuthenticationError(
                "no client certificate: present the Marble certificate from the activation "
                "(MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN with MARBLE_PREDEFINED_PRIVATE_KEY)"
            )
        try:
            cert = x509.load_der_x509_certificate(client_cert_der)
        except ValueError:
            raise AuthenticationError("client certificate cannot be parsed") from None
        marble_type, uuid = marble_identity(cert, self._coord.deployment.ca.marble_root.cert)
        return marble_type, uuid.bytes

    def counter_client(self, client_cert_der: bytes | None) -> tuple[str, bytes]:
        """Who may use monotonic counters, checked in MarbleRun's order: the feature gate
        (AuthorizationError, 403), the state (StateError), the Marble certificate
        (AuthenticationError, 401). Returns (Marble type, 16 UUID bytes)."""
        dep = self._coord.deployment
        if dep.manifest is None or not dep.manifest.config.feature_enabled("MonotonicCounter"):
            raise AuthorizationError(
                "monotonic counters are disabled: add MonotonicCounter to the manifest's Config.FeatureGates"
            )
        dep.require(CoordinatorState.ACCEPTING_MARBLES)
        return self.authenticate_marble(client_cert_der)

    async def raise_counter(self, marble: tuple[str, bytes], name: object, value: object) -> int:
        """Raise ``marble``'s counter ``name`` to ``value`` if that is larger (atomically, under the
        Coordinator's lock; committed before returning). Returns the previous value (0 if unset).
        Raises RequestError for a bad name or value."""
        if not isinstance(name, str):
            raise RequestError("name: must be a string")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("name: must be valid Unicode text (no lone surrogate escapes)") from None
        if len(encoded) > MAX_COUNTER_NAME_BYTES:
            raise RequestError(f"name: longer than {MAX_COUNTER_NAME_BYTES} bytes")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
            raise RequestError("value: must be an unsigned 64-bit integer (0 to 18446744073709551615)")
        coord = self._coord
        key = counter_id(marble[0], marble[1], name)

        async def attempt() -> int:
            dep = coord.deployment
            dep.require(CoordinatorState.ACCEPTING_MARBLES)
            previous = dep.counters.get(key, 0)
            if value > previous:
                counters = dict(dep.counters)
                counters[key] = value
                await coord.commit(dataclasses.replace(dep, counters=counters))
            return previous

        return await coord.mutate(attempt)  # under the lock, recomputed if another replica won

    async def monotonic_counter(self, client_cert_der: bytes | None, name: object, value: object) -> int:
        """:meth:`counter_client` then :meth:`raise_counter`."""
        return await self.raise_counter(self.counter_client(client_cert_der), name, value)


# --------------------------------------------------------------------------------------------
# counting activations of limited types (group commit)

#: The fields of a Deployment that rendering an activation does not read.
_COUNT_FIELDS = frozenset({"activations", "counters"})
_RENDER_FIELDS = tuple(f.name for f in dataclasses.fields(Deployment) if f.name not in _COUNT_FIELDS)


def same_but_counts(rendered_on: Deployment, current: Deployment) -> bool:
    """Whether ``current`` differs from ``rendered_on`` at most in its counts (activation counts,
    monotonic counters), so that an answer rendered on the one is also the answer on the other.

    Compared by identity: a snapshot that only counts changed shares every other field with the
    one before (commits and the follower's counts-only apply use ``dataclasses.replace``). Two
    equal values read apart compare as changed, which costs a render, never a wrong answer."""
    return rendered_on is current or all(
        getattr(rendered_on, name) is getattr(current, name) for name in _RENDER_FIELDS
    )


@dataclass(eq=False)
class _Claim:
    """One rendered activation of a limited type, waiting for its slot."""

    marble_type: str
    rendered_on: Deployment
    #: True: counted, the commit is durable; False: render again; an exception: refused or failed.
    outcome: asyncio.Future[bool]


class _Counts:
    """Group commit of activation counts (module docstring, step 8).

    Claims queue up; one task at a time takes **all** waiting claims under the Coordinator's lock,
    decides each on the current state (in arrival order) and commits the new counts in one
    compare-and-set commit. Claims that arrive meanwhile form the next group. A group whose commit
    lost against another replica is decided again on that replica's state (which the failed commit
    read) and committed again; any other failure fails the whole group, and nothing of it counts."""

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord
        self._waiting: list[_Claim] = []
        self._task: asyncio.Task[None] | None = None
        #: Statistics (tests, the bench): commits made and claims they counted.
        self.commits = 0
        self.counted = 0

    async def claim(self, marble_type: str, rendered_on: Deployment) -> bool:
        """Count one activation of ``marble_type`` rendered on ``rendered_on``: True once counted and
        durable, False if the state changed beyond the counts (render again). Raises the refusal
        when the type has no activation left, or the commit's error."""
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Claim(marble_type, rendered_on, outcome))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="marblekeep-activation-counts")
        # A waiter that is cancelled (its client went away) cancels its claim: a claim not yet in a
        # commit takes no slot; one already in a commit is counted (as a commit whose reply was lost).
        return await outcome

    async def _run(self) -> None:
        try:
            while self._waiting:
                async with self._coord.lock:
                    group, self._waiting = self._waiting, []
                    await self._settle(group)
        except BaseException:  # cancelled (the Coordinator is closing): nobody may wait forever
            waiting, self._waiting = self._waiting, []
            for claim in waiting:
                claim.outcome.cancel()
            raise

    async def _settle(self, group: list[_Claim]) -> None:
        """Decide and commit one group (caller holds the lock); every claim's outcome is set."""
        coord = self._coord
        try:
            for _ in range(CONFLICT_RETRIES):
                await coord.catch_up_locked()
                dep = coord.deployment
                counts = dict(dep.activations)
                granted: list[_Claim] = []
                for claim in group:
                    if claim.outcome.done():  # its client went away: no slot taken
                        continue
                    if not same_but_counts(claim.rendered_on, dep) or dep.manifest is None:
                        claim.outcome.set_result(False)
                        continue
                    # the manifest is the one the claim was rendered on, which limits this type
                    limit = dep.manifest.marbles[claim.marble_type].max_activations
                    count = counts.get(claim.marble_type, 0)
                    if count >= limit:
                        claim.outcome.set_exception(max_activations_refusal(claim.marble_type, limit))
                        continue
                    counts[claim.marble_type] = count + 1
                    granted.append(claim)
                group = granted
                if not group:
                    return
                try:
                    await coord.commit(dataclasses.replace(dep, activations=counts))
                except ConflictError:
                    continue  # the commit re-read the winner's state: decide again on it
                self.commits += 1
                self.counted += len(group)
                for claim in group:
                    if not claim.outcome.done():
                        claim.outcome.set_result(True)
                return
            raise ConflictError("another Coordinator replica changed the state at the same time; retry")
        except Exception as exc:
            for claim in group:
                if not claim.outcome.done():
                    claim.outcome.set_exception(exc)
        except BaseException:
            for claim in group:
                claim.outcome.cancel()
            raise
