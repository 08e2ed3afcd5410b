"""The activation core: one pure function from (deployment, Marble, verified claims) to Parameters.

:func:`activate` decides whether a Marble may start and, if so, renders everything it receives.
It does no I/O. Time and randomness are parameters; the caller (the service) has already verified
the evidence and the request binding, and persists the new activation counter it returns.

Order of checks (MarbleRun's, §5.3 of the reference, plus the nil-UUID rule):

1. the Coordinator accepts Marbles (state 3), else :class:`StateError` (the premain retries);
2. the Marble type exists, and its package exists;
3. evidence: simulation evidence only in simulation mode; outside simulation the package policy
   (measurements, TCB status, advisories, debug) must accept the verified claims;
4. ``MaxActivations`` is not exhausted;
5. the UUID is not the nil UUID;
5a. the Marble's DNS names and IPs are not the Coordinator's own (:mod:`.marblenames`);
6. credentials are issued and Files/Env rendered; a template that cannot be rendered (for example
   an unset user-defined secret) refuses the activation and names the entry.

Every refusal is an :class:`ActivationRefused` with a ``reason`` label (for metrics) and a message
that names what failed and how to fix it. No secret value ever enters a message.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from cryptography import x509

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.policy import check_package
from marblekeep.core.deployment import CoordinatorState, Deployment
from marblekeep.core.marblenames import CoordinatorNames, check_marble_names, coordinator_names
from marblekeep.crypto.pki import IssuedLeaf, LeafIssuer, der_to_pem
from marblekeep.crypto.secretgen import derive_seal_key, generate_marble_secrets
from marblekeep.errors import (
    ActivationRefused,
    AttestationError,
    MarbleKeepError,
    RenderLimitError,
    StateError,
    TemplateError,
)
from marblekeep.manifest.limits import MAX_PARAMETERS_BYTES
from marblekeep.manifest.model import FileEntry, Marble, Secret
from marblekeep.templating import FunctionSet, ReservedSecret, Template, TemplateData, parse_template

__all__ = [
    "ActivationInput",
    "ActivationResult",
    "PreparedDeployment",
    "activate",
    "max_activations_refusal",
    "refusal",
]

Rng = Callable[[int], bytes]

ENV_ROOT_CA = "MARBLE_PREDEFINED_ROOT_CA"
ENV_CERT_CHAIN = "MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"
ENV_PRIVATE_KEY = "MARBLE_PREDEFINED_PRIVATE_KEY"
ENV_COORDINATOR_ROOT_CA = "MARBLE_PREDEFINED_COORDINATOR_ROOT_CA"
ENV_TTLS_CONFIG = "MARBLE_TTLS_CONFIG"
_NIL_UUID = UUID(int=0)


def refusal(reason: str, message: str) -> ActivationRefused:
    return ActivationRefused(message, reason=reason)


def max_activations_refusal(marble_type: str, limit: int) -> ActivationRefused:
    """The refusal of an activation beyond the type's ``MaxActivations`` (MarbleRun's words)."""
    return refusal(
        "max_activations",
        f"reached max activations count ({limit}) for marble type "
        f"{marble_type!r}: raise Marbles.{marble_type}.MaxActivations in a manifest update",
    )


@dataclass(frozen=True)
class ActivationInput:
    """One Marble asking to start, whichever protocol it spoke; its evidence is verified and bound."""

    marble_type: str
    uuid: UUID
    dns_names: tuple[str, ...]
    claims: TeeClaims
    #: The Marble certificate's subject when it is more than ``CN=<uuid>`` (MarbleRun's protocol
    #: copies attributes from the CSR); None: ``CN=<uuid>``.
    subject: x509.Name | None = None


@dataclass(frozen=True)
class ActivationResult:
    files: Mapping[str, bytes] = field(repr=False)
    env: Mapping[str, bytes] = field(repr=False)
    argv: tuple[str, ...]
    #: The Marble type's new activation count to persist, or None when the type is unlimited
    #: (unlimited Marbles cause no state write, as in MarbleRun).
    new_activation_count: int | None


@dataclass(frozen=True)
class _Entry:
    name: str
    template: Template | None  # None: NoTemplates, deliver ``raw`` verbatim
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class _PreparedMarble:
    marble: Marble
    files: tuple[_Entry, ...]
    env: tuple[_Entry, ...]
    uses_previous: bool
    #: The template sources (to name unset user-defined secrets in a refusal).
    sources: tuple[bytes, ...]


def _compile(
    marble_type: str, kind: str, entries: Mapping[str, FileEntry], fs: FunctionSet
) -> tuple[_Entry, ...]:
    out: list[_Entry] = []
    for name, entry in entries.items():
        if entry.no_templates:
            out.append(_Entry(name, None, entry.data))
            continue
        try:
            out.append(_Entry(name, parse_template(entry.data, fs), entry.data))
        except TemplateError as exc:  # validated manifests parse; keep the path if one does not
            raise refusal(
                "parameters", f"Marbles.{marble_type}.Parameters.{kind}.{name}: {exc.message}"
            ) from None
    return tuple(out)


class PreparedDeployment:
    """Everything about a :class:`Deployment` that does not depend on the activating Marble,
    computed once per deployment snapshot: compiled templates, the leaf issuer, the reserved
    certificates in each encoding, the shared secret map."""

    def __init__(
        self,
        dep: Deployment,
        previous: PreparedDeployment | None = None,
        *,
        coordinator_dns_names: Sequence[str] = (),
    ) -> None:
        """``previous``: the preparation of the snapshot before ``dep``; what depends only on
        the CA and the manifest is reused from it when those did not change (a secret write).
        ``coordinator_dns_names``: the Coordinator's configured names (EDG_COORDINATOR_DNS_NAMES),
        which Marbles may not ask for, besides the root's SANs (core/marblenames.py)."""
        self.deployment = dep
        ca = dep.ca
        configured = tuple(coordinator_dns_names)
        same_ca = previous is not None and previous.deployment.ca is ca
        self._configured_names = configured
        # a commit that changed only counts or secrets re-prepares often: reuse what the CA fixes
        self.coordinator_names: CoordinatorNames = (
            previous.coordinator_names
            if previous is not None and same_ca and previous._configured_names == configured
            else coordinator_names(ca.root.cert, configured)
        )
        self.leaf_issuer: LeafIssuer = (
            previous.leaf_issuer if previous is not None and same_ca else LeafIssuer(ca.marble_root)
        )
        self.root_ca = ReservedSecret(cert=ca.marble_root.cert_der)
        self.coordinator_root = ReservedSecret(cert=ca.root.cert_der)
        self.coordinator_intermediate = ReservedSecret(cert=ca.intermediate.cert_der)
        self.marble_root_pem = ca.marble_root.cert_pem
        self.intermediate_pem = ca.intermediate.cert_pem
        self.root_pem = ca.root.cert_pem
        self.marbles: dict[str, _PreparedMarble] = {}
        manifest = dep.manifest
        if manifest is None:
            return
        if previous is not None and previous.deployment.manifest is manifest:
            self.marbles = previous.marbles
            return
        for marble_type, marble in manifest.marbles.items():
            files = _compile(marble_type, "Files", marble.parameters.files, FunctionSet.FILES)
            env = _compile(marble_type, "Env", marble.parameters.env, FunctionSet.ENV)
            sources = tuple(e.raw for e in (*files, *env) if e.template is not None)
            self.marbles[marble_type] = _PreparedMarble(
                marble=marble,
                files=files,
                env=env,
                uses_previous=any(b"Previous" in s for s in sources),
                sources=sources,
            )


