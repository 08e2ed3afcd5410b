"""Parse the tokens of one action into a small syntax tree.

Grammar (the supported subset of Go's ``text/template``)::

    pipeline := command ( "|" command )*
    command  := operand ( SPACE operand )*
    operand  := term ( FIELD )*            -- fields directly attached: (x).Cert, $.Secrets
    term     := FIELD+ | "." | "$" | IDENT | STRING | "(" pipeline ")"

Identifiers are checked here: a name outside the active function set is the parse error
``function "raw" not defined`` (as in Go); Go keywords, built-ins, literals and variables that
marblekeep does not implement are refused with "not supported".

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from marblekeep.templating.data import FunctionSet
from marblekeep.templating.lexer import Locator, Tok, Token

__all__ = [
    "FUNCTIONS",
    "Chain",
    "Command",
    "Dot",
    "Field",
    "Ident",
    "Node",
    "Pipeline",
    "RootVar",
    "StringLit",
    "parse_action",
]

#: The functions each set defines (``index`` is Go's built-in, kept in both).
FUNCTIONS: dict[FunctionSet, frozenset[str]] = {
    FunctionSet.FILES: frozenset({"pem", "hex", "base64", "raw", "index"}),
    FunctionSet.ENV: frozenset({"pem", "hex", "base64", "string", "index"}),
}
_KEYWORDS = frozenset(
    {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}
)
_GO_BUILTINS = frozenset(
    {
        "and", "or", "not", "len", "print", "printf", "println", "eq", "ne", "lt", "le", "gt", "ge",
        "html", "js", "urlquery", "call", "slice",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Dot:
    pos: int
    end: int


@dataclass(frozen=True, slots=True)
class RootVar:
    pos: int
    end: int


@dataclass(frozen=True, slots=True)
class Field:
    """``.A.B.C`` on the root: ``names`` are (name, offset) pairs."""

    pos: int
    end: int
    names: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Chain:
    """Fields attached to ``$`` or to a parenthesised pipeline: ``$.Secrets``, ``(x).Cert``."""

    pos: int
    end: int
    base: Node
    names: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class StringLit:
    pos: int
    end: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Ident:
    """A function name (already checked against the function set)."""

    pos: int
    end: int
    name: str


@dataclass(frozen=True, slots=True)
class Command:
    pos: int
    end: int
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Pipeline:
    pos: int
    end: int
    commands: tuple[Command, ...]


Node = Dot | RootVar | Field | Chain | StringLit | Ident | Pipeline


class _Parser:
    def __init__(self, tokens: tuple[Token, ...], functions: FunctionSet, loc: Locator) -> None:
        self._toks = tokens
        self._i = 0
        self._functions = functions
        self._defined = FUNCTIONS[functions]
        self._loc = loc

    def _peek(self) -> Token | None:
        return self._toks[self._i] if self._i < len(self._toks) else None

    def pipeline(self, start: int) -> Pipeline:
        commands: list[Command] = []
        while True:
            commands.append(self._command(start))
            tok = self._peek()
            if tok is None or tok.kind is Tok.RPAREN:
                break
            # _command stops only at the end, ")" or "|".
            self._i += 1
            start = tok.pos
            after = self._peek()
            if after is None or after.kind in (Tok.RPAREN, Tok.PIPE):
                raise self._loc.error(tok.pos, 'missing command after "|"')
        return Pipeline(commands[0].pos, commands[-1].end, tuple(commands))

    def _command(self, start: int) -> Command:
        operands: list[Node] = []
        while True:
            tok = self._peek()
            if tok is None or tok.kind in (Tok.PIPE, Tok.RPAREN):
                break
            if operands and not tok.spaced:
                raise self._loc.error(
                    tok.pos, f"unexpected {self._show(tok)} in operand: separate operands with a space"
                )
            operands.append(self._operand())
        if not operands:
            raise self._loc.error(
                start, "missing value for command: write a field such as .Secrets.name or a function call"
            )
        return Command(operands[0].pos, operands[-1].end, tuple(operands))

    def _operand(self) -> Node:
        node = self._term()
        names: list[tuple[str, int]] = []
        end = node.end
        while (tok := self._peek()) is not None and tok.kind is Tok.FIELD and not tok.spaced:
            assert isinstance(tok.value, str)
            names.append((tok.value, tok.pos))
            end = tok.end
            self._i += 1
        if not names:
            return node
        if isinstance(node, Field):
            return Field(node.pos, end, node.names + tuple(names))
        if isinstance(node, RootVar | Pipeline):
            return Chain(node.pos, end, node, tuple(names))
        raise self._loc.error(names[0][1], f"unexpected . after term {self._text(node)}")

    def _term(self) -> Node:
        tok = self._peek()
        assert tok is not None
        self._i += 1
        if tok.kind is Tok.FIELD:
            assert isinstance(tok.value, str)
            return Field(tok.pos, tok.end, ((tok.value, tok.pos),))
        if tok.kind is Tok.DOT:
            return Dot(tok.pos, tok.end)
        if tok.kind is Tok.VAR:
            if tok.value != "$":
                raise self._loc.error(
                    tok.pos,
                    f'undefined variable "{tok.value!s}": variables are not supported in marblekeep '
                    "templates; only $ (the root) exists",
                )
            return RootVar(tok.pos, tok.end)
        if tok.kind is Tok.STRING:
            assert isinstance(tok.value, bytes)
            return StringLit(tok.pos, tok.end, tok.value)
        if tok.kind is Tok.IDENT:
            assert isinstance(tok.value, str)
            return self._ident(tok, tok.value)
        if tok.kind is Tok.LPAREN:
            inner = self.pipeline(tok.pos)
            closing = self._peek()
            # The lexer balances parentheses, so a pipeline inside "(" always stops at ")".
            assert closing is not None and closing.kind is Tok.RPAREN
            self._i += 1
            return Pipeline(tok.pos, closing.end, inner.commands)
        raise self._loc.error(tok.pos, f"unexpected {self._show(tok)} in operand")

    def _ident(self, tok: Token, name: str) -> Ident:
        if name in self._defined:
            return Ident(tok.pos, tok.end, name)
        if name in _KEYWORDS:
            raise self._loc.error(
                tok.pos,
                f'"{name}" is not supported: marblekeep templates have no control structures '
                "(if, else, range, with, define, template, block, end, break, continue)",
            )
        if name in ("true", "false"):
            raise self._loc.error(tok.pos, f"boolean literal {name} is not supported in marblekeep templates")
        if name == "nil":
            raise self._loc.error(tok.pos, "nil is not supported in marblekeep templates")
        if name in _GO_BUILTINS:
            raise self._loc.error(
                tok.pos,
                f'function "{name}" is not supported in marblekeep templates '
                f"(available: {self._available()})",
            )
        hint = ""
        if name == "raw":
            hint = "; raw is only available in Files: in Env use hex or base64, or string for plain secrets"
        elif name == "string":
            hint = "; string is only available in Env: in Files use raw"
        raise self._loc.error(
            tok.pos,
            f'function "{name}" not defined (available in {self._functions.value}: '
            f"{self._available()}){hint}",
        )

    def _available(self) -> str:
        order = ("pem", "hex", "base64", "raw", "string", "index")
        return ", ".join(f for f in order if f in self._defined)

    @staticmethod
    def _show(tok: Token) -> str:
        if tok.kind in (Tok.LPAREN, Tok.RPAREN, Tok.PIPE):
            return f'"{tok.kind.value}"'
        return str(tok.kind.value)

    def _text(self, node: Node) -> str:
        if isinstance(node, StringLit):
            return "string literal"
        if isinstance(node, Ident):
            return f'"{node.name}"'
        return '"."'


def parse_action(tokens: tuple[Token, ...], start: int, functions: FunctionSet, loc: Locator) -> Pipeline:
    """Parse one action's tokens (``start`` is the offset of its ``{{``) into a pipeline."""
    parser = _Parser(tokens, functions, loc)
    return parser.pipeline(start)
