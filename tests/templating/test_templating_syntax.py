"""Text, delimiters, trim markers, comments, literals, fields, index, pipelines, parentheses, printing."""

from __future__ import annotations

import pytest
from templating_support import BYTES_0_15, SEAL_KEY, make_data

from marblekeep.errors import TemplateError
from marblekeep.templating import FunctionSet, parse_template, render

FILES = FunctionSet.FILES
ENV = FunctionSet.ENV
HEX015 = b"000102030405060708090a0b0c0d0e0f"


def run(src: bytes | str, functions: FunctionSet = FILES) -> bytes:
    raw = src if isinstance(src, bytes) else src.encode()
    return render(raw, functions, make_data())


def fails(src: bytes | str, functions: FunctionSet = FILES) -> str:
    with pytest.raises(TemplateError) as info:
        run(src, functions)
    return str(info.value)


# -- text -----------------------------------------------------------------------------------------


def test_text_without_actions_is_copied() -> None:
    assert run("plain text } { }} {") == b"plain text } { }} {"
    assert run(b"") == b""


def test_binary_text_is_preserved_byte_exactly() -> None:
    every_byte = bytes(b for b in range(256) if b != ord("{"))
    src = every_byte + b"{{ raw .Secrets.symKey }}" + every_byte + b"\xff\xfe{\x00"
    assert run(src) == every_byte + BYTES_0_15 + every_byte + b"\xff\xfe{\x00"


def test_invalid_utf8_around_actions_is_untouched() -> None:
    src = b"\xc3\x28\xa0\xa1{{ hex .MarbleRun.SealKey }}\xe2\x82\xf0\x28\x8c\x28"
    assert run(src, ENV) == b"\xc3\x28\xa0\xa1" + SEAL_KEY.hex().encode() + b"\xe2\x82\xf0\x28\x8c\x28"


def test_crlf_and_newlines_in_text_are_kept() -> None:
    assert run("a\r\n{{ hex .Secrets.symKey }}\r\n\n") == b"a\r\n" + HEX015 + b"\r\n\n"


def test_multiple_actions_and_adjacent_actions() -> None:
    assert (
        run("{{ hex .Secrets.symKey }}{{ base64 .Secrets.symKey }}") == HEX015 + b"AAECAwQFBgcICQoLDA0ODw=="
    )


# -- trim markers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("a \t\r\n {{- hex .Secrets.symKey }} b", b"a" + HEX015 + b" b"),
        ("a {{ hex .Secrets.symKey -}} \n\t\r b", b"a " + HEX015 + b"b"),
        ("a \n{{- hex .Secrets.symKey -}}\n b", b"a" + HEX015 + b"b"),
        ("a\t{{-\thex .Secrets.symKey\t-}}\tb", b"a" + HEX015 + b"b"),
        ("a\n{{-\nhex .Secrets.symKey\n-}}\nb", b"a" + HEX015 + b"b"),
        ("a\r{{-\rhex .Secrets.symKey\r-}}\rb", b"a" + HEX015 + b"b"),
        ("  {{- hex .Secrets.symKey -}}  ", HEX015),
        # trims only ASCII space, tab, CR, LF: not vertical tab or form feed
        ("a\x0b\x0c {{- hex .Secrets.symKey -}} \x0c\x0bb", b"a\x0b\x0c" + HEX015 + b"\x0c\x0bb"),
        # whitespace that is all the text between two actions disappears
        ("{{ hex .Secrets.symKey -}}  \n  {{- hex .Secrets.symKey }}", HEX015 + HEX015),
        # a marker on one side only
        (
            "x {{- hex .Secrets.symKey }} y {{ hex .Secrets.symKey -}} z",
            b"x" + HEX015 + b" y " + HEX015 + b"z",
        ),
    ],
)
def test_trim_markers(src: str, expected: bytes) -> None:
    assert run(src) == expected


def test_minus_without_space_is_not_a_trim_marker() -> None:
    assert "number literals are not supported" in fails("a {{-hex .Secrets.symKey }}")
    assert "bad character" in fails("a {{ hex .Secrets.symKey-}}")