def _check_evidence(dep: Deployment, inp: ActivationInput, package_name: str, simulation: bool) -> None:
    claims = inp.claims
    if claims.kind is TeeKind.SIMULATION:
        if not simulation:
            raise refusal(
                "attestation",
                "simulation evidence was sent to a Coordinator that is not in simulation mode: run the "
                "Marble inside a TEE (SGX/TDX) so that it sends a real quote",
            )
        return
    if simulation:
        # As MarbleRun: a simulation Coordinator skips the package's measurement checks.
        return
    assert dep.manifest is not None
    package = dep.manifest.packages[package_name]
    try:
        check_package(package_name, package, claims)
    except AttestationError as exc:
        raise ActivationRefused(
            f"marble verification failed: {exc.message}", reason="attestation", problems=exc.problems
        ) from None


def _per_marble_secrets(
    dep: Deployment,
    definitions: Mapping[str, Secret],
    root_secret: bytes,
    inp: ActivationInput,
    marble: Marble,
    now: dt.datetime,
    rng: Rng,
) -> dict[str, Secret]:
    if not any(not s.shared and not s.user_defined for s in definitions.values()):
        return {}
    return generate_marble_secrets(
        definitions,
        root_secret=root_secret,
        uuid=inp.uuid,
        marble_type=inp.marble_type,
        disable_binding=marble.disable_secret_binding,
        issuer=dep.ca.marble_root,
        now=now,
        rng=rng,
    )


