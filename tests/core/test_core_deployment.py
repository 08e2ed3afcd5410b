"""new_deployment and set_manifest: the CA set, the root and seal master secrets, shared secrets,
the manifest signature and the state machine."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable

import pytest
from core_support import NOW, deploy, manifest_dict, run
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from marblekeep.core.deployment import CoordinatorState, new_deployment, set_manifest
from marblekeep.errors import StateError
from marblekeep.manifest import load_manifest


def cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def counting_rng() -> tuple[list[bytes], Callable[[int], bytes]]:
    counter = itertools.count(1)
    drawn: list[bytes] = []

    def rng(n: int) -> bytes:
        value = bytes([next(counter) % 256]) * n
        drawn.append(value)
        return value

    return drawn, rng


def test_a_new_deployment_accepts_a_manifest_and_has_a_ca() -> None:
    dep = new_deployment(["localhost", "coordinator.example"], NOW)
    assert dep.state is CoordinatorState.ACCEPTING_MANIFEST
    assert dep.manifest is None
    ca = dep.ca
    assert cn(ca.root.cert) == "MarbleRun Coordinator"
    assert cn(ca.intermediate.cert) == "MarbleRun Coordinator - Intermediate CA"
    ca.intermediate.cert.verify_directly_issued_by(ca.root.cert)
    ca.marble_root.cert.verify_directly_issued_by(ca.marble_root.cert)  # self-signed sibling
    assert ca.marble_root.cert.subject == ca.intermediate.cert.subject
    assert ca.marble_root.key_pkcs8_der() == ca.intermediate.key_pkcs8_der()
    assert isinstance(ca.root.key.curve, ec.SECP384R1)
    san = ca.root.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example" in san.get_values_for_type(x509.DNSName)


def test_root_and_seal_master_secrets_come_from_the_injected_rng() -> None:
    drawn, rng = counting_rng()
    dep = new_deployment(["localhost"], NOW, rng)
    assert len(dep.root_secret) == len(dep.seal_master_secret) == 32
    assert dep.root_secret != dep.seal_master_secret
    assert dep.root_secret in drawn and dep.seal_master_secret in drawn


def test_two_deployments_have_different_identities() -> None:
    a, b = new_deployment(["localhost"], NOW), new_deployment(["localhost"], NOW)
    assert a.ca.root.cert_der != b.ca.root.cert_der
    assert a.root_secret != b.root_secret
    assert a.seal_master_secret != b.seal_master_secret


def test_set_manifest_moves_to_accepting_marbles_and_signs_the_raw_bytes() -> None:
    fresh = new_deployment(["localhost"], NOW)
    raw = json.dumps(manifest_dict(), indent=3).encode()  # odd formatting: the signature is over these bytes
    dep = set_manifest(fresh, load_manifest(raw), NOW)
    assert dep.state is CoordinatorState.ACCEPTING_MARBLES
    assert dep.manifest is not None and dep.manifest.raw == raw
    public = dep.ca.root.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(dep.manifest_signature, raw, ec.ECDSA(hashes.SHA256()))
    # The CA and the two master secrets are kept.
    assert dep.ca is fresh.ca
    assert dep.root_secret == fresh.root_secret
    assert dep.seal_master_secret == fresh.seal_master_secret
    assert dep.activations == {}


def test_set_manifest_generates_shared_secrets_and_stores_definitions() -> None:
    dep = deploy()
    shared = dep.secrets["shared_key"]
    assert len(shared.private) == 32 and shared.public == shared.private
    cert_secret = dep.secrets["service_cert"]
    assert cert_secret.cert is not None and cert_secret.private
    x509.load_der_x509_certificate(cert_secret.cert).verify_directly_issued_by(dep.ca.marble_root.cert)
    # Per-Marble and user-defined secrets are definitions without a value.
    for name in ("marble_key", "own_cert", "api_token", "user_cert"):
        assert not dep.secrets[name].private, name
        assert dep.secrets[name].cert is None, name
    assert set(dep.secrets) == set(manifest_dict()["Secrets"])
    assert dep.previous_secrets == dep.secrets


def test_shared_secrets_differ_between_deployments() -> None:
    assert deploy().secrets["shared_key"].private != deploy().secrets["shared_key"].private


def test_a_second_manifest_is_refused() -> None:
    dep = deploy()
    assert dep.manifest is not None
    with pytest.raises(StateError, match="server is not in expected state"):
        set_manifest(dep, dep.manifest, NOW)


def test_a_manifest_can_be_set_in_recovery() -> None:
    fresh = dataclasses.replace(new_deployment(["localhost"], NOW), state=CoordinatorState.RECOVERY)
    dep = set_manifest(fresh, load_manifest(json.dumps(manifest_dict()).encode()), NOW)
    assert dep.state is CoordinatorState.ACCEPTING_MARBLES
    run(dep)


def test_activation_before_and_after_the_manifest() -> None:
    # MarbleRun's core test: fails before the manifest is set, succeeds after.
    fresh = new_deployment(["localhost"], NOW)
    with pytest.raises(StateError):
        run(fresh)
    run(set_manifest(fresh, load_manifest(json.dumps(manifest_dict()).encode()), NOW))
