"""Encoding functions × argument kinds, Files vs Env, and the values of reference §11 item 16."""

from __future__ import annotations

import base64
import binascii

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from templating_support import (
    BYTES_0_15,
    PLAIN_VALUE,
    SEAL_KEY,
    cert_material,
    make_data,
)

from marblekeep.errors import TemplateError
from marblekeep.templating import FunctionSet, parse_template, render

FILES = FunctionSet.FILES
ENV = FunctionSet.ENV


def run(src: str, functions: FunctionSet = FILES) -> bytes:
    return render(src.encode(), functions, make_data())


def fails(src: str, functions: FunctionSet = FILES) -> str:
    with pytest.raises(TemplateError) as info:
        run(src, functions)
    return str(info.value)


# -- reference §11 item 16 ---------------------------------------------------------------------


@pytest.mark.parametrize("functions", [FILES, ENV])
@pytest.mark.parametrize("root", [".Secrets", ".Previous.Secrets"])
def test_hex_of_bytes_0_to_15(functions: FunctionSet, root: str) -> None:
    data = make_data(previous_secrets=make_data().secrets)
    out = render(f"{{{{ hex {root}.symKey }}}}".encode(), functions, data)
    assert out == b"000102030405060708090a0b0c0d0e0f"


@pytest.mark.parametrize("functions", [FILES, ENV])
def test_base64_of_bytes_0_to_15(functions: FunctionSet) -> None:
    assert run("{{ base64 .Secrets.symKey }}", functions) == b"AAECAwQFBgcICQoLDA0ODw=="


def test_raw_of_bytes_0_to_15() -> None:
    assert run("{{ raw .Secrets.symKey }}") == BYTES_0_15


def test_previous_secrets_hold_their_own_values() -> None:
    assert run("{{ hex .Previous.Secrets.symKey }}") == bytes(range(16, 32)).hex().encode()
    assert run("{{ raw .Previous.Secrets.symKey }}") == bytes(range(16, 32))


def test_certificate_round_trips_through_pem() -> None:
    cm = cert_material()
    out = run("{{ pem .Secrets.certShared.Cert }}")
    assert out.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert out.endswith(b"-----END CERTIFICATE-----\n")
    parsed = x509.load_pem_x509_certificate(out)
    assert parsed.public_bytes(serialization.Encoding.DER) == cm.cert


def test_certificate_round_trips_through_raw() -> None:
    out = run("{{ raw .Secrets.certShared.Cert }}")
    assert x509.load_der_x509_certificate(out).serial_number == 1234
    assert out == cert_material().cert


def test_pem_labels_follow_the_field_not_the_algorithm() -> None:
    cm = cert_material()
    pub = run("{{ pem .Secrets.certShared.Public }}")
    priv = run("{{ pem .Secrets.certShared.Private }}")
    assert pub.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert priv.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(priv, password=None)
    assert (
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == cm.public
    )
    assert (
        serialization.load_pem_public_key(pub).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == cm.public
    )
    # a symmetric key's .Private is wrapped in a PRIVATE KEY block, as MarbleRun does
    sym = run("{{ pem .Secrets.symKey.Private }}")
    assert sym == b"-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQoLDA0ODw==\n-----END PRIVATE KEY-----\n"


def test_pem_wraps_base64_at_64_columns() -> None:
    out = run("{{ pem .MarbleRun.MarbleCert.Cert }}")
    lines = out.split(b"\n")
    assert lines[0] == b"-----BEGIN CERTIFICATE-----"
    assert lines[-2] == b"-----END CERTIFICATE-----"
    assert lines[-1] == b""
    body = lines[1:-2]
    assert all(len(line) == 64 for line in body[:-1])
    assert 0 < len(body[-1]) <= 64
    assert base64.b64decode(b"".join(body)) == cert_material("leaf").cert


def test_reserved_pem_outputs_are_exact() -> None:
    for field, name in [
        ("RootCA", "root"),
        ("CoordinatorRoot", "coordinator root"),
        ("CoordinatorIntermediate", "coordinator intermediate"),
        ("MarbleCert", "leaf"),
    ]:
        der = cert_material(name).cert
        b64 = base64.b64encode(der)
        body = b"".join(b64[i : i + 64] + b"\n" for i in range(0, len(b64), 64))
        expected = b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"
        assert run(f"{{{{ pem .MarbleRun.{field}.Cert }}}}") == expected


