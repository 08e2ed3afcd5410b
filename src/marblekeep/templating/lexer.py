"""Split a template into text and actions, and lex each action into tokens.

The rules are those of Go's ``text/template`` lexer, restricted to what marblekeep supports:

* The source is bytes. It is handled as latin-1 text, so one character is one byte and no byte
  is ever altered; positions are byte offsets.
* Actions are delimited by ``{{`` and ``}}``. ``{{-`` followed by a space, tab, CR or LF trims all
  such whitespace before the action; a space, tab, CR or LF followed by ``-}}`` trims all such
  whitespace after it.
* ``{{/* ... */}}`` is a comment (also ``{{- /* ... */ -}}``); it must end right at the delimiter.
* Inside an action: fields (``.Name``), ``.``, ``$``, identifiers, ``"..."`` and raw `````...`````
  strings, ``(``, ``)`` and ``|``. Identifiers and fields end at a space, ``.``, ``,``, ``|``,
  ``:``, ``(``, ``)`` or ``}}``; any other character there is a "bad character".
* Number, character, boolean literals and variable declarations are lexed only to be refused.

Pure: no I/O. Every problem raises :class:`TemplateError` with a line and column.
"""

from __future__ import annotations

import bisect
import enum
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from marblekeep.errors import TemplateError

__all__ = ["Action", "Locator", "Text", "Tok", "Token", "iter_split", "split"]

_WS = " \t\r\n"
_TERMINATORS = _WS + ".,|:()"
_HEX = frozenset("0123456789abcdefABCDEF")
_OCT = frozenset("01234567")
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}
#: Parentheses deeper than this are refused (keeps the parser's and evaluator's stacks small).
MAX_PAREN_DEPTH = 32


