"""Deployment ↔ store records: every field survives a round trip; damage is an IntegrityError
that names the record and never shows a secret value."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
from core_support import NOW, assert_no_secrets, deploy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from marblekeep.core.deployment import CoordinatorState, Deployment, PendingUpdate, new_deployment
from marblekeep.core.records import deployment_from_records, deployment_to_records, record_changes
from marblekeep.errors import IntegrityError

Records = dict[str, bytes]


@pytest.fixture(scope="module")
def full() -> Deployment:
    """A deployment with every field set to something other than its default."""
    dep = deploy()
    assert dep.manifest is not None
    token = b"user-token-value"
    packages = dict(dep.manifest.packages)
    packages["backend"] = dataclasses.replace(packages["backend"], security_version=5)
    return dataclasses.replace(
        dep,
        previous_root_secret=bytes(range(32)),
        manifest=dataclasses.replace(dep.manifest, packages=packages),
        secrets={
            **dep.secrets,
            "api_token": dataclasses.replace(dep.secrets["api_token"], private=token, public=token),
        },
        previous_secrets={
            **dep.previous_secrets,
            "shared_key": dataclasses.replace(dep.secrets["shared_key"], private=bytes(32), public=bytes(32)),
        },
        activations={"limited": 2, "backend": 0x1F},
        update_log=('{"seq":1,"event":"manifest set"}', '{"seq":2,"event":"package update"}'),
        update_log_head=b"\x30\x45signature-bytes",
        pending_update=PendingUpdate(
            raw=b'{"Packages":{}}', required_users=("alice", "bob"), required=2, acknowledged=("alice",)
        ),
        package_svns={"backend": 5},
    )


def roundtrip(dep: Deployment) -> Deployment:
    loaded = deployment_from_records(deployment_to_records(dep))
    assert loaded is not None
    return loaded


def test_every_field_survives_a_round_trip(full: Deployment) -> None:
    loaded = roundtrip(full)
    for f in dataclasses.fields(Deployment):
        if f.name == "ca":
            continue
        assert getattr(loaded, f.name) == getattr(full, f.name), f.name
        assert getattr(full, f.name) != f.default, f"the fixture must set {f.name} to a non-default value"
    for name in ("root", "intermediate", "marble_root"):
        original, reloaded = getattr(full.ca, name), getattr(loaded.ca, name)
        assert reloaded.cert_der == original.cert_der, name
        assert reloaded.key_pkcs8_der() == original.key_pkcs8_der(), name


def test_round_trip_is_a_fixed_point(full: Deployment) -> None:
    records = deployment_to_records(full)
    assert deployment_to_records(roundtrip(full)) == records
    assert record_changes(records, deployment_to_records(roundtrip(full))) == {}


def test_the_signature_still_verifies_after_a_round_trip(full: Deployment) -> None:
    loaded = roundtrip(full)
    assert loaded.manifest is not None
    public = loaded.ca.root.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(loaded.manifest_signature, loaded.manifest.raw, ec.ECDSA(hashes.SHA256()))


def test_a_deployment_without_manifest_round_trips() -> None:
    dep = new_deployment(["localhost"], NOW)
    loaded = roundtrip(dep)
    assert loaded.state is CoordinatorState.ACCEPTING_MANIFEST
    assert loaded.manifest is None
    assert loaded.root_secret == dep.root_secret
    assert loaded.seal_master_secret == dep.seal_master_secret
    assert loaded.previous_root_secret is None


def test_no_state_record_means_no_deployment() -> None:
    assert deployment_from_records({}) is None


def test_record_changes_writes_only_the_difference(full: Deployment) -> None:
    before = deployment_to_records(full)
    after = deployment_to_records(dataclasses.replace(full, activations={"limited": 3}))
    changes = record_changes(before, after)
    assert changes == {"activations:limited": b"3", "activations:backend": None}


def test_records_hold_values_not_manifest_definitions(full: Deployment) -> None:
    records = deployment_to_records(full)
    assert records["manifest"] == full.manifest.raw if full.manifest else False
    doc = json.loads(records["secret:api_token"])
    assert set(doc) == {"Cert", "Private", "Public", "ValidFor"}


# --------------------------------------------------------------------------- damage


def put(key: str, value: bytes) -> Callable[[Records], None]:
    def change(records: Records) -> None:
        records[key] = value

    return change


def drop(key: str) -> Callable[[Records], None]:
    def change(records: Records) -> None:
        del records[key]

    return change


def swap(a: str, b: str) -> Callable[[Records], None]:
    def change(records: Records) -> None:
        records[a], records[b] = records[b], records[a]

    return change


DAMAGE: list[tuple[str, Callable[[Records], None], tuple[str, ...]]] = [
    ("state not a number", put("state", b"three"), ("state",)),
    ("state out of range", put("state", b"9"), ("state",)),
    ("state not ascii", put("state", b"\xff"), ("state",)),
    ("root cert missing", drop("certificate:coordinatorRootCert"), ("certificate:coordinatorRootCert",)),
    ("root key missing", drop("privateKey:coordinatorRootKey"), ("privateKey:coordinatorRootKey",)),
    (
        "intermediate cert missing",
        drop("certificate:coordinatorIntermediateCert"),
        ("certificate:coordinatorIntermediateCert",),
    ),
    (
        "intermediate key missing",
        drop("privateKey:coordinatorIntermediateKey"),
        ("privateKey:coordinatorIntermediateKey",),
    ),
    ("marble root missing", drop("certificate:marbleRootCert"), ("certificate:marbleRootCert",)),
    (
        "root cert garbage",
        put("certificate:coordinatorRootCert", b"\x30\x03abc"),
        ("certificate:coordinatorRootCert",),
    ),
    (
        "root key garbage",
        put("privateKey:coordinatorRootKey", b"not a key"),
        ("privateKey:coordinatorRootKey",),
    ),
    (
        "keys swapped",
        swap("privateKey:coordinatorRootKey", "privateKey:coordinatorIntermediateKey"),
        ("certificate:coordinatorRootCert", "privateKey:coordinatorRootKey"),
    ),
    (
        "marble root swapped with the root",
        swap("certificate:marbleRootCert", "certificate:coordinatorRootCert"),
        ("certificate:coordinatorRootCert",),
    ),
    ("root secret missing", drop("rootSecret"), ("rootSecret",)),
    ("root secret short", put("rootSecret", b"short"), ("rootSecret",)),
    ("seal master secret missing", drop("sealMasterSecret"), ("sealMasterSecret",)),
    ("seal master secret long", put("sealMasterSecret", bytes(33)), ("sealMasterSecret",)),
    ("previous root secret short", put("previousRootSecret", bytes(31)), ("previousRootSecret",)),
    ("manifest missing while accepting Marbles", drop("manifest"), ("manifest",)),
    ("manifest invalid", put("manifest", b'{"Packages": {}}'), ("manifest",)),
    ("manifest not json", put("manifest", b"{not json"), ("manifest",)),
    ("signature missing", drop("manifestSignature"), ("manifestSignature",)),
    ("secret not json", put("secret:shared_key", b"{oops"), ("secret:shared_key",)),
    ("secret not an object", put("secret:shared_key", b"[1, 2]"), ("secret:shared_key",)),
    (
        "secret bad base64",
        put("secret:shared_key", b'{"Private": "!!!", "ValidFor": 0}'),
        ("secret:shared_key",),
    ),
    ("secret private not a string", put("secret:shared_key", b'{"Private": 5}'), ("secret:shared_key",)),
    ("secret bad ValidFor", put("secret:shared_key", b'{"ValidFor": "x"}'), ("secret:shared_key",)),
    ("secret missing", drop("secret:shared_key"), ("secret:shared_key",)),
    ("secret for an undefined name", put("secret:nobody", b"{}"), ("secret:nobody",)),
    ("previous secret not json", put("previousSecret:marble_key", b"\x00"), ("previousSecret:marble_key",)),
    ("previous secret undefined", put("previousSecret:ghost", b"{}"), ("previousSecret:ghost",)),
    ("count not hex", put("activations:limited", b"zz"), ("activations:limited",)),
    ("count negative", put("activations:limited", b"-1"), ("activations:limited",)),
    ("count empty", put("activations:limited", b""), ("activations:limited",)),
    ("count with spaces", put("activations:limited", b" 2"), ("activations:limited",)),
    ("pending update not json", put("pendingUpdate", b"{"), ("pendingUpdate",)),
    (
        "package svn not a number",
        put("packageSecurityVersion:backend", b"five"),
        ("packageSecurityVersion:backend",),
    ),
]


@pytest.mark.parametrize(("change", "names"), [(c, n) for _, c, n in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_records_name_the_record(
    full: Deployment, change: Callable[[Records], None], names: tuple[str, ...]
) -> None:
    records = deployment_to_records(full)
    change(records)
    with pytest.raises(IntegrityError) as info:
        deployment_from_records(records)
    for name in names:
        assert name in info.value.message
    assert "restore a backup" in info.value.message
    assert_no_secrets(info.value, full, extra=[b"user-token-value"])


def test_a_damaged_secret_value_is_not_quoted(full: Deployment) -> None:
    records = deployment_to_records(full)
    value = json.loads(records["secret:api_token"])
    value["ValidFor"] = "bad"  # keeps the real (base64) token value in the damaged record
    records["secret:api_token"] = json.dumps(value).encode()
    with pytest.raises(IntegrityError) as info:
        deployment_from_records(records)
    assert "secret:api_token" in info.value.message
    assert value["Private"] not in info.value.message
    assert_no_secrets(info.value, full, extra=[b"user-token-value"])


def test_unknown_records_are_ignored(full: Deployment) -> None:
    records = deployment_to_records(full)
    records["someFutureRecord"] = b"\x00\x01"
    loaded = deployment_from_records(records)
    assert loaded is not None
    assert loaded.root_secret == full.root_secret


def test_uppercase_hex_counts_are_read(full: Deployment) -> None:
    records = deployment_to_records(full)
    records["activations:backend"] = b"1F"
    loaded = deployment_from_records(records)
    assert loaded is not None
    assert loaded.activations["backend"] == 31
