"""Pure governance transitions: permissions, secret reads/writes, package and full updates, the
multi-party acknowledgement rules and their update-log entries (reference §1.7, §1.12, §3.5–§3.7)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from harness import NOW, changed, deployed, governance_manifest_bytes, governance_manifest_doc, user
from marblekeep.core.auditlog import decode_head, verify_log
from marblekeep.core.deployment import Deployment, new_deployment
from marblekeep.core.governance import (
    ALL_ACKNOWLEDGED,
    Permission,
    UpdateKind,
    acknowledge_update,
    cancel_update,
    consolidate_manifest,
    is_package_update,
    is_permitted,
    pending_message,
    read_secrets,
    recovery_keys_changed,
    require_permission,
    update_manifest,
    user_permissions,
    write_secrets,
)
from marblekeep.crypto.signing import verify_manifest_signature
from marblekeep.errors import (
    AuthorizationError,
    ManifestError,
    NotFoundError,
    RequestError,
    SecretUploadError,
    StateError,
)
from marblekeep.manifest import load_manifest, manifest_fingerprint

LATER = NOW + dt.timedelta(minutes=5)
KEY16 = bytes(range(16))


def entries(dep: Deployment) -> list[dict[str, object]]:
    return [json.loads(line) for line in dep.update_log]


def chain_ok(dep: Deployment) -> bool:
    """The log verifies against the head signature stored with the deployment."""
    return verify_log(dep.update_log, decode_head(dep.update_log_head), dep.ca.root.cert).ok


def with_user_key(dep: Deployment, key: bytes = KEY16) -> Deployment:
    return write_secrets(dep, "alice", {"user_key": {"Key": base64.b64encode(key).decode()}}, NOW)


# ------------------------------------------------------------------------------------ permissions


def test_permissions_merge_roles_and_compare_actions_case_insensitively() -> None:
    manifest = deployed().manifest
    assert manifest is not None
    perms = user_permissions(manifest, "alice")
    assert perms["writesecret"] == {"user_key", "user_plain", "user_cert"}  # written "WRITESECRET"
    assert perms["readsecret"] == {"user_key", "user_plain", "user_cert", "shared_key"}
    assert perms["updatesecurityversion"] == {"pkg"}
    assert is_permitted(manifest, "alice", Permission.READ_SECRET, ["user_key", "shared_key"])
    assert not is_permitted(manifest, "alice", Permission.READ_SECRET, ["user_key", "per_key"])
    assert is_permitted(manifest, "bob", Permission.READ_SECRET, ["user_key"])
    assert not is_permitted(manifest, "bob", Permission.WRITE_SECRET, ["user_key"])
    assert user_permissions(manifest, "dave") == {}
    assert user_permissions(manifest, "nobody") == {}


def test_update_manifest_permission_needs_no_resource() -> None:
    manifest = deployed().manifest
    assert manifest is not None
    for name in ("alice", "bob", "carol"):
        assert is_permitted(manifest, name, Permission.UPDATE_MANIFEST)
        require_permission(manifest, name, Permission.UPDATE_MANIFEST)
    with pytest.raises(AuthorizationError, match=r"'dave'.*UpdateManifest"):
        require_permission(manifest, "dave", Permission.UPDATE_MANIFEST)
    with pytest.raises(AuthorizationError, match="lacks ReadSecret on per_key"):
        require_permission(manifest, "alice", Permission.READ_SECRET, ["user_key", "per_key"])


# ------------------------------------------------------------------------------------ secrets


def test_write_is_logged_without_values_and_a_read_changes_nothing() -> None:
    dep = with_user_key(deployed())
    assert dep.secrets["user_key"].private == KEY16
    got = read_secrets(dep, "bob", ["user_key", "shared_key", "user_key"])
    assert list(got) == ["user_key", "shared_key"]
    assert got["user_key"].private == KEY16
    assert got["shared_key"].private == deployed().secrets["shared_key"].private or got["shared_key"].private
    log = entries(dep)
    # reads are not in the public update log (MarbleRun's entries only; issue 11, #8)
    assert [e["update"] for e in log] == ["Initial manifest set", "Secret set"]
    assert log[1] == {**log[1], "user": "alice", "secret": "user_key", "type": "symmetric-key"}
    text = "\n".join(dep.update_log)
    assert KEY16.hex() not in text and base64.b64encode(KEY16).decode() not in text
    assert chain_ok(dep)


def test_read_refusals() -> None:
    dep = deployed()
    with pytest.raises(RequestError, match="at least one"):
        read_secrets(dep, "alice", [])
    with pytest.raises(RequestError, match="empty query parameter"):
        read_secrets(dep, "alice", ["user_key", ""])
    with pytest.raises(RequestError, match="'nope'") as exc:
        read_secrets(dep, "alice", ["user_key", "nope"])
    assert exc.value.problems[0].path == "s=nope"
    with pytest.raises(AuthorizationError):
        read_secrets(dep, "carol", ["user_key"])
    with pytest.raises(AuthorizationError, match="per_key"):  # per-Marble secrets are never readable
        read_secrets(dep, "alice", ["per_key"])


def test_write_needs_write_secret_on_every_name() -> None:
    dep = deployed()
    body = {"user_key": {"Key": base64.b64encode(KEY16).decode()}}
    with pytest.raises(AuthorizationError, match=r"'bob' (lacks|is not allowed)"):
        write_secrets(dep, "bob", body, NOW)
    # a generated secret: no role can grant WriteSecret on it (manifest rule 17)
    with pytest.raises(AuthorizationError, match="lacks WriteSecret on shared_key"):
        write_secrets(dep, "alice", {"shared_key": {"Key": base64.b64encode(KEY16).decode()}}, NOW)
    with pytest.raises(SecretUploadError, match="does not contain"):
        write_secrets(dep, "alice", {"ghost": {"Key": "AAAA"}}, NOW)


def test_multi_secret_write_is_all_or_nothing() -> None:
    dep = deployed()
    body = {
        "user_key": {"Key": base64.b64encode(KEY16).decode()},
        "user_plain": {"Key": base64.b64encode(b"fine").decode(), "Cert": base64.b64encode(b"x").decode()},
    }
    with pytest.raises(SecretUploadError) as exc:
        write_secrets(dep, "alice", body, NOW)
    assert [p.path for p in exc.value.problems] == ["user_plain.Cert"]
    # nothing of it reached the (immutable) deployment; a valid retry sets both at once
    assert not dep.secrets["user_key"].has_value
    body["user_plain"] = {"Key": base64.b64encode(b"fine").decode()}
    new = write_secrets(dep, "alice", body, NOW)
    assert new.secrets["user_key"].private == KEY16 and new.secrets["user_plain"].private == b"fine"
    assert [e["secret"] for e in entries(new)[1:]] == ["user_key", "user_plain"]


def test_write_is_dry_run_against_every_marble_and_never_echoes_the_value() -> None:
    dep = deployed()
    secret_text = b"top\x00secret-value"  # a NUL cannot go into the frontend's Env via `string`
    with pytest.raises(SecretUploadError) as exc:
        write_secrets(dep, "alice", {"user_plain": {"Key": base64.b64encode(secret_text).decode()}}, NOW)
    assert "Marbles.frontend.Parameters.Env.PLAIN" in exc.value.diagnostics()
    assert "secret-value" not in exc.value.diagnostics()
    assert base64.b64encode(secret_text).decode() not in exc.value.diagnostics()


def test_previous_of_a_written_secret_is_its_former_value() -> None:
    first = with_user_key(deployed(), KEY16)
    assert first.previous_secrets["user_key"].private == KEY16  # usable from the first upload on
    second = with_user_key(first, bytes(16))
    assert second.secrets["user_key"].private == bytes(16)
    assert second.previous_secrets["user_key"].private == KEY16


def test_user_defined_certificate_upload() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = x509.load_pem_x509_certificate(user("dave").cert_pem)  # any certificate; key mismatch below
    body = {"user_cert": {"Cert": base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()}}
    dep = write_secrets(deployed(), "alice", body, NOW)
    assert dep.secrets["user_cert"].cert == cert.public_bytes(serialization.Encoding.DER)
    wrong_key = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body["user_cert"]["Private"] = base64.b64encode(wrong_key).decode()
    with pytest.raises(SecretUploadError, match="does not belong"):
        write_secrets(deployed(), "alice", body, NOW)


# ------------------------------------------------------------------------------------ package updates


def svn_update(svn: int | None = 5, **extra: object) -> bytes:
    package: dict[str, object] = {} if svn is None else {"SecurityVersion": svn}
    package.update(extra)
    return json.dumps({"Packages": {"pkg": package}}).encode()


def test_is_package_update_follows_marbleruns_rule() -> None:
    assert is_package_update(b"{}")
    assert is_package_update(svn_update())
    assert is_package_update(b'{"Packages":{"pkg":{"SecurityVersion":3}},"Config":{"UpdateThreshold":9}}')
    assert is_package_update(b'{"packages":{},"Marbles":{},"secrets":null}')
    assert not is_package_update(b'{"Packages":{},"Marbles":{"a":{}}}')
    assert not is_package_update(b'{"users":{"u":{}}}')
    assert not is_package_update(governance_manifest_bytes())
    with pytest.raises(ManifestError, match="JSON object"):
        is_package_update(b"[]")


def test_package_update_raises_svn_and_rotates_only_what_it_should() -> None:
    dep = with_user_key(deployed())
    dep = dataclasses.replace(dep, activations={"backend": 3})
    outcome = update_manifest(dep, "alice", svn_update(5), LATER)
    new = outcome.deployment
    assert outcome.kind is UpdateKind.PACKAGE and outcome.applied
    assert new.manifest is not None and dep.manifest is not None
    assert new.manifest.packages["pkg"].security_version == 5
    assert new.package_svns == {"pkg": 5}
    # raw manifest and signature unchanged; root CA, seal master, counters, symmetric keys too
    assert new.manifest.raw == dep.manifest.raw and new.manifest_signature == dep.manifest_signature
    assert new.ca.root.cert_der == dep.ca.root.cert_der
    assert new.seal_master_secret == dep.seal_master_secret and new.root_secret == dep.root_secret
    assert new.activations == {"backend": 3}
    assert new.secrets["shared_key"] == dep.secrets["shared_key"]
    assert new.secrets["user_key"] == dep.secrets["user_key"]
    # intermediate and Marble root rotate (with the root's custom IP SAN kept)
    assert new.ca.intermediate.cert_der != dep.ca.intermediate.cert_der
    assert new.ca.marble_root.cert_der != dep.ca.marble_root.cert_der
    san = new.ca.intermediate.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.7" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    # the shared certificate is regenerated from the stored one (new key, same NotAfter)
    old_cert = x509.load_der_x509_certificate(dep.secrets["shared_cert"].cert or b"")
    new_cert = x509.load_der_x509_certificate(new.secrets["shared_cert"].cert or b"")
    assert new_cert.serial_number != old_cert.serial_number
    assert new_cert.not_valid_after_utc == old_cert.not_valid_after_utc
    assert new_cert.issuer == new.ca.marble_root.cert.subject
    new_cert.verify_directly_issued_by(new.ca.marble_root.cert)
    last = entries(new)[-1]
    assert list(last)[:5] == ["time", "update", "user", "package", "new version"]
    assert (last["update"], last["user"], last["package"], last["new version"]) == (
        "SecurityVersion increased",
        "alice",
        "pkg",
        5,
    )


def test_package_update_refusals() -> None:
    dep = deployed()
    with pytest.raises(ManifestError, match="downgrade SecurityVersion from 2 to 1"):
        update_manifest(dep, "alice", svn_update(1), NOW)
    assert update_manifest(dep, "alice", svn_update(2), NOW).applied  # equal is allowed
    with pytest.raises(ManifestError, match="does not specify a SecurityVersion"):
        update_manifest(dep, "alice", svn_update(None), NOW)
    for field, value in (("Debug", True), ("UniqueID", "00"), ("SignerID", "00"), ("ProductID", 1)):
        with pytest.raises(ManifestError, match=f"unupdatable values.*{field}"):
            update_manifest(dep, "alice", svn_update(5, **{field: value}), NOW)
    with pytest.raises(ManifestError, match="no packages defined"):
        update_manifest(dep, "alice", b"{}", NOW)
    with pytest.raises(ManifestError, match="original manifest does not contain"):
        update_manifest(dep, "alice", b'{"Packages":{"pkg2":{"SecurityVersion":9}}}', NOW)
    # the permission is checked first, over every listed package
    with pytest.raises(AuthorizationError, match="UpdateSecurityVersion"):
        update_manifest(dep, "carol", svn_update(1), NOW)
    with pytest.raises(ManifestError, match="pkg2"):
        update_manifest(dep, "alice", b'{"Packages":{"pkg":{"SecurityVersion":9},"pkg2":{}}}', NOW)
    with pytest.raises(ManifestError, match="SecurityVersion"):
        update_manifest(dep, "alice", b'{"Packages":{"pkg":{"SecurityVersion":-1}}}', NOW)


def test_consolidate_applies_the_logged_svns_to_the_raw_manifest() -> None:
    dep = deployed()
    dep = update_manifest(dep, "alice", svn_update(4), NOW).deployment
    dep = update_manifest(dep, "alice", svn_update(6), NOW).deployment
    assert dep.manifest is not None
    shown = json.loads(consolidate_manifest(dep.manifest.raw, dep.update_log))
    assert shown["Packages"]["pkg"]["SecurityVersion"] == 6
    assert consolidate_manifest(dep.manifest.raw, dep.update_log[:1]) == dep.manifest.raw


# ------------------------------------------------------------------------------------ full updates


def full(threshold: int = 0, *, edit: object = None, **kwargs: object) -> bytes:
    doc = changed(threshold=threshold, **kwargs)  # type: ignore[arg-type]
    doc["Marbles"]["backend"]["Parameters"]["Env"]["VERSION"] = "2"
    if callable(edit):
        edit(doc)
    return governance_manifest_bytes(doc)


def initiated(threshold: int) -> tuple[Deployment, bytes]:
    dep = deployed(governance_manifest_bytes(threshold=threshold))
    raw = full(threshold)
    return update_manifest(dep, "alice", raw, NOW).deployment, raw


def test_threshold_1_applies_at_once() -> None:
    dep = deployed(governance_manifest_bytes(threshold=1))
    outcome = update_manifest(dep, "alice", full(1), LATER)
    assert outcome.applied and outcome.kind is UpdateKind.FULL
    assert outcome.missing_acknowledgments == 0 and outcome.message == ALL_ACKNOWLEDGED
    new = outcome.deployment
    assert new.pending_update is None and new.manifest is not None and new.manifest.raw == full(1)
    assert [e["update"] for e in entries(new)[1:]] == [
        "Complete Manifest update initiated by user. No further acknowledgements required",
        "Complete Manifest updated",
    ]
    assert entries(new)[-1]["manifestFingerprint"] == manifest_fingerprint(full(1))
    assert chain_ok(new)


def test_threshold_2_needs_one_more_acknowledgement() -> None:
    dep, raw = initiated(2)
    pending = dep.pending_update
    assert pending is not None and pending.missing == 1
    assert pending.required_users == ("alice", "bob", "carol") and pending.acknowledged == ("alice",)
    assert pending_message(pending) == "1 user still needs to acknowledge the update manifest"
    log = entries(dep)[-1]
    assert log["update"] == (
        "Complete Manifest update initiated by user. Waiting for acknowledgments to apply the update"
    )
    assert list(log)[2:6] == ["user", "manifestFingerprint", "missingAcknowledgments", "missingUsers"]
    assert log["missingUsers"] == ["bob", "carol"]
    done = acknowledge_update(dep, "carol", raw, LATER)
    assert done.applied and done.message == ALL_ACKNOWLEDGED
    assert done.deployment.pending_update is None
    assert done.deployment.manifest is not None and done.deployment.manifest.raw == raw
    ack = entries(done.deployment)[-2]
    assert ack["update"] == "Complete Manifest update acknowledged by user"
    assert list(ack)[2:6] == ["user", "missingAcknowledgments", "missingUsers", "manifestFingerprint"]
    assert (ack["user"], ack["missingAcknowledgments"], ack["missingUsers"]) == ("carol", 0, ["bob"])
    assert entries(done.deployment)[-1]["update"] == "Complete Manifest updated"


def test_threshold_0_needs_every_updater() -> None:
    dep, raw = initiated(0)
    assert dep.pending_update is not None and dep.pending_update.missing == 2
    assert pending_message(dep.pending_update) == "2 users still need to acknowledge the update manifest"
    step = acknowledge_update(dep, "bob", raw, NOW)
    assert not step.applied and step.missing_acknowledgments == 1 and step.missing_users == ("carol",)
    assert step.message == (
        "1 user(s) still need(s) to acknowledge the update manifest.\n"
        "The following users have not yet accepted: carol"
    )
    last = acknowledge_update(step.deployment, "carol", raw, NOW)
    assert last.applied and last.deployment.manifest is not None and last.deployment.manifest.raw == raw


def test_acknowledgements_must_be_byte_identical() -> None:
    dep, raw = initiated(0)
    with pytest.raises(RequestError, match="differs from the pending") as exc:
        acknowledge_update(dep, "bob", raw + b" ", NOW)
    assert exc.value.problems[0].path == "manifest"
    with pytest.raises(RequestError):
        acknowledge_update(dep, "bob", raw.replace(b"\n", b"\r\n"), NOW)


def test_the_initiators_repeat_is_a_no_op() -> None:
    dep, raw = initiated(0)
    again = acknowledge_update(dep, "alice", raw, NOW)
    assert again.deployment is dep and not again.applied and again.missing_acknowledgments == 2


def test_a_second_initiation_is_refused_and_so_is_a_package_update() -> None:
    dep, _raw = initiated(0)
    with pytest.raises(StateError, match="update already in progress"):
        update_manifest(dep, "bob", full(0, edit=lambda d: d["Config"].update(RotateRootSecret=True)), NOW)
    with pytest.raises(StateError, match="update already in progress"):
        update_manifest(dep, "alice", svn_update(5), NOW)


def test_cancel_clears_the_pending_update() -> None:
    dep, raw = initiated(0)
    with pytest.raises(AuthorizationError):
        cancel_update(dep, "dave", NOW)  # the permission is checked before anything else
    cancelled = cancel_update(dep, "carol", NOW)
    assert cancelled.pending_update is None
    assert cancelled.manifest == dep.manifest
    last = entries(cancelled)[-1]
    assert (last["update"], last["user"]) == ("Complete Manifest update cancelled by user", "carol")
    assert last["manifestFingerprint"] == manifest_fingerprint(raw)
    with pytest.raises(NotFoundError):
        acknowledge_update(cancelled, "bob", raw, NOW)
    with pytest.raises(NotFoundError):
        cancel_update(cancelled, "bob", NOW)
    # a new update can be started now
    assert update_manifest(cancelled, "bob", raw, NOW).deployment.pending_update is not None


def test_only_required_users_may_acknowledge() -> None:
    dep, raw = initiated(0)
    with pytest.raises(AuthorizationError, match="'dave' is not among"):
        acknowledge_update(dep, "dave", raw, NOW)
    with pytest.raises(AuthorizationError, match="UpdateManifest"):
        update_manifest(deployed(), "dave", full(0), NOW)


def test_an_invalid_update_is_refused_and_nothing_is_pending() -> None:
    dep = deployed()
    bad = full(
        0, edit=lambda d: d["Marbles"]["backend"]["Parameters"]["Env"].update(X="{{ hex .Secrets.ghost }}")
    )
    with pytest.raises(ManifestError, match="ghost"):
        update_manifest(dep, "alice", bad, NOW)
    with pytest.raises(ManifestError):
        update_manifest(dep, "alice", b'{"Marbles":{"x":{"Package":"none"}}}', NOW)
    with pytest.raises(ManifestError, match="threshold"):
        update_manifest(dep, "alice", full(0, edit=lambda d: d["Config"].update(UpdateThreshold=9)), NOW)


def apply_full(dep: Deployment, raw: bytes) -> Deployment:
    """Initiate and let every other updater acknowledge."""
    outcome = update_manifest(dep, "alice", raw, LATER)
    for name in ("bob", "carol"):
        if outcome.applied:
            break
        outcome = acknowledge_update(outcome.deployment, name, raw, LATER)
    assert outcome.applied
    return outcome.deployment


def test_full_update_keeps_the_right_secrets_and_rotates_the_rest() -> None:
    dep = with_user_key(deployed())
    dep = dataclasses.replace(dep, activations={"backend": 4, "frontend": 1})
    dep = update_manifest(dep, "alice", svn_update(7), NOW).deployment

    def edit(doc: dict[str, object]) -> None:
        secrets = doc["Secrets"]
        assert isinstance(secrets, dict)
        del secrets["removable"]
        secrets["added_key"] = {"Type": "symmetric-key", "Size": 256, "Shared": True}

    new = apply_full(dep, full(0, edit=edit))
    assert new.manifest is not None
    # symmetric key unchanged; user-defined kept; removed secret gone (current and previous)
    assert new.secrets["shared_key"].private == dep.secrets["shared_key"].private
    assert new.previous_secrets["shared_key"].private == dep.secrets["shared_key"].private
    assert new.secrets["user_key"].private == KEY16
    assert "removable" not in new.secrets and "removable" not in new.previous_secrets
    assert len(new.secrets["added_key"].private) == 32
    assert new.previous_secrets["added_key"] == new.secrets["added_key"]
    # the shared certificate is regenerated from the manifest; the old one becomes .Previous
    assert new.secrets["shared_cert"].cert != dep.secrets["shared_cert"].cert
    assert new.previous_secrets["shared_cert"].cert == dep.secrets["shared_cert"].cert
    # CA: root stays, intermediate and Marble root rotate; counters, seal master, root secret stay
    assert new.ca.root.cert_der == dep.ca.root.cert_der
    assert new.ca.intermediate.cert_der != dep.ca.intermediate.cert_der
    assert new.ca.marble_root.cert_der != dep.ca.marble_root.cert_der
    assert new.activations == {"backend": 4, "frontend": 1}
    assert new.seal_master_secret == dep.seal_master_secret and new.root_secret == dep.root_secret
    # the new raw manifest is signed; package-update SVNs give way to the manifest's
    assert verify_manifest_signature(new.ca.root.cert, new.manifest.raw, new.manifest_signature)
    assert new.package_svns == {} and new.manifest.packages["pkg"].security_version == 2


def test_user_defined_secret_is_reset_when_its_definition_changes() -> None:
    dep = with_user_key(deployed())
    kept = apply_full(dep, full(0))
    assert kept.secrets["user_key"].private == KEY16

    def resize(doc: dict[str, object]) -> None:
        doc["Secrets"]["user_key"]["Size"] = 256  # type: ignore[index]

    reset = apply_full(dep, full(0, edit=resize))
    assert not reset.secrets["user_key"].has_value
    assert reset.secrets["user_key"].size == 256


def test_cert_template_changes_do_not_reset_user_defined_secrets() -> None:
    """MarbleRun's EqualDefinition ignores Cert: only Type, Size, Shared, UserDefined, ValidFor."""
    cert_der = x509.load_pem_x509_certificate(user("dave").cert_pem).public_bytes(serialization.Encoding.DER)
    dep = write_secrets(
        deployed(), "alice", {"user_cert": {"Cert": base64.b64encode(cert_der).decode()}}, NOW
    )

    def template(doc: dict[str, object]) -> None:
        doc["Secrets"]["user_cert"]["Cert"] = {"Subject": {"CommonName": "x"}}  # type: ignore[index]

    assert apply_full(dep, full(0, edit=template)).secrets["user_cert"].cert == cert_der