def _ttls_config(dep: Deployment, marble: Marble, leaf: IssuedLeaf, secrets: Mapping[str, Secret]) -> bytes:
    """MarbleRun's MARBLE_TTLS_CONFIG JSON (reference §2.7): later tags overwrite earlier ones."""
    assert dep.manifest is not None
    cacrt = dep.ca.marble_root.cert_pem.decode()
    clicrt, clikey = leaf.cert_pem.decode(), leaf.key_pem.decode()
    incoming: dict[str, dict[str, object]] = {}
    outgoing: dict[str, dict[str, object]] = {}
    for tag_name in marble.tls:
        tag = dep.manifest.tls[tag_name]
        for out in tag.outgoing:
            outgoing[f"{out.addr}:{out.port}"] = {"cacrt": cacrt, "clicrt": clicrt, "clikey": clikey}
        for inc in tag.incoming:
            entry: dict[str, object] = {
                "cacrt": cacrt,
                "clicrt": clicrt,
                "clikey": clikey,
                "clientAuth": True,
            }
            if inc.cert:
                secret = secrets.get(inc.cert)
                if secret is None or secret.cert is None or not secret.private:
                    raise refusal(
                        "parameters",
                        f"TLS.{tag_name}.Incoming: certificate secret {inc.cert!r} has no value yet",
                    )
                entry["clicrt"] = der_to_pem(secret.cert, "CERTIFICATE").decode()
                entry["clikey"] = der_to_pem(secret.private, "PRIVATE KEY").decode()
                entry["clientAuth"] = not inc.disable_client_auth
            incoming[f"*:{inc.port}"] = entry
    doc = {"tls": {"Incoming": dict(sorted(incoming.items())), "Outgoing": dict(sorted(outgoing.items()))}}
    return json.dumps(doc, separators=(",", ":")).encode()


def _too_large(marble_type: str) -> ActivationRefused:
    return refusal(
        "parameters",
        f"customizing marble parameters: Marbles.{marble_type}.Parameters render to more than the limit of "
        f"{MAX_PARAMETERS_BYTES} bytes (Files, Env and Argv): make them smaller in a manifest update",
    )


def _render(
    prepared_marble: _PreparedMarble,
    marble_type: str,
    entries: tuple[_Entry, ...],
    kind: str,
    data: TemplateData,
    budget: list[int],
) -> dict[str, bytes]:
    """Render ``entries``; ``budget[0]`` is what the Marble's Parameters may still take (bytes)."""
    out: dict[str, bytes] = {}
    for entry in entries:
        budget[0] -= len(entry.name.encode())
        if entry.template is None:
            budget[0] -= len(entry.raw)
            if budget[0] < 0:
                raise _too_large(marble_type)
            out[entry.name] = entry.raw
            continue
        try:
            out[entry.name] = value = entry.template.execute(data, limit=max(0, budget[0]))
            budget[0] -= len(value)
        except RenderLimitError:
            raise _too_large(marble_type) from None
        except TemplateError as exc:
            unset = sorted(
                n
                for n, s in data.secrets.items()
                if s.user_defined
                and not (s.public or s.private or s.cert)
                and any(n.encode() in source for source in prepared_marble.sources)
            )
            hint = ""
            if unset:
                hint = (
                    f" (user-defined secret(s) {', '.join(unset)} not set yet: "
                    "set them with `marblekeep secret set`)"
                )
            raise refusal(
                "parameters",
                f"customizing marble parameters: Marbles.{marble_type}.Parameters.{kind}.{entry.name}: "
                f"{exc.message}{hint}",
            ) from None
    return out



