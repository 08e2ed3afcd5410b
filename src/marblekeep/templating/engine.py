"""Parse once, execute many times: :class:`Template`, :func:`parse_template`, :func:`render`.

Pure: no I/O. The only state is :func:`render`'s bounded cache of parsed templates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from marblekeep.errors import TemplateError
from marblekeep.templating.compiler import compile_action
from marblekeep.templating.data import FunctionSet, TemplateData
from marblekeep.templating.lexer import Locator, Text, split
from marblekeep.templating.parser import parse_action

__all__ = ["Template", "parse_template", "render"]

#: Templates larger than this are parsed on every :func:`render` call instead of being cached.
CACHE_MAX_SOURCE_BYTES = 64 * 1024
#: How many parsed templates :func:`render` keeps (least recently used are dropped).
CACHE_SIZE = 512

_Part = Callable[[Any], bytes]


def _constant(data: bytes) -> _Part:
    return lambda d: data


class Template:
    """A parsed, type-checked template. Immutable; safe to share between threads.

    Create with :func:`parse_template`.
    """

    __slots__ = ("_const", "_parts", "functions")

    def __init__(self, parts: tuple[_Part, ...], const: bytes | None, functions: FunctionSet) -> None:
        self._parts = parts
        self._const = const
        self.functions = functions

    def execute(self, data: TemplateData) -> bytes:
        """Render the template with ``data``. Raises :class:`TemplateError` (never with secret bytes)."""
        if not isinstance(data, TemplateData):
            raise TemplateError(f"template data must be a TemplateData, got {type(data).__name__}")
        if self._const is not None:
            return self._const
        try:
            parts = self._parts
            if len(parts) == 1:
                return parts[0](data)
            return b"".join([part(data) for part in parts])
        except (AttributeError, TypeError, ValueError, LookupError) as exc:
            # Only reachable when the Secrets mappings hold something that is not a Secret.
            raise TemplateError(
                f"template data has an unexpected shape ({type(exc).__name__}): "
                "TemplateData.secrets and .previous_secrets must map names to Secret values"
            ) from None

    def __repr__(self) -> str:
        return f"<Template {self.functions.value} parts={len(self._parts)}>"


def parse_template(source: bytes, functions: FunctionSet) -> Template:
    """Parse and type-check ``source``. Raises :class:`TemplateError` "line L, column C: ..."."""
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    if not isinstance(source, bytes):
        raise TemplateError(f"template source must be bytes, got {type(source).__name__}")
    if not isinstance(functions, FunctionSet):
        raise TemplateError(f"functions must be a FunctionSet (FILES or ENV), got {type(functions).__name__}")
    text = source.decode("latin-1")
    loc = Locator(text)
    parts: list[_Part] = []
    consts: list[bytes] = []
    all_text = True
    for piece in split(text, loc):
        if isinstance(piece, Text):
            parts.append(_constant(piece.data))
            consts.append(piece.data)
            continue
        all_text = False
        pipeline = parse_action(piece.tokens, piece.pos, functions, loc)
        parts.append(compile_action(pipeline, text, loc))
    return Template(tuple(parts), b"".join(consts) if all_text else None, functions)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parse_cached(source: bytes, functions: FunctionSet) -> Template:
    return parse_template(source, functions)


def render(source: bytes, functions: FunctionSet, data: TemplateData) -> bytes:
    """Parse (cached) and execute ``source``: ``parse_template(source, functions).execute(data)``."""
    if type(source) is bytes and type(functions) is FunctionSet and len(source) <= CACHE_MAX_SOURCE_BYTES:
        template = _parse_cached(source, functions)
    else:
        template = parse_template(source, functions)
    return template.execute(data)