# -- comments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("a{{/* comment */}}b", b"ab"),
        ("a{{/* multi\nline {{ hex }} \x00 comment */}}b", b"ab"),
        ("a \n {{- /* trimmed */ -}} \n b", b"ab"),
        ("a {{- /* left only */}} b", b"a b"),
        ("a {{/* right only */ -}} b", b"a b"),
        ("{{/**/}}", b""),
    ],
)
def test_comments(src: str, expected: bytes) -> None:
    assert run(src) == expected


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("a {{/* never closed", "line 1, column 3: unclosed comment"),
        ("{{/* c */ }}", "line 1, column 10: comment ends before closing delimiter"),
        ("{{/* c */x}}", "comment ends before closing delimiter"),
        ("{{ /* c */ }}", 'line 1, column 4: unexpected "/" in action'),
    ],
)
def test_bad_comments(src: str, message: str) -> None:
    assert message in fails(src)


# -- fields -------------------------------------------------------------------------------------------


def test_old_marblerun_spelling_is_the_same_object() -> None:
    for field in ("SealKey", "RootCA.Cert", "MarbleCert.Private", "CoordinatorRoot.Cert"):
        assert run(f"{{{{ hex .Marblerun.{field} }}}}") == run(f"{{{{ hex .MarbleRun.{field} }}}}")


def test_root_variable() -> None:
    assert run("{{ hex $.Secrets.symKey }}") == HEX015
    assert run('{{ hex (index $.Secrets "symKey") }}') == HEX015
    assert run("{{ $.Secrets.symKey.Size }}") == b"128"


def test_printing_scalars_like_go() -> None:
    out = run(
        "{{ .Secrets.symKey.Size }} {{ .Secrets.symKey.Type }} {{ .Secrets.symKey.Shared }} "
        "{{ .Secrets.plainPw.UserDefined }} {{ .Secrets.certShared.ValidFor }} {{ .Secrets.certShared.Type }}"
    )
    assert out == b"128 symmetric-key true true 365 cert-ecdsa"


def test_printing_string_literals() -> None:
    assert run('{{ "a\\tb\\n\\x41\\101\\u00e9\\U0001F600\\"\\\\" }}') == 'a\tb\nAAé😀"\\'.encode()
    assert run("{{ `raw \\n {{ }}` }}") == b"raw \\n {{ }}"
    assert run("{{ `with\r\ncr` }}") == b"with\ncr"  # Go drops CR from raw strings
    assert run('{{ "}}" }}') == b"}}"
    assert run('{{ "\\xff\\x00" }}') == b"\xff\x00"