def test_rotate_root_secret_keeps_the_old_one_as_previous() -> None:
    dep = deployed()
    new = apply_full(dep, full(0, rotate=True))
    assert new.root_secret != dep.root_secret and len(new.root_secret) == 32
    assert new.previous_root_secret == dep.root_secret
    # rotation regenerates shared symmetric keys and keeps the old value as .Previous
    assert new.secrets["shared_key"].private != dep.secrets["shared_key"].private
    assert new.previous_secrets["shared_key"].private == dep.secrets["shared_key"].private
    assert new.seal_master_secret == dep.seal_master_secret


def test_rotation_with_a_changed_definition_has_no_previous_backup() -> None:
    dep = deployed()

    def resize(doc: dict[str, object]) -> None:
        doc["Secrets"]["shared_key"]["Size"] = 256  # type: ignore[index]

    new = apply_full(dep, full(0, rotate=True, edit=resize))
    assert len(new.secrets["shared_key"].private) == 32
    assert new.previous_secrets["shared_key"] == new.secrets["shared_key"]


def test_recovery_keys_changed() -> None:
    base = load_manifest(governance_manifest_bytes())
    rsa_pem = (
        "-----BEGIN PUBLIC KEY-----\n"
        + "\n".join(_rsa_pub()[i : i + 64] for i in range(0, len(_rsa_pub()), 64))
        + "\n-----END PUBLIC KEY-----\n"
    )

    def with_keys(keys: dict[str, str], threshold: int = 0) -> object:
        return dataclasses.replace(
            base,
            recovery_keys=keys,
            config=dataclasses.replace(base.config, recovery_threshold=threshold),
        )

    one, two = {"a": rsa_pem}, {"a": rsa_pem, "b": rsa_pem}
    assert not recovery_keys_changed(base, base)
    assert recovery_keys_changed(base, with_keys(one))  # type: ignore[arg-type]
    assert recovery_keys_changed(with_keys(one), with_keys({"a": rsa_pem + " "}))  # type: ignore[arg-type]
    assert not recovery_keys_changed(with_keys(two, 0), with_keys(two, 2))  # type: ignore[arg-type]
    assert recovery_keys_changed(with_keys({**two, "c": rsa_pem}, 0), with_keys({**two, "c": rsa_pem}, 2))  # type: ignore[arg-type]