def test_marble_cert_private_key_pem_matches_leaf() -> None:
    out = run("{{ pem .MarbleRun.MarbleCert.Private }}", ENV)
    key = serialization.load_pem_private_key(out, password=None)
    assert (
        key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        == cert_material("leaf").private
    )


# -- argument kinds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (".Secrets.symKey", BYTES_0_15),  # bare Secret: its .Public
        (".Secrets.symKey.Public", BYTES_0_15),
        (".Secrets.symKey.Private", BYTES_0_15),
        (".Secrets.certShared", cert_material().public),  # bare certificate Secret: PKIX public key
        (".Secrets.certShared.Cert", cert_material().cert),
        (".Secrets.certShared.Public", cert_material().public),
        (".Secrets.certShared.Private", cert_material().private),
        (".MarbleRun.SealKey", SEAL_KEY),
        (".Marblerun.SealKey", SEAL_KEY),
        (".MarbleRun.MarbleCert", cert_material("leaf").public),
        (".MarbleRun.MarbleCert.Private", cert_material("leaf").private),
        (".MarbleRun.RootCA.Cert", cert_material("root").cert),
        ('(index .Secrets "my-key")', BYTES_0_15[::-1]),
        ('(index .Secrets "ünï")', b"\x01"),
        (".Secrets.ünï", b"\x01"),
    ],
)
def test_hex_base64_raw_accept(expr: str, expected: bytes) -> None:
    assert run(f"{{{{ hex {expr} }}}}") == binascii.hexlify(expected)
    assert run(f"{{{{ base64 {expr} }}}}", ENV) == base64.b64encode(expected)
    assert run(f"{{{{ raw {expr} }}}}") == expected


@pytest.mark.parametrize("fn", ["hex", "base64", "raw", "pem"])
def test_functions_refuse_strings_and_numbers(fn: str) -> None:
    for arg in [
        '"text"',
        ".Secrets.symKey.Size",
        ".Secrets.symKey.Type",
        ".Secrets.symKey.Shared",
        ".Secrets",
        ".MarbleRun",
        ".",
        "$",
        ".Previous",
    ]:
        msg = fails(f"{{{{ {fn} {arg} }}}}")
        assert "invalid secret type" in msg, (arg, msg)
        assert "line 1, column 4" in msg


def test_function_output_cannot_be_encoded_again() -> None:
    msg = fails("{{ hex .Secrets.symKey | base64 }}")
    assert "invalid secret type string" in msg


@pytest.mark.parametrize(
    "expr", [".Secrets.symKey", ".Secrets.certShared", ".MarbleRun.MarbleCert", '(index .Secrets "my-key")']
)
def test_pem_refuses_a_bare_secret(expr: str) -> None:
    msg = fails(f"{{{{ pem {expr} }}}}")
    assert "invalid secret type for pem encoding" in msg
    assert ".Cert" in msg


def test_pem_refuses_the_seal_key() -> None:
    msg = fails("{{ pem .MarbleRun.SealKey }}")
    assert "invalid secret type for pem encoding" in msg
    assert "hex, base64 or raw" in msg


def test_pem_on_empty_reserved_fields_is_an_empty_value_error() -> None:
    # As in MarbleRun's dry run: RootCA/CoordinatorRoot/CoordinatorIntermediate have no keys.
    for field in ("RootCA", "CoordinatorRoot", "CoordinatorIntermediate"):
        for part in ("Public", "Private"):
            msg = fails(f"{{{{ pem .MarbleRun.{field}.{part} }}}}")
            assert "tried to parse secret with empty value" in msg


# -- string (Env only) ------------------------------------------------------------------------------


def test_string_of_a_plain_secret() -> None:
    assert run("{{ string .Secrets.plainPw }}", ENV) == PLAIN_VALUE
    assert run("PW={{ .Secrets.plainPw | string }}!", ENV) == b"PW=" + PLAIN_VALUE + b"!"


