"""Property tests: any input gives a Template or a TemplateError; executing gives bytes or TemplateError."""

from __future__ import annotations

import base64
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from templating_support import make_data

from marblekeep.errors import TemplateError
from marblekeep.templating import FunctionSet, Template, parse_template, render

DATA = make_data()
FUNCTION_SETS = st.sampled_from(list(FunctionSet))
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that make random sources reach deep into the lexer, parser and type checker.
FRAGMENTS = [
    "{{", "}}", "{{-", "-}}", "{{- ", " -}}", "/*", "*/", " ", "\t", "\n", "\r", "|", "(", ")", ".", "$",
    '"', "`", "\\", "-", "x", "0", ":=", "'", ",", "{", "}", "\x00", "\xff", "é",
    ".Secrets", ".MarbleRun", ".Marblerun", ".Previous", ".SealKey", ".RootCA", ".MarbleCert",
    ".CoordinatorRoot", ".CoordinatorIntermediate", ".Cert", ".Public", ".Private", ".Type", ".Size",
    ".Shared", ".UserDefined", ".ValidFor", ".symKey", ".plainPw", ".plainNul", ".certShared", ".unsetKey",
    ".missing", "pem", "hex", "base64", "raw", "string", "index", "printf", "if", "end", '"my-key"',
    '"symKey"', "`plainPw`", '"\\x41"',
]  # fmt: skip
TEMPLATE_ISH = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map(
    lambda parts: "".join(parts).encode("utf-8")
)


def _parse_or_error(source: bytes, functions: FunctionSet) -> Template | None:
    try:
        template = parse_template(source, functions)
    except TemplateError as exc:
        assert re.match(r"line \d+, column \d+: ", str(exc)), str(exc)
        return None
    assert isinstance(template, Template)
    return template


def _execute_or_error(template: Template) -> None:
    try:
        out = template.execute(DATA)
    except TemplateError as exc:
        assert re.match(r"line \d+, column \d+: ", str(exc)), str(exc)
        return
    assert isinstance(out, bytes)


@SETTINGS
@given(source=st.binary(max_size=200), functions=FUNCTION_SETS)
def test_arbitrary_bytes_parse_or_fail_cleanly(source: bytes, functions: FunctionSet) -> None:
    template = _parse_or_error(source, functions)
    if template is not None:
        _execute_or_error(template)


@SETTINGS
@given(source=TEMPLATE_ISH, functions=FUNCTION_SETS)
def test_template_like_sources_parse_and_execute_or_fail_cleanly(
    source: bytes, functions: FunctionSet
) -> None:
    template = _parse_or_error(source, functions)
    if template is not None:
        _execute_or_error(template)


@SETTINGS
@given(source=st.binary(max_size=300), functions=FUNCTION_SETS)
def test_text_without_open_delimiter_round_trips(source: bytes, functions: FunctionSet) -> None:
    source = source.replace(b"{{", b"{ {")
    if source.endswith(b"{"):
        source += b" "
    assert render(source, functions, DATA) == source


@SETTINGS
@given(
    before=st.binary(max_size=100).map(lambda b: b.replace(b"{", b"")),
    after=st.binary(max_size=100).map(lambda b: b.replace(b"{", b"")),
)
def test_text_around_an_action_is_kept_byte_exactly(before: bytes, after: bytes) -> None:
    out = render(before + b"{{ hex .Secrets.symKey }}" + after, FunctionSet.FILES, DATA)
    assert out == before + b"000102030405060708090a0b0c0d0e0f" + after


@SETTINGS
@given(key=st.binary(min_size=1, max_size=64), functions=FUNCTION_SETS)
def test_encodings_match_python_for_any_key(key: bytes, functions: FunctionSet) -> None:
    data = make_data(seal_key=key)
    src = b"{{ hex .MarbleRun.SealKey }}|{{ base64 .MarbleRun.SealKey }}"
    assert render(src, functions, data) == key.hex().encode() + b"|" + base64.b64encode(key)
