"""Type-check a parsed action and turn it into a closure ``TemplateData -> bytes``.

The data model is fixed (see :mod:`marblekeep.templating.data`), so every expression's type is
known when the template is parsed: ``.Secrets.x`` is always a Secret, ``hex ...`` always a
string. Unknown fields, functions applied to the wrong kind of value and printing of key
material are therefore refused at parse time. What depends on the values (an empty secret,
``string`` on a secret that is not ``plain`` or holds a NUL byte) is checked at execution.

Execution is a few nested closures over attribute lookups: no tree walk, no regex.

Encoding functions (``pem``, ``hex``, ``base64``, ``raw``, ``string``) follow MarbleRun:

========  ==========================================================  =====================
function  accepts                                                     emits
========  ==========================================================  =====================
pem       ``.Cert`` / ``.Public`` / ``.Private`` of a secret           PEM block, ends in \\n
hex       a Secret (its .Public), .Cert, .Public, .Private, SealKey   lower-case hex
base64    same as hex                                                 padded std base64
raw       same as hex (Files only)                                    the bytes
string    a Secret of type plain without NUL (Env only)               its .Public bytes
========  ==========================================================  =====================

Pure: no I/O. Error messages name the expression and never contain a secret's bytes.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any

from marblekeep.errors import TemplateError
from marblekeep.templating.data import PLAIN_TYPE, SecretKind, SecretValue
from marblekeep.templating.lexer import Locator
from marblekeep.templating.parser import (
    Chain,
    Command,
    Dot,
    Field,
    Ident,
    Node,
    Pipeline,
    RootVar,
    StringLit,
)

__all__ = ["compile_action"]

Fn = Callable[[Any], Any]
#: Nested closures deeper than this are refused: keeps execution far from Python's recursion limit.
MAX_DEPTH = 200


class _T(enum.Enum):
    """Static types of template values (the name is what error messages show)."""

    ROOT = "TemplateData"
    MARBLERUN = "ReservedSecrets"
    PREVIOUS = "PreviousSecrets"
    SECRETS = "map[string]Secret"
    RESERVED = "ReservedSecret"
    SECRET = "Secret"  # noqa: S105 - a type name, not a password
    CERT = "Certificate"
    PUBLIC = "PublicKey"
    PRIVATE = "PrivateKey"
    SEALKEY = "SealKey"
    STRING = "string"
    INT = "uint"
    BOOL = "bool"


class _ZeroSecret:
    """Go's zero Secret: what a missing map key yields. Every function on it reports "empty value"."""

    __slots__ = ()
    type: SecretKind | None = None
    size = 0
    shared = False
    user_defined = False
    valid_for = 0
    cert: bytes | None = None
    public = b""
    private = b""


_ZERO = _ZeroSecret()
_BYTES_TYPES = frozenset({_T.CERT, _T.PUBLIC, _T.PRIVATE, _T.SEALKEY})
_SECRET_TYPES = frozenset({_T.SECRET, _T.RESERVED})
_PEM_LABELS = {_T.CERT: b"CERTIFICATE", _T.PUBLIC: b"PUBLIC KEY", _T.PRIVATE: b"PRIVATE KEY"}


def _type_string(secret: SecretValue | _ZeroSecret) -> bytes:
    return b"" if secret.type is None else secret.type.value.encode("utf-8")