def activate(
    prepared: PreparedDeployment,
    inp: ActivationInput,
    now: dt.datetime,
    *,
    simulation: bool,
    rng: Rng = os.urandom,
) -> ActivationResult:
    """Decide and render one Marble activation. Raises :class:`StateError` (not ready yet) or
    :class:`ActivationRefused` (with ``reason``); see the module docstring for the order."""
    dep = prepared.deployment
    if dep.state is not CoordinatorState.ACCEPTING_MARBLES:
        raise StateError("cannot accept marbles in current state: set a manifest first")
    manifest = dep.manifest
    assert manifest is not None
    pm = prepared.marbles.get(inp.marble_type)
    if pm is None:
        raise refusal(
            "unknown_type",
            f"marble verification failed: unknown marble type {inp.marble_type!r} requested "
            f"(the manifest defines: {', '.join(sorted(manifest.marbles)) or 'none'})",
        )
    marble = pm.marble
    if marble.package not in manifest.packages:
        raise refusal(
            "undefined_package", f"marble verification failed: undefined package {marble.package!r}"
        )
    _check_evidence(dep, inp, marble.package, simulation)

    count = dep.activations.get(inp.marble_type, 0)
    new_count: int | None = None
    if marble.max_activations > 0:
        if count >= marble.max_activations:
            raise max_activations_refusal(inp.marble_type, marble.max_activations)
        new_count = count + 1
    if inp.uuid == _NIL_UUID:
        raise refusal("invalid_uuid", "the nil UUID is not a valid Marble UUID: use a random (v4) UUID")
    check_marble_names(inp.dns_names, prepared.coordinator_names)

    try:
        leaf = prepared.leaf_issuer.issue(inp.uuid, inp.marble_type, inp.dns_names, now, subject=inp.subject)
        per_marble = _per_marble_secrets(dep, manifest.secrets, dep.root_secret, inp, marble, now, rng)
    except MarbleKeepError as exc:
        raise refusal("parameters", f"issuing credentials: {exc.message}") from None
    secrets: Mapping[str, Secret] = {**dep.secrets, **per_marble} if per_marble else dep.secrets
    previous: Mapping[str, Secret] = secrets
    if pm.uses_previous:
        prev_root = dep.previous_root_secret or dep.root_secret
        prev_marble = _per_marble_secrets(dep, dep.previous_secrets, prev_root, inp, marble, now, rng)
        previous = {**dep.previous_secrets, **prev_marble}

    data = TemplateData(
        root_ca=prepared.root_ca,
        marble_cert=ReservedSecret(cert=leaf.cert_der, public=leaf.public_der, private=leaf.key_pkcs8_der),
        coordinator_root=prepared.coordinator_root,
        coordinator_intermediate=prepared.coordinator_intermediate,
        seal_key=derive_seal_key(dep.seal_master_secret, inp.uuid),
        secrets=secrets,
        previous_secrets=previous,
    )
    # Bounded (docs/manifest.md, "Limits"): the dry run checked the manifest with placeholders;
    # this is the backstop with the real values, and it stops rendering at the limit.
    budget = [MAX_PARAMETERS_BYTES - sum(len(a.encode()) for a in marble.parameters.argv)]
    files = _render(pm, inp.marble_type, pm.files, "Files", data, budget)
    env = _render(pm, inp.marble_type, pm.env, "Env", data, budget)
    # Predefined variables override same-named manifest entries (as MarbleRun).
    env[ENV_ROOT_CA] = prepared.marble_root_pem
    env[ENV_CERT_CHAIN] = leaf.cert_pem + prepared.intermediate_pem
    env[ENV_PRIVATE_KEY] = leaf.key_pem
    env[ENV_COORDINATOR_ROOT_CA] = prepared.root_pem
    if marble.tls:
        env[ENV_TTLS_CONFIG] = _ttls_config(dep, marble, leaf, secrets)
    predefined = (ENV_ROOT_CA, ENV_CERT_CHAIN, ENV_PRIVATE_KEY, ENV_COORDINATOR_ROOT_CA, ENV_TTLS_CONFIG)
    if budget[0] < sum(len(name) + len(env[name]) for name in predefined if name in env):
        raise _too_large(inp.marble_type)
    return ActivationResult(files=files, env=env, argv=marble.parameters.argv, new_activation_count=new_count)
