"""MarbleRun's Marble API (gRPC ``rpc.Marble/Activate``) served by a real Coordinator, called with
grpcio over real TLS (the Marble presents its self-signed certificate) and over h2c.

What a MarbleRun premain gets must be what our own protocol renders for the same Marble: same seal
key and per-Marble keys for the same UUID, same shared secrets, a Marble certificate by MarbleRun's
rules; ``MaxActivations`` is exact across both protocols; errors carry MarbleRun's status codes.
"""

from __future__ import annotations

import concurrent.futures
import json
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_support import (
    GrpcEndpoints,
    MarbleRunMarble,
    RpcFailed,
    activate_tls,
    call,
    parse_response,
)
from prometheus_client.parser import text_string_to_metric_families

from harness import ACTIVATION_MANIFEST, RunningCoordinator
from marblekeep.crypto.pki import MARBLE_TYPE_OID

ROOT_CA = "MARBLE_PREDEFINED_ROOT_CA"
CHAIN = "MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"
PRIVATE_KEY = "MARBLE_PREDEFINED_PRIVATE_KEY"


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningCoordinator]:
    coordinator = RunningCoordinator(tmp_path / "seal", prometheus=True)
    try:
        yield coordinator
    finally:
        coordinator.stop()


@pytest.fixture
def endpoints(running: RunningCoordinator) -> Iterator[GrpcEndpoints]:
    eps = GrpcEndpoints(running)
    try:
        yield eps
    finally:
        eps.stop()


@pytest.fixture
def deployed(running: RunningCoordinator, endpoints: GrpcEndpoints) -> GrpcEndpoints:
    running.set_manifest()
    return endpoints


def _leaf(env: dict[str, bytes]) -> x509.Certificate:
    return x509.load_pem_x509_certificates(env[CHAIN])[0]


def test_marblerun_and_our_protocol_get_the_same_keys_for_one_uuid(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble(dns_names=("backend.default.svc", "10.1.2.3"))
    ours = deployed.running.marble().activate("backend", marble.uuid)
    theirs = activate_tls(deployed, marble, "backend")
    for name in ("SEAL_KEY", "PER_KEY", "SHARED_KEY"):
        assert theirs.env[name] == ours.env[name]
        assert len(theirs.env[name]) >= 32  # hex of a 128- or 256-bit key
    assert theirs.files == ours.files  # the shared certificate secret
    assert theirs.env[ROOT_CA] == ours.env[ROOT_CA]
    assert theirs.argv == ours.argv
    # Another UUID: another seal key and per-Marble key, the same shared key.
    other = activate_tls(deployed, MarbleRunMarble(), "backend")
    assert other.env["SEAL_KEY"] != theirs.env["SEAL_KEY"]
    assert other.env["PER_KEY"] != theirs.env["PER_KEY"]
    assert other.env["SHARED_KEY"] == theirs.env["SHARED_KEY"]


def test_the_marble_certificate_follows_marbleruns_rules(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble(dns_names=("backend.default.svc", "10.1.2.3"))
    got = activate_tls(deployed, marble, "backend")
    leaf = _leaf(got.env)
    marble_root = x509.load_pem_x509_certificate(got.env[ROOT_CA])
    leaf.verify_directly_issued_by(marble_root)
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(marble.uuid))])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["backend.default.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3"]
    ext = leaf.extensions.get_extension_for_oid(MARBLE_TYPE_OID)
    assert not ext.critical and ext.value.value == b"backend"  # raw bytes, not DER-wrapped
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # The Coordinator generated the Marble's key: not the CSR's, and it matches the certificate.
    key = serialization.load_pem_private_key(got.env[PRIVATE_KEY], None)
    assert key.public_key() == leaf.public_key()
    assert leaf.public_key() != marble.key.public_key()


def test_csr_subject_attributes_are_kept_in_gos_order_with_cn_replaced(deployed: GrpcEndpoints) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "ignored"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dropped"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        ]
    )
    marble = MarbleRunMarble(csr_subject=subject)
    leaf = _leaf(activate_tls(deployed, marble, "backend").env)
    assert leaf.subject.rfc4514_string() == f"CN={marble.uuid},OU=payments,C=DE"  # RFC 4514 lists it reversed