def test_invalid_utf8_in_quoted_string_becomes_replacement_character() -> None:
    assert run(b'{{ "\xff\xe2\x82" }}') == "\ufffd\ufffd\ufffd".encode()


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("{{ .MarbleRun.Foo }}", "line 1, column 14: can't evaluate field Foo in type ReservedSecrets"),
        ("{{ hex .MarbleRun.SealKey.X }}", "can't evaluate field X in type SealKey"),
        ("{{ hex .Secrets.symKey.Bogus }}", "can't evaluate field Bogus in type Secret"),
        ("{{ .Foo }}", "can't evaluate field Foo in type TemplateData"),
        ("{{ .Previous.MarbleRun }}", "can't evaluate field MarbleRun in type PreviousSecrets"),
        ("{{ pem .MarbleRun.RootCA.Type }}", "can't evaluate field Type in type ReservedSecret"),
        ("{{ .Secrets.symKey.Cert.Raw }}", "can't evaluate field Raw in type Certificate"),
        ("{{ .marbleRun.SealKey }}", "can't evaluate field marbleRun"),  # field names are case-sensitive
    ],
)
def test_unknown_fields(src: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse_template(src.encode(), FILES)
    assert message in str(info.value)


def test_hyphenated_name_needs_index() -> None:
    msg = fails("{{ hex .Secrets.my-key }}")
    assert msg.startswith("line 1, column 19: bad character")
    assert '(index .Secrets "my-key")' in msg
    assert run('{{ hex (index .Secrets "my-key") }}') == BYTES_0_15[::-1].hex().encode()


# -- index ----------------------------------------------------------------------------------------------


def test_index_forms() -> None:
    assert run('{{ index .Secrets "symKey" | hex }}') == HEX015
    assert run('{{ hex (index .Previous.Secrets "symKey") }}') == bytes(range(16, 32)).hex().encode()
    assert run('{{ (index .Secrets "my-key").Size }}') == b"128"
    assert run("{{ hex (index .Secrets `my-key`).Private }}") == BYTES_0_15[::-1].hex().encode()
    assert run('{{ hex (index .Secrets "sym\\x4bey") }}') == HEX015
    # a key computed by another expression
    assert run('{{ "symKey" | index .Secrets | hex }}') == HEX015
    # index with no keys returns its argument
    assert run("{{ hex (index .Secrets.symKey) }}") == HEX015


def test_nested_index_on_a_secret_is_refused() -> None:
    assert "can't index item of type Secret" in fails('{{ hex (index .Secrets "symKey" "x") }}')
    assert "can't index item of type TemplateData" in fails('{{ hex (index . "Secrets") }}')
    assert "should be string" in fails("{{ hex (index .Secrets .Secrets.symKey.Size) }}")
    assert "want at least 1 got 0" in fails("{{ hex (index) }}")


def test_index_with_key_that_is_not_utf8_is_missing() -> None:
    assert "empty value" in fails('{{ hex (index .Secrets "\\xff") }}')


# -- pipelines and parentheses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src",
    [
        "{{ hex .Secrets.symKey }}",
        "{{ .Secrets.symKey | hex }}",
        "{{.Secrets.symKey|hex}}",
        "{{ hex (.Secrets.symKey) }}",
        "{{ (hex .Secrets.symKey) }}",
        "{{ ((.Secrets.symKey | hex)) }}",
        "{{ hex ((.Secrets).symKey) }}",
        '{{ (index .Secrets "symKey") | hex }}',
        "{{\n  hex\n  .Secrets.symKey\n}}",
    ],
)
def test_equivalent_spellings(src: str) -> None:
    assert run(src) == HEX015


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("{{ }}", "line 1, column 1: missing value for command"),
        ("{{ hex .Secrets.symKey | }}", 'missing command after "|"'),
        ("{{ | hex }}", "missing value for command"),
        ("{{ hex }}", "wrong number of args for hex: want 1 got 0"),
        ("{{ hex .Secrets.symKey .Secrets.symKey }}", "wrong number of args for hex: want 1 got 2"),
        ("{{ .Secrets.symKey | hex .Secrets.symKey }}", "wrong number of args for hex: want 1 got 2"),
        ("{{ .Secrets.symKey .Secrets.symKey }}", "can't give argument to non-function .Secrets.symKey"),
        ("{{ .Secrets.symKey | .Secrets.symKey }}", "can't give argument to non-function"),
        ("{{ hex(.Secrets.symKey) }}", 'line 1, column 7: unexpected "(" in operand'),
        ("{{ hex (.Secrets.symKey }}", "unclosed left paren"),
        ("{{ hex .Secrets.symKey) }}", "unexpected right paren"),
        ("{{ () }}", "missing value for command"),
        ("{{ hex .Secrets.symKey", "line 1, column 1: unclosed action"),
        ("ok\n\n  {{ hex", "line 3, column 3: unclosed action"),
        ('{{ "abc }}', "unterminated quoted string"),
        ('{{ "a\nb" }}', "unterminated quoted string"),
        ("{{ `abc }}", "unterminated raw quoted string"),
        ('{{ "\\q" }}', "invalid escape"),
        ('{{ "\\x4" }}', "invalid escape \\x"),
        ('{{ "\\400" }}', "invalid octal escape"),
        ('{{ "\\ud800" }}', "not a Unicode code point"),
        ('{{ "a" .Secrets }}', "can't give argument to non-function"),
        ('{{ "a".Secrets }}', "unexpected . after term string literal"),
        ("{{ hex.Secrets }}", 'unexpected . after term "hex"'),
        ("{{ .Secrets.symKey }}", "cannot print .Secrets.symKey (type Secret)"),
        ("{{ .Secrets.symKey.Private }}", "key material is never printed"),
        ("{{ .MarbleRun.SealKey }}", "cannot print .MarbleRun.SealKey"),
        ("{{ .MarbleRun.RootCA }}", "cannot print"),
        ("{{ . }}", "cannot print . (type TemplateData)"),
        ("{{ $ }}", "cannot print $"),
        ("{{ .Secrets }}", "cannot print .Secrets"),
        ("{{ {{ }}", 'unexpected "{" in action'),
        ("{{ hex .Secrets.symKey @ }}", 'unexpected "@" in action'),
        ("{{ hex .Secrets.€ }}", 'bad character U+20AC after "."'),
        (b"{{ hex .Secrets.\xff }}".decode("latin-1"), 'bad character U+FFFD after "."'),
        ("{{ hex € }}", "unrecognized character in action: U+20AC"),
        ("{{ hex \x7f }}", "unexpected U+007F in action"),
    ],
)
def test_syntax_errors(src: str, message: str) -> None:
    msg = fails(src.encode("latin-1") if "\xff" in src else src.encode())
    assert message in msg
    assert msg.startswith("line ")