# Static field table: (type, field name) -> (result type, attribute path or function or None = same object).
_Step = str | Fn | None
_FIELDS: dict[_T, dict[str, tuple[_T, _Step]]] = {
    _T.ROOT: {
        "MarbleRun": (_T.MARBLERUN, None),
        "Marblerun": (_T.MARBLERUN, None),
        "Secrets": (_T.SECRETS, "secrets"),
        "Previous": (_T.PREVIOUS, None),
    },
    _T.MARBLERUN: {
        "RootCA": (_T.RESERVED, "root_ca"),
        "MarbleCert": (_T.RESERVED, "marble_cert"),
        "CoordinatorRoot": (_T.RESERVED, "coordinator_root"),
        "CoordinatorIntermediate": (_T.RESERVED, "coordinator_intermediate"),
        "SealKey": (_T.SEALKEY, "seal_key"),
    },
    _T.PREVIOUS: {"Secrets": (_T.SECRETS, "previous_secrets")},
    _T.RESERVED: {
        "Cert": (_T.CERT, "cert"),
        "Public": (_T.PUBLIC, "public"),
        "Private": (_T.PRIVATE, "private"),
    },
    _T.SECRET: {
        "Cert": (_T.CERT, "cert"),
        "Public": (_T.PUBLIC, "public"),
        "Private": (_T.PRIVATE, "private"),
        "Type": (_T.STRING, _type_string),
        "Size": (_T.INT, "size"),
        "Shared": (_T.BOOL, "shared"),
        "UserDefined": (_T.BOOL, "user_defined"),
        "ValidFor": (_T.INT, "valid_for"),
    },
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Expr:
    type: _T
    fn: Fn  # TemplateData -> value
    text: str  # the expression as written (for messages; template source, never data)
    depth: int
    const: Any = None  # the value, when it is a constant (string literals)
    is_const: bool = False


def _getter(path: list[str]) -> Fn:
    return attrgetter(".".join(path))


def _then(first: Fn, second: Fn) -> Fn:
    return lambda d: second(first(d))


def _map_get(name: str) -> Fn:
    return lambda m: m.get(name, _ZERO)


class _Compiler:
    def __init__(self, source: str, loc: Locator) -> None:
        self._src = source
        self._loc = loc

    def _err(self, pos: int, message: str) -> TemplateError:
        return self._loc.error(pos, message)

    def _show(self, node: Node | Command) -> str:
        raw = self._src[node.pos : node.end]
        text = " ".join(raw.split())
        return text if len(text) <= 80 else text[:77] + "..."

    # -- expressions ---------------------------------------------------------------------------

    def pipeline(self, pipe: Pipeline) -> _Expr:
        result: _Expr | None = None
        for command in pipe.commands:
            result = self._command(command, result)
        assert result is not None
        return result

    def _command(self, command: Command, piped: _Expr | None) -> _Expr:
        first = command.operands[0]
        if isinstance(first, Ident):
            args = [self._operand(op) for op in command.operands[1:]]
            if piped is not None:
                args.append(piped)
            return self._call(first, args)
        if len(command.operands) > 1 or piped is not None:
            raise self._err(
                first.pos,
                f"can't give argument to non-function {self._show(first)}: only functions "
                "(pem, hex, base64, raw, string, index) take arguments or pipeline input",
            )
        return self._operand(first)

    def _operand(self, node: Node) -> _Expr:
        if isinstance(node, Field):
            base = _Expr(_T.ROOT, lambda d: d, "", 0)
            return self._fields(base, node.names, root_identity=True)
        if isinstance(node, Dot | RootVar):
            return _Expr(_T.ROOT, lambda d: d, self._show(node), 1)
        if isinstance(node, Chain):
            inner = self._operand(node.base)
            return self._fields(inner, node.names, root_identity=isinstance(node.base, RootVar))
        if isinstance(node, StringLit):
            value = node.value
            return _Expr(_T.STRING, lambda d: value, self._show(node), 1, value, True)
        if isinstance(node, Ident):
            # A function name used as an argument: Go calls it with no arguments.
            return self._call(node, [])
        inner = self.pipeline(node)
        if inner.text.startswith("(") and inner.text.endswith(")"):
            return inner
        return dataclasses.replace(inner, text=f"({inner.text})")

    def _fields(self, base: _Expr, names: tuple[tuple[str, int], ...], *, root_identity: bool) -> _Expr:
        typ = base.type
        steps: list[_Step] = []
        text = base.text
        for name, pos in names:
            entry = (_T.SECRET, _map_get(name)) if typ is _T.SECRETS else _FIELDS.get(typ, {}).get(name)
            if entry is None:
                raise self._err(pos, self._no_field(name, typ))
            nxt, field_step = entry
            steps.append(field_step)
            typ = nxt
            text += "." + name
        fn: Fn | None = None if root_identity else base.fn
        depth = base.depth
        path: list[str] = []
        for step in [*steps, None]:
            if isinstance(step, str):
                path.append(step)
                continue
            if path:
                getter = _getter(path)
                fn = getter if fn is None else _then(fn, getter)
                depth += 1
                path = []
            if step is not None:
                fn = step if fn is None else _then(fn, step)
                depth += 1
        if fn is None:
            fn = base.fn
        return self._checked(_Expr(typ, fn, text, depth), names[-1][1])

    def _no_field(self, name: str, typ: _T) -> str:
        message = f"can't evaluate field {name} in type {typ.value}"
        fields = _FIELDS.get(typ)
        if fields:
            message += f" (fields: {', '.join(f for f in fields if f != 'Marblerun')})"
        elif typ in _BYTES_TYPES or typ is _T.STRING:
            message += " (it is a value, not a struct)"
        return message

    def _checked(self, expr: _Expr, pos: int) -> _Expr:
        if expr.depth > MAX_DEPTH:
            raise self._err(pos, f"expression is nested too deeply (more than {MAX_DEPTH} steps)")
        return expr

    # -- functions -----------------------------------------------------------------------------

    def _call(self, ident: Ident, args: list[_Expr]) -> _Expr:
        name = ident.name
        if name == "index":
            return self._index(ident, args)
        if len(args) != 1:
            raise self._err(ident.pos, f"wrong number of args for {name}: want 1 got {len(args)}")
        arg = args[0]
        where = f"{self._loc.where(ident.pos)}: error calling {name} on {arg.text}"
        typ = arg.type
        if name == "pem":
            label = _PEM_LABELS.get(typ)
            if label is None:
                raise self._err(ident.pos, self._pem_refusal(arg))
            fn = _pem(arg.fn, label, where)
        elif name == "string":
            if typ is not _T.SECRET:
                raise self._err(
                    ident.pos,
                    f"error calling string on {arg.text}: invalid secret type {typ.value}: string takes a "
                    "secret of type plain, e.g. string .Secrets.name",
                )
            fn = _string(arg.fn, where)
        else:
            if typ in _SECRET_TYPES:
                value_fn: Fn = _then(arg.fn, attrgetter("public"))
            elif typ in _BYTES_TYPES:
                value_fn = arg.fn
            else:
                raise self._err(
                    ident.pos,
                    f"error calling {name} on {arg.text}: invalid secret type {typ.value}: {name} takes a "
                    "secret, its .Cert, .Public or .Private, or .MarbleRun.SealKey",
                )
            fn = _ENCODERS[name](value_fn, where)
        return self._checked(_Expr(_T.STRING, fn, f"{name} {arg.text}", arg.depth + 1), ident.pos)

    def _pem_refusal(self, arg: _Expr) -> str:
        head = f"error calling pem on {arg.text}: invalid secret type for pem encoding"
        if arg.type in _SECRET_TYPES:
            return (
                f"{head}: pem needs a field that says what to encode: "
                f"{arg.text}.Cert, {arg.text}.Public or {arg.text}.Private"
            )
        if arg.type is _T.SEALKEY:
            return f"{head}: the seal key is a raw 32-byte key; use hex, base64 or raw"
        return f"{head} ({arg.type.value}): pem takes .Cert, .Public or .Private of a secret"

    def _index(self, ident: Ident, args: list[_Expr]) -> _Expr:
        if not args:
            raise self._err(ident.pos, "wrong number of args for index: want at least 1 got 0")
        item, keys = args[0], args[1:]
        fn, typ, depth = item.fn, item.type, item.depth
        text = f"index {item.text}"
        for key in keys:
            if typ is not _T.SECRETS:
                raise self._err(
                    ident.pos,
                    f"error calling index: can't index item of type {typ.value} (index takes "
                    '.Secrets or .Previous.Secrets and a name: index .Secrets "my-key")',
                )
            if key.type is not _T.STRING:
                raise self._err(
                    ident.pos,
                    f"error calling index: key {key.text} has type {key.type.value}; should be string",
                )
            fn = _index_step(fn, key)
            typ = _T.SECRET
            depth = max(depth, key.depth) + 1
            text += f" {key.text}"
        return self._checked(_Expr(typ, fn, f"({text})" if keys else item.text, depth), ident.pos)

    # -- printing ------------------------------------------------------------------------------

    def action(self, pipe: Pipeline) -> Callable[[Any], bytes]:
        expr = self.pipeline(pipe)
        fn = expr.fn
        if expr.type is _T.STRING:
            return fn
        if expr.type is _T.INT:
            return lambda d: str(fn(d)).encode("ascii")
        if expr.type is _T.BOOL:
            return lambda d: b"true" if fn(d) else b"false"
        if expr.type in _SECRET_TYPES:
            hint = f"use a function, e.g. {{{{ hex {expr.text} }}}} or {{{{ pem {expr.text}.Cert }}}}"
        elif expr.type in _BYTES_TYPES:
            hint = f"key material is never printed as is; use {{{{ hex {expr.text} }}}}, base64, pem or raw"
        else:
            hint = "print a field such as .Secrets.name.Size, or encode a secret with hex, base64, pem or raw"
        raise self._err(pipe.pos, f"cannot print {expr.text} (type {expr.type.value}): {hint}")


def _index_step(item_fn: Fn, key: _Expr) -> Fn:
    if key.is_const:
        try:
            name: str | None = key.const.decode("utf-8")
        except UnicodeDecodeError:
            name = None  # no secret name has invalid UTF-8: a missing key, i.e. the zero Secret
        if name is None:
            return lambda d: _ZERO
        return _then(item_fn, _map_get(name))
    key_fn = key.fn

    def lookup(d: Any) -> Any:
        mapping: Mapping[str, SecretValue] = item_fn(d)
        try:
            return mapping.get(key_fn(d).decode("utf-8"), _ZERO)
        except UnicodeDecodeError:
            return _ZERO

    return lookup


_EMPTY = "tried to parse secret with empty value"


def _empty(where: str) -> TemplateError:
    return TemplateError(
        f"{where}: {_EMPTY} (the secret is missing or has no value yet: check its name, "
        "or upload a user-defined secret before the Marble starts)"
    )


def _hex(value_fn: Fn, where: str) -> Fn:
    def run(d: Any) -> bytes:
        value = value_fn(d)
        if not value:
            raise _empty(where)
        return binascii.hexlify(value)

    return run


def _base64(value_fn: Fn, where: str) -> Fn:
    def run(d: Any) -> bytes:
        value = value_fn(d)
        if not value:
            raise _empty(where)
        return binascii.b2a_base64(value, newline=False)

    return run


def _raw(value_fn: Fn, where: str) -> Fn:
    def run(d: Any) -> bytes:
        value = value_fn(d)
        if not value:
            raise _empty(where)
        return bytes(value)

    return run


_ENCODERS: dict[str, Callable[[Fn, str], Fn]] = {"hex": _hex, "base64": _base64, "raw": _raw}


def _pem(value_fn: Fn, label: bytes, where: str) -> Fn:
    begin = b"-----BEGIN " + label + b"-----\n"
    end = b"-----END " + label + b"-----\n"

    def run(d: Any) -> bytes:
        value = value_fn(d)
        if not value:
            raise _empty(where)
        body = b"".join(binascii.b2a_base64(value[i : i + 48]) for i in range(0, len(value), 48))
        return begin + body + end

    return run


def _string(secret_fn: Fn, where: str) -> Fn:
    # MarbleRun's string reads the secret's public part (for a stored plain secret it equals the
    # private part; a SecretValue built by a caller may differ).
    def run(d: Any) -> bytes:
        secret = secret_fn(d)
        value = secret.public
        kind = None if secret.type is None else secret.type.value
        if kind is None or (not value and kind == PLAIN_TYPE):
            raise _empty(where)
        if kind != PLAIN_TYPE:
            raise TemplateError(
                f"{where}: string only takes secrets of type plain, this one is {secret.type.value}; "
                "use hex or base64"
            )
        if b"\x00" in value:
            raise TemplateError(
                f"{where}: the plain secret contains a NUL byte, which an environment variable cannot "
                "hold; use hex or base64"
            )
        return bytes(value)

    return run


def compile_action(pipe: Pipeline, source: str, loc: Locator) -> Callable[[Any], bytes]:
    """Type-check one parsed action; return the closure that renders it."""
    return _Compiler(source, loc).action(pipe)
