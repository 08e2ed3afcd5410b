"""Robustness: the template parser and renderer (tests/fuzzing.py).

A manifest's ``Files``/``Env`` values are templates; they arrive with the manifest from the network.
Parsing, executing and the bounded ``render_size`` may only succeed or raise ``TemplateError``.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from templating_support import make_data

from fuzzing import FUZZ, SLOW, no_hang, slow
from marblekeep.errors import RenderLimitError, TemplateError
from marblekeep.templating import FunctionSet, RenderBudget, parse_template, render_size

PIECES = [
    "{{",
    "}}",
    "{{-",
    "-}}",
    " ",
    "\n",
    "\t",
    ".",
    "$",
    "|",
    "(",
    ")",
    ",",
    '"',
    "'",
    "`",
    "/*",
    "*/",
    "pem",
    "hex",
    "base64",
    "raw",
    "string",
    "index",
    "printf",
    "len",
    "and",
    "if",
    "range",
    "end",
    "MarbleRun",
    "Marblerun",
    "RootCA",
    "MarbleCert",
    "SealKey",
    "CoordinatorRoot",
    "Cert",
    "Public",
    "Private",
    "Secrets",
    "Previous",
    "shared",
    "plain",
    "cert",
    "missing",
    "Key",
    "0",
    "1",
    "-1",
    '"Private"',
    '"x"',
    "nil",
    "true",
    "\u00e9",
    "\ud7ff",
    "\x00",
    "{",
    "}",
    "A",
    ":=",
    "=",
]
DATA = make_data()
sources = st.lists(st.sampled_from(PIECES), max_size=40).map(
    lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
)


def _check(source: bytes, functions: FunctionSet) -> None:
    with no_hang("template parse/execute"):
        try:
            template = parse_template(source, functions)
        except TemplateError as exc:
            assert exc.message
            parsed = False
        else:
            parsed = True
            try:
                full = template.execute(DATA)
            except TemplateError:
                full = None
        # render_size agrees with parse + execute (when both succeed)
        try:
            size = render_size(
                source,
                functions,
                DATA,
                RenderBudget(max_bytes=10**9, max_actions=10**6),
                max_bytes=10**9,
                max_actions=10**6,
            )
        except RenderLimitError:
            raise AssertionError("no limit can be reached here") from None
        except TemplateError:
            size = None
        if parsed and full is not None:
            assert size == len(full)
        else:
            assert size is None


@FUZZ
@given(sources, st.sampled_from(list(FunctionSet)))
def test_fuzz_templates_from_tokens(source: bytes, functions: FunctionSet) -> None:
    _check(source, functions)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(list(FunctionSet)))
def test_fuzz_templates_from_bytes(source: bytes, functions: FunctionSet) -> None:
    _check(source, functions)


@FUZZ
@given(sources, st.integers(0, 5000), st.integers(0, 50))
def test_fuzz_bounded_rendering_stops_at_its_limits(source: bytes, max_bytes: int, max_actions: int) -> None:
    budget = RenderBudget(max_bytes=max_bytes, max_actions=max_actions)
    with no_hang("render_size"):
        try:
            size = render_size(
                source * 5, FunctionSet.FILES, DATA, budget, max_bytes=max_bytes, max_actions=max_actions
            )
        except RenderLimitError:
            return
        except TemplateError:
            return
    assert size <= max_bytes


@slow
@SLOW
@given(sources, st.integers(100, 5000))
def test_fuzz_slow_long_templates(source: bytes, repeat: int) -> None:
    _check(source * repeat, FunctionSet.FILES)
