"""Helpers for the activation-core tests: a manifest exercising every feature, real deployments
(real CA, real secrets), TEE claims and refusal checks that look for leaked secret material."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.core.activation import ActivationInput, ActivationResult, PreparedDeployment, activate
from marblekeep.core.deployment import Deployment, new_deployment, set_manifest
from marblekeep.errors import ActivationRefused, MarbleKeepError
from marblekeep.manifest import load_manifest

NOW = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.UTC)
SIGNER = "5f" * 32
FRONTEND_MRENCLAVE = "c2720445a45267813688ff73fa188aa060c1b661aefaf1650d42f690697b5ab3"
UUID_A = UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
UUID_B = UUID("9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d")
NIL_UUID = UUID(int=0)

SIMULATED = TeeClaims(kind=TeeKind.SIMULATION, report_data=bytes(64))
BACKEND_SGX = TeeClaims(
    kind=TeeKind.SGX,
    report_data=bytes(64),
    tcb_status="UpToDate",
    mrenclave="aa" * 32,
    mrsigner=SIGNER,
    isv_prod_id=3,
    isv_svn=2,
)
FRONTEND_SGX = TeeClaims(
    kind=TeeKind.SGX, report_data=bytes(64), tcb_status="UpToDate", mrenclave=FRONTEND_MRENCLAVE
)

_MANIFEST: dict[str, Any] = {
    "Packages": {
        "backend": {"SignerID": SIGNER, "ProductID": 3, "SecurityVersion": 2, "Debug": False},
        "frontend": {"UniqueID": FRONTEND_MRENCLAVE, "Debug": False},
    },
    "Marbles": {
        "backend": {
            "Package": "backend",
            "Parameters": {
                "Files": {
                    "/etc/seal.key": "{{ hex .MarbleRun.SealKey }}",
                    "/etc/old-spelling-seal.key": "{{ hex .Marblerun.SealKey }}",
                    "/etc/raw-seal.key": "{{ raw .MarbleRun.SealKey }}",
                    "/etc/shared.key": "{{ raw .Secrets.shared_key }}",
                    "/etc/marble.key": "{{ hex .Secrets.marble_key }}",
                    "/etc/previous-marble.key": "{{ hex .Previous.Secrets.marble_key }}",
                    "/etc/previous-shared.key": "{{ hex .Previous.Secrets.shared_key }}",
                    "/etc/tls/marble.crt": "{{ pem .MarbleRun.MarbleCert.Cert }}",
                    "/etc/tls/marble.key": "{{ pem .MarbleRun.MarbleCert.Private }}",
                    "/etc/tls/marble.pub": "{{ pem .MarbleRun.MarbleCert.Public }}",
                    "/etc/tls/ca.crt": "{{ pem .MarbleRun.RootCA.Cert }}",
                    "/etc/tls/coordinator-root.crt": "{{ pem .MarbleRun.CoordinatorRoot.Cert }}",
                    "/etc/tls/coordinator-intermediate.crt": (
                        "{{ pem .MarbleRun.CoordinatorIntermediate.Cert }}"
                    ),
                    "/etc/tls/service.crt": "{{ pem .Secrets.service_cert.Cert }}",
                    "/etc/tls/service.key": "{{ pem .Secrets.service_cert.Private }}",
                    "/etc/tls/own.crt": "{{ pem .Secrets.own_cert.Cert }}",
                    "/etc/static.conf": "listen = 8443\n",
                    "/etc/verbatim.tmpl": {
                        "Data": "{{ .NotATemplate }} {{ hex .Secrets.x }}",
                        "NoTemplates": True,
                    },
                    "/etc/decoded.conf": {
                        "Encoding": "base64",
                        "Data": base64.b64encode(b"key={{ hex .Secrets.shared_key }}\n").decode(),
                    },
                    "/etc/hex-encoded.bin": {"Encoding": "hex", "Data": "00ff10", "NoTemplates": True},
                },
                "Env": {
                    "SHARED_HEX": "{{ hex .Secrets.shared_key }}",
                    "MARBLE_B64": "{{ base64 .Secrets.marble_key }}",
                    "SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
                    "GREETING": "hello {{/* a comment */}}world",
                    "MARBLE_PREDEFINED_ROOT_CA": "a user value that the predefined one overrides",
                },
                "Argv": ["backend", "--config", "/etc/static.conf", "{{ not a template }}"],
            },
        },
        "limited": {
            "Package": "backend",
            "MaxActivations": 2,
            "Parameters": {"Env": {"KEY": "{{ hex .Secrets.marble_key }}"}},
        },
        "frontend": {
            "Package": "frontend",
            "Parameters": {
                "Env": {
                    "SHARED_HEX": "{{ hex .Secrets.shared_key }}",
                    "MARBLE_KEY": "{{ hex .Secrets.marble_key }}",
                },
                "Files": {"/srv/service.crt": "{{ pem .Secrets.service_cert.Cert }}"},
            },
        },
        "needs_token": {
            "Package": "backend",
            "Parameters": {
                "Env": {"API_TOKEN": "{{ string .Secrets.api_token }}"},
                "Files": {"/srv/user.crt": "{{ pem .Secrets.user_cert.Cert }}"},
            },
        },
        "unbound_a": {
            "Package": "backend",
            "DisableSecretBinding": True,
            "Parameters": {"Env": {"KEY": "{{ hex .Secrets.marble_key }}"}},
        },
        "unbound_b": {
            "Package": "backend",
            "DisableSecretBinding": True,
            "Parameters": {"Env": {"KEY": "{{ hex .Secrets.marble_key }}"}},
        },
        "tls_first": {"Package": "backend", "TLS": ["web", "other"], "Parameters": {"Env": {"A": "b"}}},
        "tls_second": {"Package": "backend", "TLS": ["other", "web"]},
        "tls_solo": {"Package": "backend", "TLS": ["solo"]},
        "tls_own": {"Package": "backend", "TLS": ["own"]},
    },
    "Secrets": {
        "shared_key": {"Type": "symmetric-key", "Size": 256, "Shared": True},
        "marble_key": {"Type": "symmetric-key", "Size": 128},
        "service_cert": {
            "Type": "cert-ecdsa",
            "Size": 256,
            "Shared": True,
            "ValidFor": 7,
            "Cert": {"Subject": {"CommonName": "service.internal"}, "DNSNames": ["service.internal"]},
        },
        "own_cert": {"Type": "cert-ecdsa", "Size": 256, "ValidFor": 7},
        "api_token": {"Type": "plain", "UserDefined": True},
        "user_cert": {"Type": "cert-ecdsa", "UserDefined": True},
    },
    "TLS": {
        "web": {
            "Outgoing": [
                {"Addr": "localhost", "Port": "8080"},
                {"Addr": "service.namespace", "Port": "4242"},
            ],
            "Incoming": [{"Port": "8080"}],
        },
        "other": {
            "Outgoing": [{"Addr": "example.com", "Port": "40000"}],
            "Incoming": [{"Port": "8080", "Cert": "service_cert", "DisableClientAuth": True}],
        },
        "solo": {"Incoming": [{"Port": "2000"}]},
        "own": {"Incoming": [{"Port": "9000", "Cert": "own_cert", "DisableClientAuth": True}]},
    },
}


def manifest_dict() -> dict[str, Any]:
    """The test manifest as a dict, fresh for each call (mutate it freely)."""
    return copy.deepcopy(_MANIFEST)


def deploy(manifest: Mapping[str, Any] | None = None) -> Deployment:
    """A deployment in AcceptingMarbles with ``manifest`` (default: the test manifest) set."""
    raw = json.dumps(manifest if manifest is not None else _MANIFEST).encode()
    return set_manifest(new_deployment(["localhost"], NOW), load_manifest(raw), NOW)


def run(
    dep: Deployment | PreparedDeployment,
    marble_type: str = "backend",
    uuid: UUID = UUID_A,
    *,
    claims: TeeClaims = SIMULATED,
    simulation: bool = True,
    dns_names: tuple[str, ...] = ("backend.internal",),
) -> ActivationResult:
    prepared = dep if isinstance(dep, PreparedDeployment) else PreparedDeployment(dep)
    return activate(
        prepared, ActivationInput(marble_type, uuid, dns_names, claims), NOW, simulation=simulation
    )


def refused(
    dep: Deployment | PreparedDeployment,
    marble_type: str = "backend",
    uuid: UUID = UUID_A,
    *,
    claims: TeeClaims = SIMULATED,
    simulation: bool = True,
) -> ActivationRefused:
    """The refusal of this activation; fails the test when it is accepted, and checks that the
    refusal carries no secret material of the deployment."""
    with pytest.raises(ActivationRefused) as info:
        run(dep, marble_type, uuid, claims=claims, simulation=simulation)
    deployment = dep.deployment if isinstance(dep, PreparedDeployment) else dep
    assert_no_secrets(info.value, deployment)
    return info.value


def secret_values(dep: Deployment, extra: Iterable[bytes] = ()) -> list[bytes]:
    """Every secret byte string of ``dep`` (keys, private keys, secret values), plus ``extra``."""
    values = [dep.root_secret, dep.seal_master_secret, *extra]
    if dep.previous_root_secret:
        values.append(dep.previous_root_secret)
    for ck in (dep.ca.root, dep.ca.intermediate):
        values.append(ck.key_pkcs8_der())
    for secret in (*dep.secrets.values(), *dep.previous_secrets.values()):
        if secret.private:
            values.append(secret.private)
        if secret.type.value in ("symmetric-key", "plain") and secret.public:
            values.append(secret.public)
    return [v for v in values if len(v) >= 4]


def encodings(value: bytes) -> list[str]:
    """The textual forms a leaked value could take in a message."""
    out = [value.hex(), value.hex().upper(), base64.b64encode(value).decode(), repr(value)[2:-1]]
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if len(text) >= 4:
            out.append(text)
    return [o for o in out if len(o) >= 8]


def assert_no_secrets(exc: MarbleKeepError, dep: Deployment, extra: Iterable[bytes] = ()) -> None:
    texts = [str(exc), exc.message, exc.diagnostics(), *(str(p) for p in exc.problems)]
    blob = "\n".join(texts)
    for value in secret_values(dep, extra):
        for form in encodings(value):
            assert form not in blob, "a secret value leaked into a refusal message"
    assert "PRIVATE KEY" not in blob


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """Plain HKDF-SHA256 from ``cryptography``: the independent reference for derived keys."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def pem_blocks(data: bytes) -> list[bytes]:
    """The PEM blocks in ``data``, each with its BEGIN/END lines."""
    blocks: list[bytes] = []
    rest = data
    while b"-----BEGIN " in rest:
        start = rest.index(b"-----BEGIN ")
        end_marker = rest.index(b"-----END ", start)
        end = rest.index(b"-----\n", end_marker + 9) + len(b"-----\n")
        blocks.append(rest[start:end])
        rest = rest[end:]
    return blocks


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
