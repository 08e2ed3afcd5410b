"""Parse once, execute many times: :class:`Template`, :func:`parse_template`, :func:`render`.

Pure: no I/O. The only state is :func:`render`'s bounded cache of parsed templates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from marblekeep.errors import RenderLimitError, TemplateError
from marblekeep.templating.compiler import compile_action
from marblekeep.templating.data import FunctionSet, TemplateData
from marblekeep.templating.lexer import Locator, Text, iter_split
from marblekeep.templating.parser import parse_action

__all__ = ["RenderBudget", "Template", "parse_template", "render", "render_size"]

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

    def execute(self, data: TemplateData, *, limit: int | None = None) -> bytes:
        """Render the template with ``data``. Raises :class:`TemplateError` (never with secret bytes).

        With ``limit``, rendering stops with :class:`RenderLimitError` as soon as the output grows
        beyond ``limit`` bytes (checked after each action, so no more than one action's output is
        produced past the limit).
        """
        if not isinstance(data, TemplateData):
            raise TemplateError(f"template data must be a TemplateData, got {type(data).__name__}")
        if self._const is not None:
            if limit is not None and len(self._const) > limit:
                raise _too_large(limit)
            return self._const
        try:
            parts = self._parts
            if limit is None:
                if len(parts) == 1:
                    return parts[0](data)
                return b"".join([part(data) for part in parts])
            out: list[bytes] = []
            size = 0
            for part in parts:
                piece = part(data)
                size += len(piece)
                if size > limit:
                    raise _too_large(limit)
                out.append(piece)
            return b"".join(out)
        except (AttributeError, TypeError, ValueError, LookupError) as exc:
            raise _bad_data(exc) from None

    def __repr__(self) -> str:
        return f"<Template {self.functions.value} parts={len(self._parts)}>"


def _bad_data(exc: Exception) -> TemplateError:
    # Only reachable when the Secrets mappings hold something that is not a Secret.
    return TemplateError(
        f"template data has an unexpected shape ({type(exc).__name__}): "
        "TemplateData.secrets and .previous_secrets must map names to Secret values"
    )


def _too_large(limit: int) -> RenderLimitError:
    return RenderLimitError(f"renders to more than {limit} bytes")


def _too_many_actions(limit: int) -> RenderLimitError:
    return RenderLimitError(f"has more than {limit} template actions")


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
    for piece in iter_split(text, loc):
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


class RenderBudget:
    """What a series of :func:`render_size` calls may still produce: bytes and template actions.

    Shared across the templates of one manifest (actions) or one Marble (bytes), so that the whole
    costs bounded work however the input is split.
    """

    __slots__ = ("actions", "bytes")

    def __init__(self, *, max_bytes: int, max_actions: int) -> None:
        self.bytes = max_bytes
        self.actions = max_actions


def render_size(
    source: bytes,
    functions: FunctionSet,
    data: TemplateData,
    budget: RenderBudget,
    *,
    max_bytes: int,
    max_actions: int,
) -> int:
    """Parse and execute ``source`` action by action; return the size of its output.

    Stops with :class:`RenderLimitError` as soon as the output exceeds ``budget.bytes`` or the
    actions exceed ``budget.actions`` (``max_bytes``/``max_actions`` are the totals, named in the
    message), so a hostile template costs bounded work: nothing past the limit is lexed, parsed or
    rendered. Both budgets are reduced by what this template used. A syntax error anywhere before
    the limits is reported before an execution error, as :func:`parse_template` then
    :meth:`Template.execute` would report them.
    """
    text = source.decode("latin-1")
    loc = Locator(text)
    size = 0
    actions = 0
    failed: TemplateError | None = None
    try:
        for piece in iter_split(text, loc):
            if isinstance(piece, Text):
                size += len(piece.data)
            else:
                actions += 1
                if actions > budget.actions:
                    raise _too_many_actions(max_actions)
                part = compile_action(parse_action(piece.tokens, piece.pos, functions, loc), text, loc)
                if failed is None:
                    try:
                        size += len(part(data))
                    except TemplateError as exc:
                        failed = exc
                    except (AttributeError, TypeError, ValueError, LookupError) as exc:
                        failed = _bad_data(exc)
            if size > budget.bytes:
                raise _too_large(max_bytes)
    finally:
        budget.actions -= actions
    if failed is not None:
        raise failed
    budget.bytes -= size
    return size