def test_h2c_with_an_injected_certificate_activates_too(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble()
    deployed.h2c_peer_cert = marble.cert_der
    with deployed.h2c_channel() as channel:
        got = parse_response(call(channel, marble.request("backend")))
    assert _leaf(got.env).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == str(marble.uuid)


def _fails(
    endpoints: GrpcEndpoints, marble: MarbleRunMarble | None, request: bytes, path: str | None = None
) -> RpcFailed:
    with endpoints.tls_channel(marble) as channel, pytest.raises(RpcFailed) as info:
        call(channel, request, *(() if path is None else (path,)))
    return info.value


def test_not_accepting_marbles_is_failed_precondition(endpoints: GrpcEndpoints) -> None:
    marble = MarbleRunMarble()
    failed = _fails(endpoints, marble, marble.request("backend"))
    assert failed.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot accept marbles in current state" in failed.details


def test_no_client_certificate_is_unauthenticated(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble()
    failed = _fails(deployed, None, marble.request("backend"))
    assert failed.code is grpc.StatusCode.UNAUTHENTICATED
    assert "no TLS client certificate" in failed.details
    deployed.h2c_peer_cert = None
    with deployed.h2c_channel() as channel, pytest.raises(RpcFailed) as info:
        call(channel, marble.request("backend"))
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_refusals_are_permission_denied_with_our_explanations(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble()
    failed = _fails(deployed, marble, marble.request("frontend"))
    assert failed.code is grpc.StatusCode.PERMISSION_DENIED
    assert "unknown marble type 'frontend'" in failed.details and "backend, once, twice" in failed.details
    activate_tls(deployed, marble, "once")
    failed = _fails(deployed, MarbleRunMarble(), MarbleRunMarble().request("once"))
    assert failed.code is grpc.StatusCode.PERMISSION_DENIED
    assert "reached max activations count (1)" in failed.details
    nil = MarbleRunMarble()
    failed = _fails(deployed, nil, nil.request("backend", uuid=str(uuid_mod.UUID(int=0))))
    assert failed.code is grpc.StatusCode.PERMISSION_DENIED
    assert "nil UUID" in failed.details


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"uuid": "not-a-uuid"}, "is not a UUID in its 36-character form"),
        ({"csr": b"junk"}, "CSR is not a DER-encoded PKCS#10"),
        ({"csr": b""}, "CSR is empty"),
    ],
)
def test_bad_fields_are_invalid_argument(
    deployed: GrpcEndpoints, change: dict[str, object], detail: str
) -> None:
    marble = MarbleRunMarble()
    failed = _fails(deployed, marble, marble.request("backend", **change))  # type: ignore[arg-type]
    assert failed.code is grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failed.details


def test_a_csr_whose_signature_does_not_verify_is_invalid_argument(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble()
    csr = bytearray(marble.csr_der)
    csr[-3] ^= 0x01  # inside the signature
    failed = _fails(deployed, marble, marble.request("backend", csr=bytes(csr)))
    assert failed.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "CSR" in failed.details


def test_malformed_messages_unknown_methods_and_oversized_messages(deployed: GrpcEndpoints) -> None:
    marble = MarbleRunMarble()
    failed = _fails(deployed, marble, b"\x0a\x05abc")
    assert failed.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "ActivationReq: malformed protobuf message" in failed.details
    failed = _fails(deployed, marble, marble.request("backend"), "/rpc.Marble/Deactivate")
    assert failed.code is grpc.StatusCode.UNIMPLEMENTED
    failed = _fails(deployed, marble, marble.request("backend", quote=bytes(300 * 1024)))
    assert failed.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The connection still serves well-formed calls afterwards.
    with deployed.tls_channel(marble) as channel:
        assert parse_response(call(channel, marble.request("backend"))).env["SEAL_KEY"]


def test_max_activations_is_exact_across_both_protocols_under_concurrency(deployed: GrpcEndpoints) -> None:
    limit = ACTIVATION_MANIFEST["Marbles"]["twice"]["MaxActivations"]
    marbles = [MarbleRunMarble() for _ in range(8)]

    def via_grpc(m: MarbleRunMarble) -> bool:
        try:
            activate_tls(deployed, m, "twice")
        except RpcFailed as exc:
            assert exc.code is grpc.StatusCode.PERMISSION_DENIED, exc
            assert "reached max activations count" in exc.details
            return False
        return True

    def via_ours(_: int) -> bool:
        with deployed.running.marble() as client:
            prepared = client.prepare("twice")
            response = client.post(prepared.body())
        if response.status_code == 403:
            assert "reached max activations count" in response.json()["message"]
            return False
        assert response.status_code == 200, response.text
        return True

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(via_grpc, marbles)) + list(pool.map(via_ours, range(8)))
    assert sum(results) == limit
    assert deployed.running.coord.deployment.activations["twice"] == limit


def test_metrics_and_logs_count_both_protocols_alike(
    deployed: GrpcEndpoints, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="marblekeep.coordinator")
    marble = MarbleRunMarble()
    got = activate_tls(deployed, marble, "backend")
    _fails(deployed, MarbleRunMarble(), MarbleRunMarble().request("nosuchtype"))
    text = httpx.get(deployed.running.metrics_url, trust_env=False, timeout=30).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("coordinator_marble_activation_successes_total", frozenset({("type", "backend")}))] == 1
    refusal_key = (
        "coordinator_marble_activation_refusals_total",
        frozenset({("type", "unknown"), ("reason", "unknown_type")}),
    )
    assert samples[refusal_key] == 1
    ok = frozenset({("method", "/rpc.Marble/Activate"), ("status", "OK")})
    assert samples[("coordinator_grpc_requests_total", ok)] == 1
    activated = [r for r in caplog.records if r.getMessage() == "marble activated"]
    assert [(r.marble_type, r.uuid, r.protocol) for r in activated] == [
        ("backend", str(marble.uuid), "marblerun")
    ]  # type: ignore[attr-defined]
    # No secret the Marble received is in any log line.
    logged = "\n".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    for value in (got.env["SEAL_KEY"], got.env["PER_KEY"], got.env[PRIVATE_KEY]):
        assert value.decode() not in logged
