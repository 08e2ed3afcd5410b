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
8. only then a limited type's counter is committed (under the lock), so a request that fails at any
   step uses up no activation.

Activations of a type with ``MaxActivations`` run steps 6–8 under the Coordinator's lock, so the count
is exact whichever protocol each Marble speaks; unlimited types read the snapshot and write nothing.

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
from marblekeep.core.activation import ActivationInput, ActivationResult, activate, refusal
from marblekeep.core.deployment import CoordinatorState
from marblekeep.crypto.pki import marble_identity
from marblekeep.errors import (
    AttestationError,
    AuthenticationError,
    AuthorizationError,
    CollateralError,
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
        """Steps 6–8: the core, the answer, the count (under the lock for a limited type)."""
        coord = self._coord
        manifest = coord.deployment.manifest
        marble = manifest.marbles.get(inp.marble_type) if manifest is not None else None
        if marble is None or marble.max_activations <= 0:
            _result, out = await self._render(inp, now, answer)
            return out

        async def attempt() -> T:
            # Answer before counting: a request that cannot be answered (e.g. a low-order HPKE key)
            # must not use up one of the type's activations.
            result, out = await self._render(inp, now, answer)
            if result.new_activation_count is not None:
                dep = coord.deployment
                counts = dict(dep.activations)
                counts[inp.marble_type] = result.new_activation_count
                await coord.commit(dataclasses.replace(dep, activations=counts))
            return out

        # Under the lock; exact across replicas: a count that lost the compare-and-set against
        # another replica is computed again on that replica's state.
        return await coord.mutate(attempt)

    async def _render(
        self, inp: ActivationInput, now: dt.datetime, answer: Callable[[ActivationResult], T]
    ) -> tuple[ActivationResult, T]:
        """The core and the answer in a worker thread (pure CPU work on the current snapshot), so
        that the event loop keeps serving meanwhile; rendering is bounded (core/activation.py)."""
        coord = self._coord
        prepared, simulation, rng = coord.prepared, coord.simulation, coord.rng

        def work() -> tuple[ActivationResult, T]:
            result = activate(prepared, inp, now, simulation=simulation, rng=rng)
            return result, answer(result)

        return await asyncio.to_thread(work)

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
