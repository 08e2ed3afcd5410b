"""No secret value ever appears in a TemplateError message, nor in a repr of the template data."""

from __future__ import annotations

import base64

import pytest
from templating_support import all_secret_bytes, make_data

from marblekeep.errors import TemplateError
from marblekeep.templating import FunctionSet, ReservedSecret, render

FILES = FunctionSet.FILES
ENV = FunctionSet.ENV


def _forms(value: bytes) -> list[str]:
    """The ways a value could leak into a message: raw text, hex, base64, Python repr."""
    forms = [value.hex(), value.hex().upper(), base64.b64encode(value).decode(), repr(value)[2:-1]]
    text = value.decode("latin-1")
    if text.isprintable():
        forms.append(text)
    return [f for f in forms if len(f) >= 4]


def _assert_no_secret_in(message: str) -> None:
    for value in all_secret_bytes(make_data()):
        for form in _forms(value):
            assert form not in message, "a secret value leaked into an error message"


@pytest.mark.parametrize(
    ("src", "functions", "expected"),
    [
        ("{{ string .Secrets.plainNul }}", ENV, "NUL byte"),
        ("{{ string .Secrets.symKey }}", ENV, "string only takes secrets of type plain"),
        ("{{ string .Secrets.certShared }}", ENV, "string only takes secrets of type plain"),
        ("{{ pem .Secrets.symKey }}", FILES, "invalid secret type for pem encoding"),
        ("{{ pem .MarbleRun.SealKey }}", FILES, "invalid secret type for pem encoding"),
        ("{{ pem .Secrets.certShared }}", ENV, "invalid secret type for pem encoding"),
        ("{{ .Secrets.symKey }}", FILES, "cannot print"),
        ("{{ .Secrets.plainPw.Private }}", ENV, "cannot print"),
        ("{{ .MarbleRun.SealKey }}", ENV, "cannot print"),
        ("{{ .MarbleRun.MarbleCert.Private }}", FILES, "cannot print"),
        ("{{ hex .Secrets.symKey | base64 }}", FILES, "invalid secret type"),
        ("{{ hex .Secrets.unsetKey }}", FILES, "empty value"),
        ('{{ index .Secrets "plainPw" "x" }}', FILES, "can't index"),
        ("{{ .Secrets.plainPw.Private.X }}", FILES, "can't evaluate field X"),
        ("{{ .Secrets.symKey .Secrets.plainPw }}", FILES, "can't give argument"),
    ],
)
def test_errors_never_contain_secret_values(src: str, functions: FunctionSet, expected: str) -> None:
    with pytest.raises(TemplateError) as info:
        render(src.encode(), functions, make_data())
    message = str(info.value)
    assert expected in message
    _assert_no_secret_in(message)
    _assert_no_secret_in(info.value.diagnostics())


def test_data_repr_hides_private_keys_and_seal_key() -> None:
    data = make_data()
    text = repr(data) + repr(ReservedSecret(cert=b"c", public=b"p", private=b"very-private-key"))
    assert "very-private-key" not in text
    for value in (data.seal_key, data.marble_cert.private):
        for form in _forms(value):
            assert form not in text
