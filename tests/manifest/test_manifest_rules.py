"""Every rule of MarbleRun's Check (reference §1.11, 1–28) and the set-time checks.

Each case is a mutation of a minimal valid manifest that breaks one rule (a problem at the
expected path with the expected text) and a mutation that satisfies it (no problem at all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from manifest_support import (
    base,
    check,
    dumps,
    ec_public_pem,
    paths,
    problem_at,
    rsa_public_pem,
    user_cert_pem,
    warning_at,
)

from marblekeep.manifest import load_manifest

M = dict[str, Any]


def _set(*pairs: tuple[str, Any]) -> Callable[[M], None]:
    """A mutation setting dotted paths (``"Marbles.m.TLS"``) to values."""

    def mutate(m: M) -> None:
        for dotted, value in pairs:
            *parents, last = dotted.split(".")
            node = m
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value

    return mutate


def _with_secret(name: str, **fields: Any) -> tuple[str, Any]:
    return (f"Secrets.{name}", fields)


USER_A = user_cert_pem("a")
USER_B = user_cert_pem("b")
SYM_SHARED = _with_secret("shared", Type="symmetric-key", Size=128, Shared=True)
SYM_PRIVATE = _with_secret("perm", Type="symmetric-key", Size=128)
PLAIN_UD = _with_secret("token", Type="plain", UserDefined=True)
CERT = _with_secret("cert", Type="cert-ecdsa", Size=256, Shared=True)
TLS_MARBLE = ("Marbles.m.TLS", ["web"])


def _role(resource_type: str, names: list[str] | None, actions: list[str]) -> tuple[str, Any]:
    role: dict[str, Any] = {"ResourceType": resource_type, "Actions": actions}
    if names is not None:
        role["ResourceNames"] = names
    return ("Roles.r", role)


def _user(name: str, cert: str, roles: list[str]) -> tuple[str, Any]:
    return (f"Users.{name}", {"Certificate": cert, "Roles": roles})


RSA_PEM = rsa_public_pem(2048)
RSA_PEM_3072 = rsa_public_pem(3072)
MANIFEST_ROLE = _role("Manifest", None, ["UpdateManifest"])

# (id, breaking mutation, path, text in the message, fixing mutation)
RULES: list[tuple[str, Callable[[M], None], str, str, Callable[[M], None]]] = [
    ("1-no-packages", _set(("Packages", {})), "Packages", "no allowed packages defined", _set()),
    ("2-no-marbles", _set(("Marbles", {})), "Marbles", "no allowed marbles defined", _set()),
    (
        "3-unknown-package",
        _set(("Marbles.m.Package", "pk")),
        "Marbles.m.Package",
        'no package "pk" (did you mean "pkg"?)',
        _set(("Marbles.m.Package", "pkg")),
    ),
    (
        "4-uniqueid-and-signer",
        _set(("Packages.pkg.UniqueID", "00" * 32)),
        "Packages.pkg",
        "both UniqueID and SignerID/ProductID/SecurityVersion",
        _set(("Packages.pkg", {"UniqueID": "00" * 32})),
    ),
    (
        "5-missing-signerid",
        _set(("Packages.pkg", {"ProductID": 1, "SecurityVersion": 1})),
        "Packages.pkg.SignerID",
        "missing",
        _set(("Packages.pkg", {"ProductID": 1, "SecurityVersion": 1, "SignerID": "ab"})),
    ),
    (
        "5-missing-productid",
        _set(("Packages.pkg", {"SignerID": "ab", "SecurityVersion": 1})),
        "Packages.pkg.ProductID",
        "missing",
        _set(("Packages.pkg", {"SignerID": "ab", "SecurityVersion": 1, "ProductID": 0})),
    ),
    (
        "5-missing-securityversion",
        _set(("Packages.pkg", {"SignerID": "ab", "ProductID": 1})),
        "Packages.pkg.SecurityVersion",
        "missing",
        _set(("Packages.pkg", {"SignerID": "ab", "ProductID": 1, "SecurityVersion": 0})),
    ),
    (
        "6-missing-tls-tag",
        _set(TLS_MARBLE),
        "Marbles.m.TLS[0]",
        'no TLS tag "web"',
        _set(TLS_MARBLE, ("TLS.web", {"Incoming": [{"Port": "8443"}]})),
    ),
    (
        "7-incoming-port",
        _set(("TLS.web", {"Incoming": [{"Port": ""}]})),
        "TLS.web.Incoming[0].Port",
        "missing",
        _set(("TLS.web", {"Incoming": [{"Port": "1"}]})),
    ),
    (
        "8-incoming-cert-secret",
        _set(("TLS.web", {"Incoming": [{"Port": "1", "Cert": "crt", "DisableClientAuth": True}]}), CERT),
        "TLS.web.Incoming[0].Cert",
        'no secret "crt" (did you mean "cert"?)',
        _set(("TLS.web", {"Incoming": [{"Port": "1", "Cert": "cert", "DisableClientAuth": True}]}), CERT),
    ),
    (
        "9-cert-needs-disable-client-auth",
        _set(("TLS.web", {"Incoming": [{"Port": "1", "Cert": "cert"}]}), CERT),
        "TLS.web.Incoming[0].DisableClientAuth",
        "set DisableClientAuth to true",
        _set(("TLS.web", {"Incoming": [{"Port": "1", "Cert": "cert", "DisableClientAuth": True}]}), CERT),
    ),
    (
        "10-disable-client-auth-needs-cert",
        _set(("TLS.web", {"Incoming": [{"Port": "1", "DisableClientAuth": True}]})),
        "TLS.web.Incoming[0].DisableClientAuth",
        "only be disabled together with a custom Cert",
        _set(("TLS.web", {"Incoming": [{"Port": "1", "DisableClientAuth": False}]})),
    ),
    (
        "11-outgoing-addr",
        _set(("TLS.web", {"Outgoing": [{"Port": "1"}]})),
        "TLS.web.Outgoing[0].Addr",
        "missing",
        _set(("TLS.web", {"Outgoing": [{"Port": "1", "Addr": "db"}]})),
    ),
    (
        "11-outgoing-port",
        _set(("TLS.web", {"Outgoing": [{"Addr": "db"}]})),
        "TLS.web.Outgoing[0].Port",
        "missing",
        _set(("TLS.web", {"Outgoing": [{"Port": "1", "Addr": "db"}]})),
    ),
    (
        "12-user-certificate",
        _set(_user("u", "", [])),
        "Users.u.Certificate",
        "missing",
        _set(_user("u", USER_A, [])),
    ),
    (
        "13-user-role",
        _set(_user("u", USER_A, ["readers"]), _role("Manifest", None, ["UpdateManifest"])),
        "Users.u.Roles[0]",
        'no role "readers"',
        _set(_user("u", USER_A, ["r"]), _role("Manifest", None, ["UpdateManifest"])),
    ),
    (
        "14-same-certificate",
        _set(_user("a", USER_A, []), _user("b", USER_A, [])),
        "Users.b.Certificate",
        'same certificate as user "a"',
        _set(_user("a", USER_A, []), _user("b", USER_B, [])),
    ),
    (
        "15-packages-resource",
        _set(_role("Packages", ["pkgg"], ["UpdateSecurityVersion"])),
        "Roles.r.ResourceNames[0]",
        'no package "pkgg" (did you mean "pkg"?)',
        _set(_role("Packages", ["pkg"], ["updatesecurityversion"])),
    ),
    (
        "15-packages-action",
        _set(_role("Packages", ["pkg"], ["ReadSecret"])),
        "Roles.r.Actions[0]",
        'unknown action "ReadSecret" for ResourceType Packages',
        _set(_role("Packages", ["pkg"], ["UpdateSecurityVersion"])),
    ),
    (
        "16-secrets-action",
        _set(_role("Secrets", ["shared"], ["DeleteSecret"]), SYM_SHARED),
        "Roles.r.Actions[0]",
        'unknown action "DeleteSecret"',
        _set(_role("Secrets", ["shared"], ["READSECRET"]), SYM_SHARED),
    ),
    (
        "16-secrets-resource",
        _set(_role("Secrets", ["sharde"], ["ReadSecret"]), SYM_SHARED),
        "Roles.r.ResourceNames[0]",
        'no secret "sharde" (did you mean "shared"?)',
        _set(_role("Secrets", ["shared"], ["ReadSecret"]), SYM_SHARED),
    ),
    (
        "17-write-needs-user-defined",
        _set(_role("Secrets", ["shared"], ["WriteSecret"]), SYM_SHARED),
        "Roles.r.ResourceNames[0]",
        "which is not user-defined",
        _set(_role("Secrets", ["token"], ["WriteSecret"]), PLAIN_UD),
    ),
    (
        "18-read-per-marble",
        _set(_role("Secrets", ["perm"], ["ReadSecret"]), SYM_PRIVATE),
        "Roles.r.ResourceNames[0]",
        "per-Marble secret",
        _set(_role("Secrets", ["perm"], ["ReadSecret"]), ("Secrets.perm", {"Type": "symmetric-key",
                                                                          "Size": 128, "Shared": True})),
    ),
    (
        "19-manifest-resource-names",
        _set(_role("Manifest", ["x"], ["UpdateManifest"])),
        "Roles.r.ResourceNames",
        "not allowed for ResourceType Manifest",
        _set(_role("Manifest", [], ["UpdateManifest"])),
    ),
    (
        "19-manifest-action",
        _set(_role("Manifest", None, ["UpdateSecurityVersion"])),
        "Roles.r.Actions[0]",
        'unknown action "UpdateSecurityVersion" for ResourceType Manifest',
        _set(_role("Manifest", None, ["updateManifest"])),
    ),
    (
        "20-resource-type",
        _set(_role("secrets", ["shared"], ["ReadSecret"]), SYM_SHARED),
        "Roles.r.ResourceType",
        'unknown resource type "secrets" (did you mean "Secrets"?)',
        _set(_role("Secrets", ["shared"], ["ReadSecret"]), SYM_SHARED),
    ),
    (
        "21-secret-type",
        _set(_with_secret("s", Type="symmetric_key", Size=128)),
        "Secrets.s.Type",
        'unknown type "symmetric_key" (did you mean "symmetric-key"?)',
        _set(_with_secret("s", Type="symmetric-key", Size=128)),
    ),
    (
        "22-notafter-and-validfor",
        _set(_with_secret("c", Type="cert-ed25519", ValidFor=7, Cert={"NotAfter": "2030-01-01T00:00:00Z"})),
        "Secrets.c.ValidFor",
        "ambiguous certificate validity",
        _set(_with_secret("c", Type="cert-ed25519", Cert={"NotAfter": "2030-01-01T00:00:00Z"})),
    ),
    (
        "23-update-threshold",
        _set(("Config.UpdateThreshold", 2), _user("a", USER_A, ["r"]), MANIFEST_ROLE),
        "Config.UpdateThreshold",
        "not enough users with manifest update permission (1) to meet the threshold of 2",
        _set(("Config.UpdateThreshold", 1), _user("a", USER_A, ["r"]), MANIFEST_ROLE),
    ),
    (
        "24-seal-mode",
        _set(("Config.SealMode", "uniquekey")),
        "Config.SealMode",
        'unknown seal mode "uniquekey" (did you mean "UniqueKey"?)',
        _set(("Config.SealMode", "UniqueKey")),
    ),
    (
        "25-feature-gate",
        _set(("Config.FeatureGates", ["MonotonicCountr"])),
        "Config.FeatureGates[0]",
        'unknown feature gate "MonotonicCountr" (did you mean "MonotonicCounter"?)',
        _set(("Config.FeatureGates", ["monotoniccounter", "SIGNQUOTEENDPOINT"])),
    ),
    (
        "26-azure-hsm-sealing",
        _set(("Config.FeatureGates", ["AzureHSMSealing"])),
        "Config.FeatureGates[0]",
        "AzureHSMSealing is not supported by marblekeep",
        _set(("Config.FeatureGates", [])),
    ),
    (
        "27-recovery-keys",
        _set(("Config.RecoveryThreshold", 2), ("RecoveryKeys", {"a": rsa_public_pem()})),
        "Config.RecoveryThreshold",
        "not enough recovery keys (1) for a threshold of 2",
        _set(("Config.RecoveryThreshold", 2), ("RecoveryKeys", {"a": RSA_PEM, "b": RSA_PEM_3072})),
    ),
    (
        "28-recovery-threshold-one",
        _set(("Config.RecoveryThreshold", 1), ("RecoveryKeys", {"a": rsa_public_pem()})),
        "Config.RecoveryThreshold",
        "threshold must be at least 2",
        _set(("Config.RecoveryThreshold", 0), ("RecoveryKeys", {"a": rsa_public_pem()})),
    ),
    # -- set-time checks ------------------------------------------------------------------------
    (
        "symmetric-size-zero",
        _set(_with_secret("k", Type="symmetric-key")),
        "Secrets.k.Size",
        "nonzero multiple of 8",
        _set(_with_secret("k", Type="symmetric-key", Size=8)),
    ),
    (
        "symmetric-size-not-multiple-of-8",
        _set(_with_secret("k", Type="symmetric-key", Size=12)),
        "Secrets.k.Size",
        "nonzero multiple of 8",
        _set(_with_secret("k", Type="symmetric-key", Size=16)),
    ),
    (
        "symmetric-size-above-hkdf-limit",
        _set(_with_secret("k", Type="symmetric-key", Size=65288)),
        "Secrets.k.Size",
        "at most 65280 bits",
        _set(_with_secret("k", Type="symmetric-key", Size=65280)),
    ),
    (
        "ecdsa-size",
        _set(_with_secret("c", Type="cert-ecdsa", Size=512)),
        "Secrets.c.Size",
        "224, 256, 384 or 521",
        _set(_with_secret("c", Type="cert-ecdsa", Size=521)),
    ),
    (
        "ed25519-size",
        _set(_with_secret("c", Type="cert-ed25519", Size=384)),
        "Secrets.c.Size",
        "fixed key size",
        _set(_with_secret("c", Type="cert-ed25519", Size=0)),
    ),
    (
        "rsa-size-too-small",
        _set(_with_secret("c", Type="cert-rsa", Size=1024)),
        "Secrets.c.Size",
        "between 2048 and 8192",
        _set(_with_secret("c", Type="cert-rsa", Size=2048)),
    ),
    (
        "rsa-size-too-big",
        _set(_with_secret("c", Type="cert-rsa", Size=16384)),
        "Secrets.c.Size",
        "between 2048 and 8192",
        _set(_with_secret("c", Type="cert-rsa", Size=8192)),
    ),
    (
        "plain-must-be-user-defined",
        _set(_with_secret("p", Type="plain")),
        "Secrets.p.UserDefined",
        "set UserDefined: true",
        _set(_with_secret("p", Type="plain", UserDefined=True)),
    ),
    (
        "recovery-key-pkcs1",
        _set(("RecoveryKeys", {"k": rsa_public_pem(pkcs1=True)})),
        "RecoveryKeys.k",
        "given PEM data is not a public key (found a RSA PUBLIC KEY block)",
        _set(("RecoveryKeys", {"k": rsa_public_pem()})),
    ),
    (
        "recovery-key-not-rsa",
        _set(("RecoveryKeys", {"k": ec_public_pem()})),
        "RecoveryKeys.k",
        "not an RSA key",
        _set(("RecoveryKeys", {"k": rsa_public_pem(3072)})),
    ),
    (
        "recovery-key-too-small",
        _set(("RecoveryKeys", {"k": rsa_public_pem(1024)})),
        "RecoveryKeys.k",
        "too small",
        _set(("RecoveryKeys", {"k": rsa_public_pem(2048)})),
    ),
    (
        "user-certificate-not-pem",
        _set(_user("u", "cert-alice", [])),
        "Users.u.Certificate",
        "not a PEM certificate",
        _set(_user("u", USER_A, [])),
    ),
    (
        "user-certificate-bad-der",
        _set(_user("u", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", [])),
        "Users.u.Certificate",
        "not a valid X.509 certificate",
        _set(_user("u", "some text before\n" + USER_A + "trailing junk", [])),
    ),
    (
        "env-nul",
        _set(("Marbles.m.Parameters.Env.X", "a\u0000b")),
        "Marbles.m.Parameters.Env.X",
        "NUL byte",
        _set(("Marbles.m.Parameters.Env.X", "ab"), ("Marbles.m.Parameters.Files./x", "a\u0000b")),
    ),
    (
        "env-nul-from-base64-with-notemplates",
        _set(("Marbles.m.Parameters.Env.X", {"Encoding": "base64", "Data": "YQBi", "NoTemplates": True})),
        "Marbles.m.Parameters.Env.X",
        "NUL byte",
        _set(("Marbles.m.Parameters.Env.X", {"Encoding": "base64", "Data": "YWJj", "NoTemplates": True})),
    ),
    (
        "env-nul-from-hex",
        _set(("Marbles.m.Parameters.Env.X", {"Encoding": "hex", "Data": "6100"})),
        "Marbles.m.Parameters.Env.X",
        "NUL byte",
        _set(("Marbles.m.Parameters.Env.X", {"Encoding": "hex", "Data": "6162"})),
    ),
    (
        "tdx-package-with-sgx-ids",
        _set(("Packages.pkg.TDX", {"MRTD": "ab" * 48})),
        "Packages.pkg.SignerID",
        "not allowed in a TDX package",
        _set(("Packages.pkg", {"TDX": {"MRTD": "ab" * 48}})),
    ),
    (
        "template-dry-run",
        _set(("Marbles.m.Parameters.Files./k", "{{ raw .Secrets.nope }}"), SYM_SHARED),
        "Marbles.m.Parameters.Files./k",
        "template:",
        _set(("Marbles.m.Parameters.Files./k", "{{ raw .Secrets.shared }}"), SYM_SHARED),
    ),
]


@pytest.mark.parametrize(("name", "bad", "path", "fragment", "good"), RULES, ids=[r[0] for r in RULES])
def test_rule(
    name: str, bad: Callable[[M], None], path: str, fragment: str, good: Callable[[M], None]
) -> None:
    broken = base()
    bad(broken)
    result = check(broken)
    assert not result.valid
    assert fragment in problem_at(result, path)
    fixed = base()
    good(fixed)
    result = check(fixed)
    assert result.valid, [str(p) for p in result.problems]


def test_debug_turns_package_rules_into_warnings() -> None:
    # §11 item 4: each missing field fails in non-debug and passes in debug; the same for UniqueID+others.
    for field in ("SignerID", "ProductID", "SecurityVersion"):
        m = base()
        del m["Packages"]["pkg"][field]
        assert problem_at(check(m), f"Packages.pkg.{field}").startswith("missing")
        m["Packages"]["pkg"]["Debug"] = True
        result = check(m)
        assert result.valid
        assert "allowed because Debug is true" in warning_at(result, f"Packages.pkg.{field}")
    m = base()
    m["Packages"]["pkg"]["UniqueID"] = "00"
    assert "both UniqueID" in problem_at(check(m), "Packages.pkg")
    m["Packages"]["pkg"]["Debug"] = True
    result = check(m)
    assert result.valid
    assert "both UniqueID" in warning_at(result, "Packages.pkg")


def test_unreferenced_packages_are_not_checked() -> None:
    m = base()
    m["Packages"]["unused"] = {"SignerID": "", "UniqueID": "aa", "ProductID": 1}
    assert check(m).valid


def test_rule5_reports_each_missing_field() -> None:
    m = base()
    m["Packages"]["pkg"] = {}
    assert paths(check(m)) == [
        "Packages.pkg.SignerID",
        "Packages.pkg.ProductID",
        "Packages.pkg.SecurityVersion",
    ]


def test_update_threshold_counts_each_user_once() -> None:
    # §11 item 3: a user holding 3 update roles counts once; threshold 0, equal or below passes.
    m = base()
    m["Roles"] = {r: {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]} for r in ("r1", "r2", "r3")}
    m["Users"] = {
        "a": {"Certificate": USER_A, "Roles": ["r1", "r2", "r3"]},
        "b": {"Certificate": USER_B, "Roles": ["r1"]},
    }
    for threshold, valid in ((0, True), (1, True), (2, True), (3, False)):
        m["Config"] = {"UpdateThreshold": threshold}
        assert check(m).valid is valid, threshold


def test_user_defined_symmetric_key_without_size_is_accepted_with_warning() -> None:
    m = base()
    m["Secrets"] = {"k": {"Type": "symmetric-key", "UserDefined": True}}
    result = check(m)
    assert result.valid
    assert "every upload of it is refused" in warning_at(result, "Secrets.k.Size")


def test_user_defined_cert_sizes_are_not_checked() -> None:
    m = base()
    m["Secrets"] = {"c": {"Type": "cert-rsa", "Size": 1024, "UserDefined": True}}
    assert check(m).valid


def test_tls_cert_of_non_certificate_secret_warns() -> None:
    m = base()
    m["Secrets"] = {"k": {"Type": "symmetric-key", "Size": 128, "Shared": True}}
    m["TLS"] = {"web": {"Incoming": [{"Port": "1", "Cert": "k", "DisableClientAuth": True}]}}
    result = check(m)
    assert result.valid
    assert "not a certificate" in warning_at(result, "TLS.web.Incoming[0].Cert")


def test_unknown_tcb_status_warns() -> None:
    m = base()
    m["Packages"]["pkg"]["AcceptedTCBStatuses"] = ["SWHardeningNeded"]
    result = check(m)
    assert result.valid
    assert 'did you mean "SWHardeningNeeded"' in warning_at(result, "Packages.pkg.AcceptedTCBStatuses[0]")


def test_hint_lists_defined_names_when_nothing_is_close() -> None:
    m = base()
    m["Marbles"]["m"]["Package"] = "zzzzzz"
    assert problem_at(check(m), "Marbles.m.Package") == 'no package "zzzzzz" in Packages (defined: "pkg")'


def test_parse_errors_do_not_cascade_into_rule_errors() -> None:
    m = base()
    m["Packages"] = ["not", "a", "map"]
    result = check(m)
    # Packages is reported once (type), not also as "no packages"; the Marble's package is unknown.
    assert paths(result) == ["Packages", "Marbles.m.Package"]


def test_valid_manifest_loads_into_model() -> None:
    m = base()
    m["Secrets"] = {"k": {"Type": "symmetric-key", "Size": 128, "Shared": True}}
    m["Users"] = {"a": {"Certificate": USER_A, "Roles": ["r"]}}
    m["Roles"] = {"r": {"ResourceType": "Secrets", "ResourceNames": ["k"], "Actions": ["ReadSecret"]}}
    m["Config"] = {"FeatureGates": ["signquoteendpoint"]}
    manifest = load_manifest(dumps(m))
    assert manifest.users["a"].roles == ("r",)
    assert manifest.roles["r"].actions == ("ReadSecret",)
    assert manifest.config.feature_gates == ("SignQuoteEndpoint",)
    assert manifest.config.feature_enabled("SIGNQUOTEENDPOINT")