class Locator:
    """Turns a byte offset into ``line L, column C`` (both 1-based; the column counts bytes)."""

    __slots__ = ("_newlines", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._newlines: list[int] | None = None

    def where(self, pos: int) -> str:
        if self._newlines is None:
            text = self._text
            found: list[int] = []
            i = text.find("\n")
            while i >= 0:
                found.append(i)
                i = text.find("\n", i + 1)
            self._newlines = found
        idx = bisect.bisect_left(self._newlines, pos)
        line_start = self._newlines[idx - 1] + 1 if idx else 0
        return f"line {idx + 1}, column {pos - line_start + 1}"

    def error(self, pos: int, message: str) -> TemplateError:
        return TemplateError(f"{self.where(pos)}: {message}")


class Tok(enum.Enum):
    FIELD = "field"  # .Name        value: the name (str)
    DOT = "dot"  # .
    VAR = "variable"  # $ or $name  value: the whole spelling (str)
    IDENT = "identifier"  # name     value: the name (str)
    STRING = "string"  # "..." `...` value: the unquoted bytes
    LPAREN = "("
    RPAREN = ")"
    PIPE = "|"


@dataclass(frozen=True, slots=True)
class Token:
    kind: Tok
    pos: int  # offset of the first byte
    end: int  # offset after the last byte
    value: str | bytes
    spaced: bool  # preceded by whitespace (or the start of the action)


@dataclass(frozen=True, slots=True)
class Text:
    data: bytes


@dataclass(frozen=True, slots=True)
class Action:
    pos: int  # offset of "{{"
    tokens: tuple[Token, ...]


def _rune(s: str, i: int) -> tuple[str, int]:
    """Decode the UTF-8 sequence at ``s[i]`` (latin-1 text). Invalid: (U+FFFD, 1), as Go does."""
    lead = ord(s[i])
    if lead < 0x80:
        return s[i], 1
    if 0xC2 <= lead <= 0xDF:
        width = 2
    elif 0xE0 <= lead <= 0xEF:
        width = 3
    elif 0xF0 <= lead <= 0xF4:
        width = 4
    else:
        return "\ufffd", 1
    try:
        return s[i : i + width].encode("latin-1").decode("utf-8"), width
    except UnicodeDecodeError:
        return "\ufffd", 1


def _is_alnum(ch: str) -> bool:
    if ch < "\x80":
        return ch == "_" or ch.isalnum()
    return ch.isalpha() or unicodedata.category(ch) == "Nd"


def _scan_alnum(s: str, p: int) -> int:
    n = len(s)
    while p < n:
        ch, width = _rune(s, p)
        if not _is_alnum(ch):
            break
        p += width
    return p


def _describe(ch: str) -> str:
    if " " < ch < "\x7f":
        return f'"{ch}"'
    return f"U+{ord(ch):04X}"


def _at_terminator(s: str, p: int) -> bool:
    return p >= len(s) or s[p] in _TERMINATORS or s.startswith("}}", p)


def _unquote(raw: str, pos: int, loc: Locator) -> bytes:
    """Go's strconv.Unquote for a double-quoted literal (without the quotes), as bytes."""
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c != "\\":
            if c < "\x80":
                out.append(ord(c))
                i += 1
            else:
                ch, width = _rune(raw, i)
                out += ch.encode("utf-8")
                i += width
            continue
        e = raw[i + 1]  # the lexer guarantees a character after a backslash
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e in "xuU":
            digits = {"x": 2, "u": 4, "U": 8}[e]
            hexpart = raw[i + 2 : i + 2 + digits]
            if len(hexpart) != digits or not all(h in _HEX for h in hexpart):
                raise loc.error(pos, f"invalid escape \\{e} in quoted string: needs {digits} hex digits")
            value = int(hexpart, 16)
            if e == "x":
                out.append(value)
            elif value > 0x10FFFF or 0xD800 <= value < 0xE000:
                raise loc.error(
                    pos, f"invalid escape \\{e}{hexpart} in quoted string: not a Unicode code point"
                )
            else:
                out += chr(value).encode("utf-8")
            i += 2 + digits
        elif e in _OCT:
            octpart = raw[i + 1 : i + 4]
            if len(octpart) != 3 or not all(o in _OCT for o in octpart) or int(octpart, 8) > 255:
                raise loc.error(
                    pos, "invalid octal escape in quoted string: needs 3 octal digits up to \\377"
                )
            out.append(int(octpart, 8))
            i += 4
        else:
            raise loc.error(pos, f"invalid escape {_describe(e)} after backslash in quoted string")
    return bytes(out)


def _lex_action(s: str, j: int, start: int, loc: Locator) -> tuple[tuple[Token, ...], int, bool]:
    """Lex from ``j`` (after ``{{`` and its trim marker) to the closing delimiter.

    Returns the tokens, the offset after ``}}`` and whether a right trim marker was present.
    """
    toks: list[Token] = []
    n = len(s)
    p = j
    spaced = True
    depth = 0
    while True:
        if p >= n:
            raise loc.error(start, "unclosed action: missing }}")
        c = s[p]
        if c == "}" and s.startswith("}}", p):
            if depth:
                raise loc.error(p, "unclosed left paren: missing )")
            return tuple(toks), p + 2, False
        if c in _WS:
            if s.startswith("-}}", p + 1):
                if depth:
                    raise loc.error(p, "unclosed left paren: missing )")
                return tuple(toks), p + 4, True
            p += 1
            spaced = True
            continue
        begin = p
        kind: Tok
        value: str | bytes = c
        if c == "|":
            kind, p = Tok.PIPE, p + 1
        elif c == "(":
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                raise loc.error(p, f"parentheses nested too deeply (at most {MAX_PAREN_DEPTH} levels)")
            kind, p = Tok.LPAREN, p + 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise loc.error(p, 'unexpected right paren ")"')
            kind, p = Tok.RPAREN, p + 1
        elif c == '"':
            q = p + 1
            while True:
                if q >= n or s[q] == "\n":
                    raise loc.error(p, "unterminated quoted string")
                if s[q] == "\\":
                    if q + 1 >= n or s[q + 1] == "\n":
                        raise loc.error(p, "unterminated quoted string")
                    q += 2
                    continue
                if s[q] == '"':
                    break
                q += 1
            kind, value, p = Tok.STRING, _unquote(s[p + 1 : q], p, loc), q + 1
        elif c == "`":
            q = s.find("`", p + 1)
            if q < 0:
                raise loc.error(p, "unterminated raw quoted string")
            # Go's strconv.Unquote drops carriage returns from raw strings.
            kind, value, p = Tok.STRING, s[p + 1 : q].replace("\r", "").encode("latin-1"), q + 1
        elif c in "+-0123456789" or (c == "." and p + 1 < n and "0" <= s[p + 1] <= "9"):
            raise loc.error(p, "number literals are not supported in marblekeep templates")
        elif c == "'":
            raise loc.error(p, "character constants are not supported in marblekeep templates")
        elif c in ":=":
            raise loc.error(
                p, "variable declarations (:= and =) are not supported in marblekeep templates; only $ exists"
            )
        elif c in ".$":
            q = _scan_alnum(s, p + 1)
            if not _at_terminator(s, q):
                bad, _ = _rune(s, q)
                hint = ""
                if c == "." and bad == "-":
                    hint = (
                        '; a name that is not an identifier (like "my-key") is reached with index: '
                        '(index .Secrets "my-key")'
                    )
                word = s[p:q].encode("latin-1").decode("utf-8")
                raise loc.error(q, f'bad character {_describe(bad)} after "{word}"{hint}')
            name = s[p + 1 : q].encode("latin-1").decode("utf-8")
            if c == "$":
                kind, value = Tok.VAR, "$" + name
            elif q == p + 1:
                kind = Tok.DOT
            else:
                kind, value = Tok.FIELD, name
            p = q
        else:
            ch, _ = _rune(s, p)
            if not _is_alnum(ch):
                if c < "\x80":
                    raise loc.error(p, f"unexpected {_describe(c)} in action")
                raise loc.error(p, f"unrecognized character in action: {_describe(ch)}")
            q = _scan_alnum(s, p)
            if not _at_terminator(s, q):
                bad, _ = _rune(s, q)
                word = s[p:q].encode("latin-1").decode("utf-8")
                raise loc.error(q, f'bad character {_describe(bad)} after "{word}"')
            kind, value, p = Tok.IDENT, s[p:q].encode("latin-1").decode("utf-8"), q
        toks.append(Token(kind, begin, p, value, spaced))
        spaced = False


def split(s: str, loc: Locator) -> list[Text | Action]:
    """Cut latin-1 template text into text runs (trim markers applied) and lexed actions."""
    return list(iter_split(s, loc))


def iter_split(s: str, loc: Locator) -> Iterator[Text | Action]:
    """:func:`split`, one piece at a time (a caller that stops early lexes no further)."""
    n = len(s)
    pos = 0
    trim_leading = False
    while True:
        i = s.find("{{", pos)
        text = s[pos:] if i < 0 else s[pos:i]
        if trim_leading:
            text = text.lstrip(_WS)
        if i < 0:
            if text:
                yield Text(text.encode("latin-1"))
            return
        j = i + 2
        if j + 1 < n and s[j] == "-" and s[j + 1] in _WS:
            text = text.rstrip(_WS)
            j += 2
        if text:
            yield Text(text.encode("latin-1"))
        if s.startswith("/*", j):
            end = s.find("*/", j + 2)
            if end < 0:
                raise loc.error(i, "unclosed comment: missing */")
            k = end + 2
            if s.startswith("}}", k):
                pos, trim_leading = k + 2, False
            elif k < n and s[k] in _WS and s.startswith("-}}", k + 1):
                pos, trim_leading = k + 4, True
            else:
                raise loc.error(k, "comment ends before closing delimiter: write */}} or */ -}}")
            continue
        tokens, pos, trim_leading = _lex_action(s, j, i, loc)
        yield Action(i, tokens)