def _rsa_pub() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def test_update_needs_state_3() -> None:
    fresh = new_deployment(["localhost"], NOW)
    with pytest.raises(StateError, match="not in expected state"):
        update_manifest(fresh, "alice", svn_update(), NOW)
    with pytest.raises(StateError):
        read_secrets(fresh, "alice", ["user_key"])


def test_manifest_doc_sanity() -> None:
    """The test manifest really gives dave no role and three updaters."""
    doc = governance_manifest_doc()
    assert doc["Users"]["dave"]["Roles"] == []
    assert sum("updater" in u["Roles"] for u in doc["Users"].values()) == 3


# ------------------------------------------------------------------ dry run with the values' shapes


def _uses_user_key_cert(doc: dict[str, object]) -> None:
    doc["Marbles"]["frontend"]["Parameters"]["Files"] = {"/k.pem": "{{ pem .Secrets.user_key.Cert }}"}  # type: ignore[index]


def test_update_dry_run_uses_the_real_shape_of_kept_secrets() -> None:
    # A user-defined secret may hold a certificate, so its placeholder has one and the manifest
    # is accepted; once a symmetric key was uploaded, a full update that reads its .Cert would break
    # every activation of the frontend: it is refused.
    dep = with_user_key(deployed())
    raw = full(edit=_uses_user_key_cert)
    load_manifest(raw)  # fine with placeholders
    with pytest.raises(ManifestError) as exc:
        update_manifest(dep, "alice", raw, LATER)
    assert [p.path for p in exc.value.problems] == ["Marbles.frontend.Parameters.Files./k.pem"]
    assert "empty value" in exc.value.problems[0].message


