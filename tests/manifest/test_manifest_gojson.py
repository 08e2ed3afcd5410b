"""Go encoding/json semantics of manifest parsing (reference §1.1, §1.5, §1.6, §11 item 1)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

import pytest
from manifest_support import SIGNER, base, cert_der, check, dumps, paths, problem_at

from marblekeep.errors import ManifestError
from marblekeep.manifest import load_manifest, manifest_fingerprint
from marblekeep.manifest.model import SealMode, SecretType

PKG = b'{"Packages": {"pkg": {"SignerID": "' + SIGNER.encode() + b'", "ProductID": 1, "SecurityVersion": 1}}'


def test_raw_bytes_are_kept_exactly_and_fingerprinted() -> None:
    raw = b'{ "Packages" : {"pkg": {"SignerID": "' + SIGNER.encode() + b'", "ProductID": 1,\n'
    raw += b'"SecurityVersion": 1}}, "Marbles": {"m": {"Package": "pkg"}} }  \n'
    manifest = load_manifest(raw)
    assert manifest.raw == raw
    assert manifest_fingerprint(raw) == hashlib.sha256(raw).hexdigest()


def test_keys_match_case_insensitively() -> None:
    raw = (
        b'{"packages": {"pkg": {"signerid": "' + SIGNER.encode() + b'", "PRODUCTID": 7,'
        b' "securityVersion": 2}},'
        b' "mArBlEs": {"m": {"package": "pkg", "maxactivations": 3}}, "config": {"sealmode": "UniqueKey"}}'
    )
    manifest = load_manifest(raw)
    assert manifest.packages["pkg"].signer_id == SIGNER
    assert manifest.packages["pkg"].product_id == 7
    assert manifest.packages["pkg"].security_version == 2
    assert manifest.marbles["m"].max_activations == 3
    assert manifest.config.seal_mode is SealMode.UNIQUE_KEY


def test_go_folding_of_long_s_and_kelvin_sign() -> None:
    # Go's EqualFold folds U+017F (long s) to "s" and U+212A (Kelvin sign) to "k".
    m = base()
    m["Secrets"] = {"k": {"Type": "symmetric-key", "\u017fize": 128}}
    m["Marbles"]["m"]["Parameters"] = {"Env": {"K": "{{ hex .Secrets.k }}"}}
    manifest = load_manifest(dumps(m))
    assert manifest.secrets["k"].size == 128


def test_map_keys_are_exact_not_folded() -> None:
    m = base()
    m["Marbles"]["m"]["Package"] = "PKG"
    assert problem_at(check(m), "Marbles.m.Package").startswith('no package "PKG"')


def test_unknown_keys_are_ignored_with_a_warning() -> None:
    m = base()
    m["Whatever"] = {"deep": [1, 2, {"x": None}]}
    m["Packages"]["pkg"]["Comment"] = "not a field"
    m["Marbles"]["m"]["MaxActivation"] = 3
    result = check(m)
    assert result.valid
    assert load_manifest(dumps(m)).marbles["m"].max_activations == 0
    assert [str(w) for w in result.warnings] == [
        "Whatever: unknown field, ignored",
        "Packages.pkg.Comment: unknown field, ignored",
        'Marbles.m.MaxActivation: unknown field, ignored (did you mean "MaxActivations"?)',
    ]


def test_go_certificate_fields_not_applied_are_warned() -> None:
    m = base()
    m["Secrets"] = {
        "c": {
            "Type": "cert-ed25519",
            "Cert": {
                "PermittedDNSDomains": ["example.com"],
                "Subject": {"DNSNames": ["x"], "CommonName": "x"},
            },
        }
    }
    result = check(m)
    assert result.valid
    messages = {w.path: w.message for w in result.warnings}
    assert "does not apply" in messages["Secrets.c.Cert.PermittedDNSDomains"]
    assert "belongs in Cert, not in Cert.Subject" in messages["Secrets.c.Cert.Subject.DNSNames"]


def test_duplicate_keys_last_wins() -> None:
    raw = (
        b'{"Packages": {"pkg": {"SignerID": "' + SIGNER.encode() + b'", "ProductID": 1, "SecurityVersion": 1,'
        b' "ProductID": 9}}, "Marbles": {"m": {"Package": "nope"}, "m": {"Package": "pkg"}}}'
    )
    manifest = load_manifest(raw)
    assert manifest.packages["pkg"].product_id == 9
    assert manifest.marbles["m"].package == "pkg"


def test_case_variants_of_one_field_last_one_wins_in_document_order() -> None:
    raw = (
        PKG + b","
        b' "Marbles": {"m": {"Package": "pkg", "MaxActivations": 1, "maxactivations": 2}}}'
    )
    assert load_manifest(raw).marbles["m"].max_activations == 2
    # Exact spelling first, variant later: the later one still wins (Go processes in order).
    raw2 = raw.replace(
        b'"MaxActivations": 1, "maxactivations": 2', b'"maxactivations": 2, "MaxActivations": 5'
    )
    assert load_manifest(raw2).marbles["m"].max_activations == 5


def test_repeated_struct_fields_merge_like_go() -> None:
    raw = (
        PKG + b","
        b' "Marbles": {"m": {"Package": "pkg"}},'
        b' "Config": {"SealMode": "UniqueKey"},'
        b' "config": {"UpdateThreshold": 0, "FeatureGates": ["MonotonicCounter"]}}'
    )
    config = load_manifest(raw).config
    assert config.seal_mode is SealMode.UNIQUE_KEY
    assert config.feature_gates == ("MonotonicCounter",)


def test_repeated_map_fields_merge_and_null_resets() -> None:
    raw = (
        PKG + b","
        b' "packages": {"other": {"UniqueID": "00"}}, "Marbles": {"m": {"Package": "pkg"}}}'
    )
    assert set(load_manifest(raw).packages) == {"pkg", "other"}
    reset = raw.replace(b'"packages": {"other"', b'"packages": null, "PACKAGES": {"other"')
    assert paths(check(reset)) == ["Marbles.m.Package"]


def test_bytes_field_accepts_base64_and_number_array() -> None:
    m = base()
    m["Secrets"] = {
        "a": {"Type": "plain", "UserDefined": True, "Private": base64.b64encode(b"hi!").decode()},
        "b": {"Type": "plain", "UserDefined": True, "Private": [104, 105, 33]},
    }
    manifest = load_manifest(dumps(m))
    assert manifest.secrets["a"].private == b"hi!"
    assert manifest.secrets["b"].private == b"hi!"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("not base64!", "not valid base64"),
        ([1, 256], "above 255"),
        ([1, -1], "negative"),
        ([1, "a"], "got string"),
        (5, "got number"),
    ],
)
def test_bytes_field_rejects_bad_values(value: object, fragment: str) -> None:
    m = base()
    m["Secrets"] = {"a": {"Type": "plain", "UserDefined": True, "Public": value}}
    result = check(m)
    assert not result.valid
    assert any(p.path.startswith("Secrets.a.Public") and fragment in p.message for p in result.problems)


def test_null_versus_zero_for_product_id_and_security_version() -> None:
    m = base()
    m["Packages"]["pkg"]["ProductID"] = 0
    m["Packages"]["pkg"]["SecurityVersion"] = 0
    manifest = load_manifest(dumps(m))
    assert manifest.packages["pkg"].product_id == 0
    assert manifest.packages["pkg"].security_version == 0
    m["Packages"]["pkg"]["ProductID"] = None
    result = check(m)
    assert paths(result) == ["Packages.pkg.ProductID"]
    assert "missing" in problem_at(result, "Packages.pkg.ProductID")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-1", "got a negative number"),
        ("1.5", "got a fraction or exponent"),
        ("1e3", "got a fraction or exponent"),
        ("18446744073709551616", "above 18446744073709551615"),
        ("9" * 5000, "above"),
        ('"3"', "got string"),
        ("true", "got boolean"),
        ("[1]", "got array"),
    ],
)
def test_uint_fields_reject_what_go_rejects(value: str, fragment: str) -> None:
    raw = dumps(base()).replace(b'"Package": "pkg"', b'"Package": "pkg", "MaxActivations": ' + value.encode())
    message = problem_at(check(raw), "Marbles.m.MaxActivations")
    assert message.startswith("expected a non-negative integer")
    assert fragment in message


def test_uint_max_is_accepted() -> None:
    raw = dumps(base()).replace(
        b'"Package": "pkg"', b'"Package": "pkg", "MaxActivations": 18446744073709551615'
    )
    assert load_manifest(raw).marbles["m"].max_activations == 2**64 - 1


def test_null_for_non_pointer_field_is_a_no_op() -> None:
    m = base()
    m["Marbles"]["m"]["MaxActivations"] = None
    m["Marbles"]["m"]["Package"] = None  # no-op: Package stays ""
    assert problem_at(check(m), "Marbles.m.Package").startswith("missing")
    raw = dumps(base()).replace(b'"Package": "pkg"', b'"Package": "pkg", "Package": null')
    assert load_manifest(raw).marbles["m"].package == "pkg"


def test_type_mismatch_names_the_path() -> None:
    m = base()
    m["Marbles"]["backend"] = {"Package": "pkg", "MaxActivations": "3"}
    result = check(m)
    assert str(result.problems[0]) == (
        "Marbles.backend.MaxActivations: expected a non-negative integer, got string"
    )


def test_all_problems_are_reported_at_once() -> None:
    m = base()
    m["Marbles"]["a"] = {"Package": "nope"}
    m["Marbles"]["b"] = {"Package": "pkg", "TLS": ["missing-tag"]}
    m["Secrets"] = {"s": {"Type": "symmetric-key", "Size": 12}}
    m["Config"] = {"SealMode": "productkey"}
    assert paths(check(m)) == [
        "Marbles.a.Package",
        "Marbles.b.TLS[0]",
        "Secrets.s.Size",
        "Config.SealMode",
    ]
    with pytest.raises(ManifestError) as info:
        load_manifest(dumps(m))
    assert len(info.value.problems) == 4
    assert "and 3 more" in info.value.message


# -- Files / Env (§1.5, §11 item 1) ----------------------------------------------------------------


def test_file_forms_decode_at_parse_time() -> None:
    m = base()
    m["Marbles"]["m"]["Parameters"] = {
        "Files": {
            "/plain": "foo",
            "/b64": {"Encoding": "base64", "Data": "YmFy"},
            "/hex": {"Encoding": "hex", "Data": "4d6172626c6552756e"},
            "/hexupper": {"Encoding": "HEX", "Data": "4D61"},
            "/verbatim": {"Encoding": "string", "Data": "YmFy"},
            "/empty-encoding": {"Data": "x"},
            "/notemplates": {"NoTemplates": True, "Data": "{{ raw .Secrets.nothing }}"},
        }
    }
    files = load_manifest(dumps(m)).marbles["m"].parameters.files
    assert files["/plain"].data == b"foo" and files["/plain"].encoding == "string"
    assert files["/b64"].data == b"bar" and files["/b64"].encoding == "base64"
    assert files["/hex"].data == b"MarbleRun" and files["/hex"].encoding == "hex"
    assert files["/hexupper"].data == b"Ma" and files["/hexupper"].encoding == "hex"
    assert files["/verbatim"].data == b"YmFy"
    assert files["/empty-encoding"].encoding == "string"
    assert files["/notemplates"].data == b"{{ raw .Secrets.nothing }}"
    assert files["/notemplates"].no_templates


@pytest.mark.parametrize(
    ("entry", "path_suffix", "fragment"),
    [
        ({"Encoding": "rot13", "Data": "x"}, "Encoding", 'unknown encoding "rot13"'),
        ({"Encoding": "base64", "Data": "Ym=Fy"}, "Data", "not valid base64"),
        ({"Encoding": "hex", "Data": "abc"}, "Data", "not valid hex"),
        ({"Encoding": "hex", "Data": "zz"}, "Data", "not valid hex"),
        ({"Encoding": "hex", "Data": "4d 61"}, "Data", "not valid hex"),
        ({"Data": 5}, "Data", "got number"),
        ({"NoTemplates": "yes", "Data": "x"}, "NoTemplates", "got string"),
    ],
)
def test_bad_file_entries_name_the_entry(entry: dict[str, object], path_suffix: str, fragment: str) -> None:
    m = base()
    m["Marbles"]["m"]["Parameters"] = {"Files": {"/etc/app.conf": entry}}
    assert fragment in problem_at(check(m), f"Marbles.m.Parameters.Files./etc/app.conf.{path_suffix}")


def test_env_entry_of_wrong_kind_hints_quoting() -> None:
    m = base()
    m["Marbles"]["m"]["Parameters"] = {"Env": {"PORT": 8080}}
    assert "quote it" in problem_at(check(m), "Marbles.m.Parameters.Env.PORT")


def test_secret_bytes_never_echoed_in_decode_errors() -> None:
    m = base()
    secret_text = "hunter2-very-secret-value"
    m["Marbles"]["m"]["Parameters"] = {"Env": {"PW": {"Encoding": "base64", "Data": secret_text}}}
    m["Secrets"] = {"p": {"Type": "plain", "UserDefined": True, "Private": secret_text}}
    result = check(m)
    assert len(result.problems) == 2
    assert all(secret_text not in str(p) for p in result.problems)


# -- Secrets.Cert (§1.6) ---------------------------------------------------------------------------


def test_cert_template_maps_go_x509_fields() -> None:
    m = base()
    m["Secrets"] = {
        "c": {
            "Type": "cert-ecdsa",
            "Size": 384,
            "Cert": {
                "Subject": {
                    "CommonName": "svc",
                    "Organization": ["Org"],
                    "OrganizationalUnit": ["OU"],
                    "Country": ["DE"],
                    "Province": ["BE"],
                    "Locality": ["Berlin"],
                    "StreetAddress": ["Street 1"],
                    "PostalCode": ["10115"],
                    "SerialNumber": "42",
                },
                "DNSNames": ["svc.local"],
                "IPAddresses": ["10.0.0.1", "fd00::1"],
                "EmailAddresses": ["ops@example.com"],
                "URIs": [
                    "spiffe://example.org/svc",
                    {"Scheme": "https", "Host": "example.org", "Path": "/x"},
                ],
                "KeyUsage": 33,
                "ExtKeyUsage": [1, 2],
                "IsCA": True,
                "MaxPathLen": 1,
                "MaxPathLenZero": False,
                "NotAfter": "2030-01-31T12:00:00.5+02:00",
            },
        }
    }
    t = load_manifest(dumps(m)).secrets["c"].cert_template
    assert t is not None
    assert (t.common_name, t.organization, t.organizational_unit) == ("svc", ("Org",), ("OU",))
    assert (t.country, t.province, t.locality) == (("DE",), ("BE",), ("Berlin",))
    assert (t.street_address, t.postal_code, t.serial_number) == (("Street 1",), ("10115",), "42")
    assert t.dns_names == ("svc.local",)
    assert t.ip_addresses == ("10.0.0.1", "fd00::1")
    assert t.email_addresses == ("ops@example.com",)
    assert t.uris == ("spiffe://example.org/svc", "https://example.org/x")
    assert (t.key_usage, t.ext_key_usage, t.is_ca, t.max_path_len) == (33, (1, 2), True, 1)
    assert t.not_after == dt.datetime(2030, 1, 31, 10, 0, 0, 500000, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("IPAddresses", ["10.0.0.300"], "not an IP address"),
        ("IPAddresses", ["fe80::1%eth0"], "not an IP address"),
        ("URIs", ["no scheme"], "not an absolute URI"),
        ("NotAfter", "2030-01-31", "not an RFC 3339 time"),
        ("NotAfter", "2030-13-01T00:00:00Z", "not an RFC 3339 time"),
        ("NotAfter", 5, "got number"),
        ("KeyUsage", 4096, "KeyUsage bits"),
        ("ExtKeyUsage", [99], "unknown extended key usage 99"),
    ],
)
def test_cert_template_bad_values(field: str, value: object, fragment: str) -> None:
    m = base()
    m["Secrets"] = {"c": {"Type": "cert-ed25519", "Cert": {field: value}}}
    result = check(m)
    assert any(
        p.path.startswith(f"Secrets.c.Cert.{field}") and fragment in p.message for p in result.problems
    )


def test_cert_as_base64_der_goes_to_secret_cert() -> None:
    der = cert_der("uploaded")
    m = base()
    m["Secrets"] = {"c": {"Type": "cert-rsa", "UserDefined": True, "Cert": base64.b64encode(der).decode()}}
    secret = load_manifest(dumps(m)).secrets["c"]
    assert secret.cert == der
    assert secret.cert_template is None
    assert secret.type is SecretType.CERT_RSA


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("%%%not-base64", "not valid base64"), (base64.b64encode(b"not DER").decode(), "not a DER X.509")],
)
def test_cert_string_that_does_not_decode_is_refused(value: str, fragment: str) -> None:
    # MarbleRun silently swallows an undecodable base64 string; marblekeep refuses it.
    m = base()
    m["Secrets"] = {"c": {"Type": "cert-rsa", "UserDefined": True, "Cert": value}}
    assert fragment in problem_at(check(m), "Secrets.c.Cert")


def test_generated_secret_values_in_manifest_are_ignored_with_a_warning() -> None:
    m = base()
    m["Secrets"] = {"k": {"Type": "symmetric-key", "Size": 128, "Private": "AAAA"}}
    result = check(m)
    assert result.valid
    assert any(w.path == "Secrets.k.Private" and "ignored" in w.message for w in result.warnings)


def test_user_defined_initial_values_are_kept() -> None:
    m = base()
    m["Secrets"] = {
        "k": {"Type": "symmetric-key", "Size": 24, "UserDefined": True, "Private": "AAEC", "Public": "AAEC"}
    }
    secret = load_manifest(dumps(m)).secrets["k"]
    assert secret.private == secret.public == b"\x00\x01\x02"
    assert secret.has_value


# -- Malformed documents -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"[]", "top level"),
        (b'"str"', "top level"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"Packages": NaN}', "NaN is not valid JSON"),
        (b'{"Packages": Infinity}', "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b"[" * 100000, "nesting"),
        (b'{"a": 1} {"b": 2}', "Extra data"),
        (b'{"Packages": {"p": {"SignerID": "\\ud800"}}}', "Marbles"),
    ],
)
def test_malformed_documents_give_manifest_errors(raw: bytes, fragment: str) -> None:
    result = check(raw)
    assert not result.valid
    assert any(fragment in str(p) for p in result.problems), result.problems
    with pytest.raises(ManifestError):
        load_manifest(raw)


def test_null_document_is_an_empty_manifest() -> None:
    assert paths(check(b"null")) == ["Packages", "Marbles"]


def test_lone_surrogate_escapes_become_replacement_characters() -> None:
    m = base()
    m["Marbles"]["m"]["Parameters"] = {"Env": {"X": "a\ud800b"}}
    raw = json.dumps(m).encode()  # ascii escapes: \ud800
    env = load_manifest(raw).marbles["m"].parameters.env
    assert env["X"].data == "a\ufffdb".encode()


def test_tdx_package_extension() -> None:
    m = base()
    m["Packages"]["td"] = {"TDX": {"mrtd": "AB" * 48, "RTMR0": "cd" * 48}, "Debug": False}
    m["Marbles"]["t"] = {"Package": "td"}
    package = load_manifest(dumps(m)).packages["td"]
    assert package.tdx is not None
    assert package.tdx.mrtd == "ab" * 48
    assert package.tdx.rtmr0 == "cd" * 48
    assert package.tdx.rtmr1 is None and package.tdx.mrseam is None


@pytest.mark.parametrize(
    ("tdx", "path", "fragment"),
    [
        ({}, "Packages.td.TDX.MRTD", "missing"),
        ({"MRTD": "ab" * 47}, "Packages.td.TDX.MRTD", "96 hex digits"),
        ({"MRTD": "zz" * 48}, "Packages.td.TDX.MRTD", "not all hex"),
        ({"MRTD": "ab" * 48, "MRSEAM": 5}, "Packages.td.TDX.MRSEAM", "got number"),
        ("ab", "Packages.td.TDX", "got string"),
    ],
)
def test_tdx_package_bad_measurements(tdx: object, path: str, fragment: str) -> None:
    m = base()
    m["Packages"]["td"] = {"TDX": tdx}
    m["Marbles"]["t"] = {"Package": "td"}
    assert fragment in problem_at(check(m), path)