# -- not supported ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src",
    [
        "{{ if .Secrets.symKey }}x{{ end }}",
        "{{ else }}",
        "{{ end }}",
        "{{ range .Secrets }}{{ end }}",
        "{{ with .Secrets }}{{ end }}",
        '{{ define "x" }}{{ end }}',
        '{{ template "x" }}',
        '{{ block "x" . }}{{ end }}',
        "{{ break }}",
        "{{ continue }}",
    ],
)
def test_control_structures_are_not_supported(src: str) -> None:
    msg = fails(src)
    assert "is not supported" in msg
    assert msg.startswith("line 1, column 4: ")


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("{{ $x := .Secrets }}", "variable declarations (:= and =) are not supported"),
        ("{{ $x }}", "variables are not supported"),
        ("{{ $ = 1 }}", "variable declarations (:= and =) are not supported"),
        ('{{ printf "%x" .Secrets.symKey }}', 'function "printf" is not supported'),
        ("{{ len .Secrets }}", 'function "len" is not supported'),
        ("{{ not true }}", 'function "not" is not supported'),
        ("{{ eq .A .B }}", 'function "eq" is not supported'),
        ("{{ and .A .B }}", 'function "and" is not supported'),
        ("{{ 42 }}", "number literals are not supported"),
        ("{{ -1 }}", "number literals are not supported"),
        ("{{ .5 }}", "number literals are not supported"),
        ("{{ 'a' }}", "character constants are not supported"),
        ("{{ true }}", "boolean literal true is not supported"),
        ("{{ nil }}", "nil is not supported"),
        ("{{ frobnicate .Secrets.symKey }}", 'function "frobnicate" not defined'),
        ("{{ Hex .Secrets.symKey }}", 'function "Hex" not defined'),  # names are case-sensitive
    ],
)
def test_other_go_features_are_refused(src: str, message: str) -> None:
    assert message in fails(src)


# -- positions -----------------------------------------------------------------------------------------------


def test_error_positions_count_lines_and_bytes() -> None:
    src = b"first line\n\xff\xfe second {{ hex .Secrets.symKey }}\n   {{ pem .Secrets.symKey }}"
    msg = fails(src)
    assert msg.startswith("line 3, column 7: error calling pem on .Secrets.symKey")


def test_runtime_error_position() -> None:
    src = "a\nbb\nccc {{ base64 .Secrets.symKey }} {{ hex .Secrets.unsetKey }}"
    assert fails(src).startswith("line 3, column 37: error calling hex on .Secrets.unsetKey: tried to parse")


def test_position_inside_a_multiline_action() -> None:
    assert fails("{{ hex\n   .Secrets.symKey.Nope }}").startswith(
        "line 2, column 19: can't evaluate field Nope"
    )
