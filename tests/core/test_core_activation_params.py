"""What an accepted Marble receives: predefined variables, its leaf certificate, rendered Files/Env,
Argv, its keys (seal, shared, per-Marble), certificate secrets and the TTLS configuration."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import json
from typing import Any
from uuid import UUID

import pytest
from core_support import (
    NOW,
    UUID_A,
    UUID_B,
    assert_no_secrets,
    deploy,
    hkdf,
    load_cert,
    manifest_dict,
    pem_blocks,
    public_der,
    refused,
    run,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from marblekeep.core.activation import (
    ENV_CERT_CHAIN,
    ENV_COORDINATOR_ROOT_CA,
    ENV_PRIVATE_KEY,
    ENV_ROOT_CA,
    ENV_TTLS_CONFIG,
    ActivationResult,
    PreparedDeployment,
)
from marblekeep.core.deployment import Deployment
from marblekeep.core.records import deployment_from_records, deployment_to_records
from marblekeep.crypto.pki import MARBLE_TYPE_OID, marble_identity
from marblekeep.manifest.model import Secret

PREDEFINED = (ENV_ROOT_CA, ENV_CERT_CHAIN, ENV_PRIVATE_KEY, ENV_COORDINATOR_ROOT_CA)


@pytest.fixture(scope="module")
def dep() -> Deployment:
    return deploy()


@pytest.fixture(scope="module")
def prepared(dep: Deployment) -> PreparedDeployment:
    return PreparedDeployment(dep)


@pytest.fixture(scope="module")
def backend(prepared: PreparedDeployment) -> ActivationResult:
    return run(prepared, "backend", UUID_A, dns_names=("backend.internal", "10.0.0.7", "localhost"))


def leaf_of(result: ActivationResult) -> x509.Certificate:
    return load_cert(pem_blocks(result.env[ENV_CERT_CHAIN])[0])


# --------------------------------------------------------------------------- predefined variables (§2.4)


def test_root_ca_is_the_marble_root(dep: Deployment, backend: ActivationResult) -> None:
    assert backend.env[ENV_ROOT_CA] == dep.ca.marble_root.cert_pem
    root = load_cert(backend.env[ENV_ROOT_CA])
    assert root.subject == root.issuer  # the self-signed sibling of the intermediate
    assert root.public_key() == dep.ca.intermediate.cert.public_key()


def test_predefined_root_ca_overrides_the_user_value(backend: ActivationResult) -> None:
    assert b"a user value" not in backend.env[ENV_ROOT_CA]


def test_chain_is_leaf_then_intermediate(dep: Deployment, backend: ActivationResult) -> None:
    blocks = pem_blocks(backend.env[ENV_CERT_CHAIN])
    assert len(blocks) == 2
    assert all(b.startswith(b"-----BEGIN CERTIFICATE-----\n") for b in blocks)
    assert blocks[1] == dep.ca.intermediate.cert_pem  # the Coordinator intermediate, not the Marble root
    leaf = load_cert(blocks[0])
    leaf.verify_directly_issued_by(dep.ca.marble_root.cert)
    leaf.verify_directly_issued_by(dep.ca.intermediate.cert)
    load_cert(blocks[1]).verify_directly_issued_by(dep.ca.root.cert)
    assert leaf.issuer.rfc4514_string() == "CN=MarbleRun Coordinator - Intermediate CA"


def test_private_key_is_pkcs8_of_the_leaf(backend: ActivationResult) -> None:
    pem = backend.env[ENV_PRIVATE_KEY]
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)
    assert key.public_key() == leaf_of(backend).public_key()


def test_coordinator_root_ca(dep: Deployment, backend: ActivationResult) -> None:
    assert backend.env[ENV_COORDINATOR_ROOT_CA] == dep.ca.root.cert_pem
    root = load_cert(backend.env[ENV_COORDINATOR_ROOT_CA])
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "MarbleRun Coordinator"


def test_every_marble_gets_the_predefined_variables(prepared: PreparedDeployment) -> None:
    for marble_type in ("frontend", "limited", "tls_second", "unbound_a"):
        env = run(prepared, marble_type).env
        assert set(PREDEFINED) <= set(env)


def test_a_marble_without_parameters_gets_only_the_predefined_variables(prepared: PreparedDeployment) -> None:
    manifest = manifest_dict()
    manifest["Marbles"]["bare"] = {"Package": "backend"}
    result = run(deploy(manifest), "bare")
    assert set(result.env) == set(PREDEFINED)
    assert result.files == {}
    assert result.argv == ()


def test_leaf_verifies_for_its_dns_names_against_the_root_ca(backend: ActivationResult) -> None:
    # MarbleRun's test: the leaf verifies for "localhost" against MARBLE_PREDEFINED_ROOT_CA alone.
    store = Store([load_cert(backend.env[ENV_ROOT_CA])])
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(NOW + dt.timedelta(minutes=1))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    chain = verifier.verify(leaf_of(backend), [])
    assert chain[-1] == load_cert(backend.env[ENV_ROOT_CA])


def test_leaf_verifies_via_intermediate_to_the_coordinator_root(backend: ActivationResult) -> None:
    blocks = pem_blocks(backend.env[ENV_CERT_CHAIN])
    verifier = (
        PolicyBuilder()
        .store(Store([load_cert(backend.env[ENV_COORDINATOR_ROOT_CA])]))
        .time(NOW + dt.timedelta(minutes=1))
        .build_server_verifier(x509.DNSName("backend.internal"))
    )
    chain = verifier.verify(load_cert(blocks[0]), [load_cert(blocks[1])])
    assert len(chain) == 3


# --------------------------------------------------------------------------- the leaf certificate


def test_leaf_cn_is_the_uuid_and_carries_the_marble_type(dep: Deployment, backend: ActivationResult) -> None:
    leaf = leaf_of(backend)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == str(UUID_A)
    ext = leaf.extensions.get_extension_for_oid(MARBLE_TYPE_OID)
    assert not ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"backend"
    assert marble_identity(leaf, dep.ca.marble_root.cert) == ("backend", UUID_A)


def test_leaf_sans_are_the_dns_names_plus_loopback(backend: ActivationResult) -> None:
    san = leaf_of(backend).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["backend.internal", "localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_marble_cert_template_fields_are_the_leaf(backend: ActivationResult) -> None:
    leaf_pem = pem_blocks(backend.env[ENV_CERT_CHAIN])[0]
    assert backend.files["/etc/tls/marble.crt"] == leaf_pem
    assert backend.files["/etc/tls/marble.key"] == backend.env[ENV_PRIVATE_KEY]
    public = serialization.load_pem_public_key(backend.files["/etc/tls/marble.pub"])
    assert public == leaf_of(backend).public_key()
    assert backend.files["/etc/tls/marble.pub"].startswith(b"-----BEGIN PUBLIC KEY-----\n")


def test_every_activation_gets_a_fresh_leaf(prepared: PreparedDeployment) -> None:
    first, second = run(prepared, "backend", UUID_A), run(prepared, "backend", UUID_A)
    a, b = leaf_of(first), leaf_of(second)
    assert public_der(a) != public_der(b)
    assert a.serial_number != b.serial_number
    assert first.env[ENV_PRIVATE_KEY] != second.env[ENV_PRIVATE_KEY]


# --------------------------------------------------------------------------- Files, Env, Argv


def test_reserved_certificates_render_exactly(dep: Deployment, backend: ActivationResult) -> None:
    assert backend.files["/etc/tls/ca.crt"] == dep.ca.marble_root.cert_pem
    assert backend.files["/etc/tls/coordinator-root.crt"] == dep.ca.root.cert_pem
    assert backend.files["/etc/tls/coordinator-intermediate.crt"] == dep.ca.intermediate.cert_pem


def test_plain_files_and_env_are_delivered_as_written(backend: ActivationResult) -> None:
    assert backend.files["/etc/static.conf"] == b"listen = 8443\n"
    assert backend.env["GREETING"] == b"hello world"  # the comment is gone


def test_no_templates_entries_are_verbatim(backend: ActivationResult) -> None:
    assert backend.files["/etc/verbatim.tmpl"] == b"{{ .NotATemplate }} {{ hex .Secrets.x }}"
    assert backend.files["/etc/hex-encoded.bin"] == b"\x00\xff\x10"


def test_encoded_entries_are_decoded_before_templating(dep: Deployment, backend: ActivationResult) -> None:
    shared = dep.secrets["shared_key"].private
    assert backend.files["/etc/decoded.conf"] == b"key=" + shared.hex().encode() + b"\n"


def test_argv_is_passed_through_untemplated(backend: ActivationResult) -> None:
    assert backend.argv == ("backend", "--config", "/etc/static.conf", "{{ not a template }}")


def test_files_and_env_have_exactly_the_manifest_entries(backend: ActivationResult) -> None:
    manifest = manifest_dict()["Marbles"]["backend"]["Parameters"]
    assert set(backend.files) == set(manifest["Files"])
    assert set(backend.env) == set(manifest["Env"]) | set(PREDEFINED)


# --------------------------------------------------------------------------- seal key


def test_seal_key_known_answer(dep: Deployment, backend: ActivationResult) -> None:
    expected = hkdf(dep.seal_master_secret, UUID_A.bytes, b"", 32)
    assert backend.files["/etc/raw-seal.key"] == expected
    assert backend.files["/etc/seal.key"] == expected.hex().encode()
    assert backend.files["/etc/old-spelling-seal.key"] == expected.hex().encode()  # .Marblerun
    assert backend.env["SEAL_KEY"] == expected.hex().encode()


def test_seal_key_is_stable_for_a_uuid_and_differs_across_uuids(dep: Deployment) -> None:
    again = run(PreparedDeployment(dep), "backend", UUID_A)
    other = run(PreparedDeployment(dep), "backend", UUID_B)
    assert again.files["/etc/raw-seal.key"] == hkdf(dep.seal_master_secret, UUID_A.bytes, b"", 32)
    assert other.files["/etc/raw-seal.key"] == hkdf(dep.seal_master_secret, UUID_B.bytes, b"", 32)
    assert again.files["/etc/raw-seal.key"] != other.files["/etc/raw-seal.key"]


def test_seal_key_does_not_depend_on_the_marble_type(dep: Deployment) -> None:
    # ARCHITECTURE.md §1: keyed by the UUID alone; two Marbles claiming one UUID share the key.
    manifest = manifest_dict()
    manifest["Marbles"]["frontend"]["Parameters"]["Env"]["SEAL"] = "{{ hex .MarbleRun.SealKey }}"
    other = deploy(manifest)
    front = run(other, "frontend", UUID_A).env["SEAL"]
    back = run(other, "backend", UUID_A).env["SEAL_KEY"]
    assert front == back


# --------------------------------------------------------------------------- symmetric keys


def per_marble(dep: Deployment, uuid: UUID, info: bytes, name: str = "marble_key", size: int = 16) -> bytes:
    return hkdf(dep.root_secret, str(uuid).encode() + name.encode(), info, size)


def test_per_marble_key_known_answer(dep: Deployment, backend: ActivationResult) -> None:
    expected = per_marble(dep, UUID_A, b"backend")
    assert backend.files["/etc/marble.key"] == expected.hex().encode()
    assert backend.env["MARBLE_B64"] == base64.b64encode(expected)


def test_per_marble_key_is_stable_for_uuid_and_type(dep: Deployment) -> None:
    first = run(PreparedDeployment(dep), "limited", UUID_B).env["KEY"]
    second = run(PreparedDeployment(dep), "limited", UUID_B).env["KEY"]
    assert first == second == per_marble(dep, UUID_B, b"limited").hex().encode()


def test_per_marble_key_differs_across_uuids_and_types(prepared: PreparedDeployment) -> None:
    keys = {
        run(prepared, "limited", UUID_A).env["KEY"],
        run(prepared, "limited", UUID_B).env["KEY"],
        run(prepared, "frontend", UUID_A).env["MARBLE_KEY"],
        run(prepared, "backend", UUID_A).files["/etc/marble.key"],
    }
    assert len(keys) == 4


def test_disable_secret_binding_gives_equal_keys_across_types(dep: Deployment) -> None:
    a = run(dep, "unbound_a", UUID_A).env["KEY"]
    b = run(dep, "unbound_b", UUID_A).env["KEY"]
    assert a == b == per_marble(dep, UUID_A, b"").hex().encode()
    assert run(dep, "unbound_b", UUID_B).env["KEY"] != a


_PROPERTY_DEP = deploy()
_PROPERTY_PREPARED = PreparedDeployment(_PROPERTY_DEP)


@settings(max_examples=25, deadline=None)
@given(first=st.uuids(), second=st.uuids())
def test_per_marble_and_seal_keys_are_functions_of_the_uuid(first: UUID, second: UUID) -> None:
    dep = _PROPERTY_DEP
    prepared = _PROPERTY_PREPARED
    if first.int == 0 or second.int == 0:
        return
    a, b = run(prepared, "backend", first), run(prepared, "backend", second)
    same = first == second
    assert (a.files["/etc/marble.key"] == b.files["/etc/marble.key"]) is same
    assert (a.files["/etc/raw-seal.key"] == b.files["/etc/raw-seal.key"]) is same
    assert a.files["/etc/raw-seal.key"] == hkdf(dep.seal_master_secret, first.bytes, b"", 32)
    assert a.files["/etc/shared.key"] == b.files["/etc/shared.key"]


def test_shared_key_is_the_same_for_every_marble(dep: Deployment, prepared: PreparedDeployment) -> None:
    shared = dep.secrets["shared_key"].private
    assert len(shared) == 32
    assert run(prepared, "backend", UUID_A).files["/etc/shared.key"] == shared
    assert run(prepared, "backend", UUID_B).env["SHARED_HEX"] == shared.hex().encode()
    assert run(prepared, "frontend", UUID_B).env["SHARED_HEX"] == shared.hex().encode()


# --------------------------------------------------------------------------- certificate secrets


def test_shared_certificate_is_identical_across_marbles(
    dep: Deployment, prepared: PreparedDeployment
) -> None:
    stored = dep.secrets["service_cert"]
    assert stored.cert is not None
    a = run(prepared, "backend", UUID_A).files["/etc/tls/service.crt"]
    b = run(prepared, "frontend", UUID_B).files["/srv/service.crt"]
    assert a == b
    cert = load_cert(a)
    assert public_der(cert) == stored.public
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["service.internal"]


def test_shared_certificate_key_matches(backend: ActivationResult) -> None:
    key = serialization.load_pem_private_key(backend.files["/etc/tls/service.key"], password=None)
    assert key.public_key() == load_cert(backend.files["/etc/tls/service.crt"]).public_key()


def test_per_marble_certificate_is_fresh_on_every_activation(dep: Deployment) -> None:
    a = load_cert(run(dep, "backend", UUID_A).files["/etc/tls/own.crt"])
    b = load_cert(run(dep, "backend", UUID_A).files["/etc/tls/own.crt"])
    assert public_der(a) != public_der(b)
    for cert in (a, b):
        cert.verify_directly_issued_by(dep.ca.marble_root.cert)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=7)
        assert cert.not_valid_before_utc == NOW


# --------------------------------------------------------------------------- user-defined secrets


def set_user_secrets(dep: Deployment, **values: Secret) -> Deployment:
    return dataclasses.replace(dep, secrets={**dep.secrets, **values})


def user_cert(dep: Deployment) -> Secret:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "uploaded")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return dataclasses.replace(
        dep.secrets["user_cert"],
        cert=cert.public_bytes(serialization.Encoding.DER),
        public=public_der(cert),
        private=key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def test_unset_user_defined_secret_refuses_naming_it(dep: Deployment) -> None:
    exc = refused(dep, "needs_token")
    assert exc.reason == "parameters"
    assert "Marbles.needs_token.Parameters." in exc.message
    assert "api_token" in exc.message
    assert "not set yet" in exc.message


def test_user_defined_secrets_once_set_are_delivered(dep: Deployment) -> None:
    token = b"tok-9f8e7d6c5b4a"
    uploaded = user_cert(dep)
    ready = set_user_secrets(
        dep,
        api_token=dataclasses.replace(dep.secrets["api_token"], private=token, public=token),
        user_cert=uploaded,
    )
    result = run(ready, "needs_token")
    assert result.env["API_TOKEN"] == token
    assert uploaded.cert is not None
    assert load_cert(result.files["/srv/user.crt"]).public_bytes(serialization.Encoding.DER) == uploaded.cert


def test_only_the_unset_secret_is_named(dep: Deployment) -> None:
    token = b"tok-0123456789abcdef"
    half = set_user_secrets(
        dep, api_token=dataclasses.replace(dep.secrets["api_token"], private=token, public=token)
    )
    exc = refused(half, "needs_token")
    assert "user_cert" in exc.message
    assert "secret(s) user_cert not set" in exc.message
    assert_no_secrets(exc, half, extra=[token])


def test_string_on_a_plain_secret_with_nul_refuses_without_the_value(dep: Deployment) -> None:
    value = b"first-half\x00second-half-secret"
    bad = set_user_secrets(
        dep,
        api_token=dataclasses.replace(dep.secrets["api_token"], private=value, public=value),
        user_cert=user_cert(dep),
    )
    exc = refused(bad, "needs_token")
    assert exc.reason == "parameters"
    assert "Marbles.needs_token.Parameters.Env.API_TOKEN" in exc.message
    assert_no_secrets(exc, bad, extra=[value, b"first-half", b"second-half-secret"])
    assert "half" not in exc.message


# --------------------------------------------------------------------------- .Previous


def test_previous_equals_current_without_rotation(dep: Deployment, backend: ActivationResult) -> None:
    assert backend.files["/etc/previous-marble.key"] == backend.files["/etc/marble.key"]
    assert backend.files["/etc/previous-shared.key"] == dep.secrets["shared_key"].private.hex().encode()


def test_previous_uses_the_previous_root_secret_and_values(dep: Deployment) -> None:
    new_root = bytes(range(32))
    new_shared = bytes(range(100, 132))
    rotated = dataclasses.replace(
        dep,
        root_secret=new_root,
        previous_root_secret=dep.root_secret,
        secrets={
            **dep.secrets,
            "shared_key": dataclasses.replace(
                dep.secrets["shared_key"], private=new_shared, public=new_shared
            ),
        },
        previous_secrets=dict(dep.secrets),
    )
    result = run(rotated, "backend", UUID_A)
    assert (
        result.files["/etc/marble.key"]
        == hkdf(new_root, str(UUID_A).encode() + b"marble_key", b"backend", 16).hex().encode()
    )
    assert result.files["/etc/previous-marble.key"] == per_marble(dep, UUID_A, b"backend").hex().encode()
    assert result.files["/etc/shared.key"] == new_shared
    assert result.files["/etc/previous-shared.key"] == dep.secrets["shared_key"].private.hex().encode()
    # The seal key never rotates with the root secret.
    assert result.files["/etc/raw-seal.key"] == hkdf(dep.seal_master_secret, UUID_A.bytes, b"", 32)


# --------------------------------------------------------------------------- records round trip


def test_keys_survive_a_records_round_trip(dep: Deployment, backend: ActivationResult) -> None:
    reloaded = deployment_from_records(deployment_to_records(dep))
    assert reloaded is not None
    after = run(PreparedDeployment(reloaded), "backend", UUID_A)
    for name in ("/etc/raw-seal.key", "/etc/marble.key", "/etc/shared.key", "/etc/tls/service.crt"):
        assert after.files[name] == backend.files[name], name
    assert after.env[ENV_ROOT_CA] == backend.env[ENV_ROOT_CA]
    assert pem_blocks(after.env[ENV_CERT_CHAIN])[1] == pem_blocks(backend.env[ENV_CERT_CHAIN])[1]


# --------------------------------------------------------------------------- TTLS (§2.7)


def ttls(result: ActivationResult) -> dict[str, Any]:
    doc = json.loads(result.env[ENV_TTLS_CONFIG])
    assert set(doc) == {"tls"}
    assert set(doc["tls"]) == {"Incoming", "Outgoing"}
    return doc["tls"]  # type: ignore[no-any-return]


def test_ttls_shape_and_later_tag_overwrites(dep: Deployment, prepared: PreparedDeployment) -> None:
    result = run(prepared, "tls_first")
    conf = ttls(result)
    assert set(conf["Outgoing"]) == {"localhost:8080", "service.namespace:4242", "example.com:40000"}
    assert set(conf["Incoming"]) == {"*:8080"}
    leaf_pem = pem_blocks(result.env[ENV_CERT_CHAIN])[0].decode()
    marble_root = dep.ca.marble_root.cert_pem.decode()
    for entry in conf["Outgoing"].values():
        assert entry == {
            "cacrt": marble_root,
            "clicrt": leaf_pem,
            "clikey": result.env[ENV_PRIVATE_KEY].decode(),
        }
    # "other" comes last and sets *:8080 with the service_cert secret and client auth off.
    incoming = conf["Incoming"]["*:8080"]
    assert incoming["clientAuth"] is False
    assert incoming["cacrt"] == marble_root
    service = dep.secrets["service_cert"]
    assert service.cert is not None
    assert load_cert(incoming["clicrt"].encode()).public_bytes(serialization.Encoding.DER) == service.cert
    key = serialization.load_pem_private_key(incoming["clikey"].encode(), password=None)
    assert incoming["clikey"].startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public_der(load_cert(incoming["clicrt"].encode())) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert result.env["A"] == b"b"


def test_ttls_tag_order_decides_the_incoming_entry(prepared: PreparedDeployment) -> None:
    result = run(prepared, "tls_second")
    incoming = ttls(result)["Incoming"]["*:8080"]
    assert incoming["clientAuth"] is True
    assert incoming["clicrt"] == pem_blocks(result.env[ENV_CERT_CHAIN])[0].decode()
    assert incoming["clikey"] == result.env[ENV_PRIVATE_KEY].decode()


def test_ttls_for_a_marble_without_env(prepared: PreparedDeployment) -> None:
    value = run(prepared, "tls_solo").env[ENV_TTLS_CONFIG]
    assert value.startswith(b'{"tls":{"Incoming":{"*:2000":{"cacrt":"-----BEGIN CERTIFICATE-----')


def test_marbles_without_tags_have_no_ttls_config(
    backend: ActivationResult, prepared: PreparedDeployment
) -> None:
    assert ENV_TTLS_CONFIG not in backend.env
    assert ENV_TTLS_CONFIG not in run(prepared, "frontend").env


def test_ttls_with_a_per_marble_certificate_secret(dep: Deployment) -> None:
    a = ttls(run(dep, "tls_own"))["Incoming"]["*:9000"]
    b = ttls(run(dep, "tls_own"))["Incoming"]["*:9000"]
    assert a["clientAuth"] is False
    assert a["clicrt"] != b["clicrt"]  # generated per activation
    load_cert(a["clicrt"].encode()).verify_directly_issued_by(dep.ca.marble_root.cert)


def test_ttls_with_an_unset_user_certificate_refuses_naming_it() -> None:
    manifest = manifest_dict()
    manifest["TLS"]["usr"] = {"Incoming": [{"Port": "7000", "Cert": "user_cert", "DisableClientAuth": True}]}
    manifest["Marbles"]["tls_user"] = {"Package": "backend", "TLS": ["usr"]}
    dep = deploy(manifest)
    exc = refused(dep, "tls_user")
    assert exc.reason == "parameters"
    assert "'user_cert'" in exc.message
    assert "TLS.usr.Incoming" in exc.message
    ready = set_user_secrets(dep, user_cert=user_cert(dep))
    entry = ttls(run(ready, "tls_user"))["Incoming"]["*:7000"]
    assert entry["clientAuth"] is False