def test_string_refuses_a_plain_secret_with_nul() -> None:
    msg = fails("{{ string .Secrets.plainNul }}", ENV)
    assert "NUL byte" in msg


@pytest.mark.parametrize("name", ["symKey", "certShared"])
def test_string_refuses_non_plain_secrets(name: str) -> None:
    msg = fails(f"{{{{ string .Secrets.{name} }}}}", ENV)
    assert "string only takes secrets of type plain" in msg


@pytest.mark.parametrize(
    "expr", [".Secrets.plainPw.Private", ".MarbleRun.SealKey", ".MarbleRun.RootCA", '"x"']
)
def test_string_refuses_fields_and_others(expr: str) -> None:
    assert "invalid secret type" in fails(f"{{{{ string {expr} }}}}", ENV)


def test_string_of_empty_or_missing_secret() -> None:
    assert "tried to parse secret with empty value" in fails("{{ string .Secrets.plainEmpty }}", ENV)
    assert "tried to parse secret with empty value" in fails("{{ string .Secrets.nothere }}", ENV)
    # .Previous of a user-defined secret is an empty placeholder (reference §3.6)
    assert "tried to parse secret with empty value" in fails("{{ string .Previous.Secrets.plainPw }}", ENV)


# -- function sets ---------------------------------------------------------------------------------


def test_raw_is_not_defined_in_env() -> None:
    with pytest.raises(TemplateError, match=r'line 1, column 4: function "raw" not defined'):
        parse_template(b"{{ raw .Secrets.symKey }}", ENV)


def test_string_is_not_defined_in_files() -> None:
    with pytest.raises(TemplateError, match=r'line 1, column 4: function "string" not defined'):
        parse_template(b"{{ string .Secrets.plainPw }}", FILES)


def test_undefined_function_fails_at_parse_time_even_when_unused_data_is_missing() -> None:
    # no data needed: it is the parse that fails
    with pytest.raises(TemplateError, match='function "raw" not defined'):
        parse_template(b"ok\n{{ .Secrets.a | raw }}", ENV)


@pytest.mark.parametrize("functions", [FILES, ENV])
@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("{{ pem .Secrets.symKey.Public }}", b"-----BEGIN PUBLIC KEY-----\nAAECAwQFBgcICQoLDA0ODw==\n"),
        ("{{ hex .Secrets.symKey }}", b"000102030405060708090a0b0c0d0e0f"),
        ("{{ base64 .Secrets.symKey }}", b"AAECAwQFBgcICQoLDA0ODw=="),
        ('{{ hex (index .Secrets "symKey") }}', b"000102030405060708090a0b0c0d0e0f"),
    ],
)
def test_common_functions_exist_in_both_sets(functions: FunctionSet, src: str, expected: bytes) -> None:
    assert run(src, functions).startswith(expected)


# -- empty and missing values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        ".Secrets.unsetKey",
        ".Secrets.unsetKey.Private",
        ".Secrets.unsetKey.Cert",
        ".Secrets.missing",
        ".Secrets.missing.Public",
        '(index .Secrets "missing")',
        ".Previous.Secrets.missing",
        ".Secrets.symKey.Cert",  # a symmetric key has no certificate
    ],
)
@pytest.mark.parametrize("fn", ["hex", "base64", "raw"])
def test_empty_values_fail(expr: str, fn: str) -> None:
    msg = fails(f"x\n  {{{{ {fn} {expr} }}}}")
    assert msg.startswith("line 2, column 6: ")
    assert "tried to parse secret with empty value" in msg
    assert expr in msg


def test_missing_secret_fields_are_zero_values() -> None:
    out = run("{{ .Secrets.missing.Size }}|{{ .Secrets.missing.Type }}|{{ .Secrets.missing.Shared }}")
    assert out == b"0||false"


def test_empty_seal_key_fails() -> None:
    data = make_data(seal_key=b"")
    with pytest.raises(TemplateError, match="tried to parse secret with empty value"):
        render(b"{{ hex .MarbleRun.SealKey }}", ENV, data)