def test_upload_dry_run_refuses_a_value_without_the_part_a_template_reads() -> None:
    doc = changed()
    _uses_user_key_cert(doc)
    dep = deployed(governance_manifest_bytes(doc))  # set: the user-defined placeholder has a certificate
    with pytest.raises(SecretUploadError) as exc:
        with_user_key(dep)  # a symmetric key has no certificate
    assert "Marbles.frontend.Parameters.Files./k.pem" in exc.value.diagnostics()
    assert KEY16.hex() not in exc.value.diagnostics()


def test_update_refuses_cert_of_a_generated_symmetric_key() -> None:
    def edit(doc: dict[str, object]) -> None:
        doc["Marbles"]["backend"]["Parameters"]["Files"]["/s.pem"] = "{{ pem .Secrets.shared_key.Cert }}"  # type: ignore[index]

    with pytest.raises(ManifestError) as exc:
        update_manifest(deployed(), "alice", full(edit=edit), LATER)
    assert "Marbles.backend.Parameters.Files./s.pem" in [p.path for p in exc.value.problems]


def test_a_403_names_the_resources_even_for_a_user_without_any_role() -> None:
    with pytest.raises(AuthorizationError) as exc:
        write_secrets(deployed(), "dave", {"user_key": {"Key": base64.b64encode(KEY16).decode()}}, NOW)
    assert "'dave'" in exc.value.message and "WriteSecret" in exc.value.message
    assert "user_key" in exc.value.message


def test_mistyped_secret_names_get_a_suggestion() -> None:
    with pytest.raises(RequestError) as read:
        read_secrets(deployed(), "alice", ["user_kye"])
    assert 'did you mean "user_key"?' in read.value.diagnostics()
    with pytest.raises(SecretUploadError) as write:
        write_secrets(deployed(), "alice", {"user_plian": {"Key": base64.b64encode(b"x").decode()}}, NOW)
    assert 'did you mean "user_plain"?' in write.value.diagnostics()
