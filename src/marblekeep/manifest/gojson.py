"""Decode JSON the way Go's ``encoding/json`` decodes into MarbleRun's (tag-less) structs.

The rules emulated here (reference §1.1):

* A struct field is matched by its Go name: an exact match is preferred, otherwise a
  case-insensitive one (Go's ``bytes.EqualFold``: ASCII folding plus the two non-ASCII
  letters that fold onto ASCII field letters, U+017F ``ſ`` → ``s`` and U+212A ``K`` → ``k``).
* Unknown keys are ignored. Keys are processed in document order, so when a key (or a
  case variant of it) repeats, the *last* value wins for scalars, lists and maps, while a
  struct-typed field *merges* the objects (Go reuses the struct).
* Map keys are exact (case-sensitive); a repeated map key replaces the earlier element; a
  JSON ``null`` resets a map or a list to empty and is a no-op for a non-pointer scalar or
  struct; for a pointer it means "absent".
* Numbers keep their literal text (:class:`JNumber`) so that ``uint`` fields can reject
  ``1.5``, ``1e3``, negatives and overflow exactly as Go does, and huge literals cost
  nothing.

Nothing here does I/O. Errors are collected as :class:`~marblekeep.errors.Problem` values
in a :class:`Decoder`; :func:`parse_json` raises :class:`~marblekeep.errors.ManifestError`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from marblekeep.errors import ManifestError, Problem

__all__ = [
    "Decoder",
    "JNumber",
    "JObject",
    "JValue",
    "go_field",
    "go_fold",
    "kind_of",
    "parse_json",
]

#: Go refuses deeper documents; Python's parser would hit the recursion limit near 1000.
MAX_DEPTH = 500


@dataclass(frozen=True)
class JNumber:
    """A JSON number, kept as its literal text."""

    text: str


@dataclass(frozen=True)
class JObject:
    """A JSON object, kept as its key/value pairs in document order (duplicates included)."""

    pairs: tuple[tuple[str, JValue], ...]


JValue: TypeAlias = "bool | str | JNumber | JObject | list[JValue] | None"

_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> str:
    """Replace lone UTF-16 surrogates (from ``\\ud800`` escapes) by U+FFFD, as Go does."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _reject_constant(name: str) -> JValue:
    raise ValueError(f"{name} is not valid JSON")


def _max_depth(text: str) -> int:
    """Nesting depth of a JSON text (brackets inside strings are skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(raw: bytes, what: str = "manifest") -> JValue:
    """Parse *raw* as strict JSON (UTF-8, no BOM, no NaN/Infinity) into a :data:`JValue` tree."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{what} is not valid UTF-8 (byte {exc.start}): save it as UTF-8 JSON",
            problems=[Problem("", f"not valid UTF-8 at byte {exc.start}: save the file as UTF-8")],
        ) from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _max_depth(text) > MAX_DEPTH:
        msg = f"nesting deeper than {MAX_DEPTH} levels: flatten the document"
        raise ManifestError(f"{what} is not valid JSON: {msg}", problems=[Problem("", msg)])

    def hook(pairs: list[tuple[str, JValue]]) -> JObject:
        return JObject(tuple((_clean(k), v) for k, v in pairs))

    try:
        value: JValue = json.loads(
            text,
            object_pairs_hook=hook,
            parse_int=JNumber,
            parse_float=JNumber,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        msg = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise ManifestError(f"{what} is {msg}", problems=[Problem("", msg)]) from None
    except (ValueError, RecursionError) as exc:
        msg = f"not valid JSON: {exc}" if isinstance(exc, ValueError) else "not valid JSON: nesting too deep"
        raise ManifestError(f"{what} is {msg}", problems=[Problem("", msg)]) from None
    return value


def go_fold(name: str) -> str:
    """Fold a key the way Go's ``bytes.EqualFold`` compares it, for matching ASCII field names."""
    return name.replace("\u017f", "s").replace("\u212a", "k").lower()


def go_field(doc: Mapping[str, Any], name: str) -> Any:
    """``doc[name]`` for a small request or config object, as Go's encoding/json finds a struct
    field: the exact spelling first, else the first key equal to ``name`` ignoring case; None if
    there is none. (The manifest itself goes through :class:`Decoder`, which also merges duplicates.)"""
    if name in doc:
        return doc[name]
    for key, value in doc.items():
        if key.lower() == name.lower():
            return value
    return None


def kind_of(value: JValue) -> str:
    """The JSON kind of *value*, for messages ("got string")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, JNumber):
        return "number"
    if isinstance(value, JObject):
        return "object"
    return "array"


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_T = TypeVar("_T")

_UINT = re.compile(r"(0|[1-9][0-9]*)")
_INT = re.compile(r"-?(0|[1-9][0-9]*)")


class Decoder:
    """Collects problems while values are read with Go's rules. One per document."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def type_error(self, path: str, expected: str, value: JValue) -> None:
        self.error(path, f"expected {expected}, got {kind_of(value)}")

    # -- structs ------------------------------------------------------------------------

    def fields(
        self,
        pairs: Iterable[tuple[str, JValue]],
        names: Sequence[str],
        path: str | None = None,
        ignored: Mapping[str, str] | None = None,
    ) -> dict[str, list[JValue]]:
        """Assign each key to a field of *names* (exact match first, then folded); unknown keys drop.

        Returns every value given for each field, in document order. With a *path*, each unknown
        key (Go ignores it silently) becomes a warning; *ignored* maps folded names of fields Go
        knows but marblekeep does not apply to the warning text for them.
        """
        exact = set(names)
        folded: dict[str, str] = {}
        for name in names:
            folded.setdefault(go_fold(name), name)
        found: dict[str, list[JValue]] = {}
        for key, value in pairs:
            match = key if key in exact else folded.get(go_fold(key))
            if match is not None:
                found.setdefault(match, []).append(value)
            elif path is not None:
                self.unknown_field(path, key, names, ignored or {})
        return found

    def unknown_field(self, path: str, key: str, names: Sequence[str], ignored: Mapping[str, str]) -> None:
        if go_fold(key) in ignored:
            self.warnings.append(Problem(join(path, key), ignored[go_fold(key)]))
            return
        close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        self.warnings.append(Problem(join(path, key), f"unknown field, ignored{hint}"))

    def struct(
        self, values: Sequence[JValue], path: str, what: str = "an object"
    ) -> list[tuple[str, JValue]]:
        """Merge every object given for a struct-typed field (``null`` is a no-op)."""
        pairs: list[tuple[str, JValue]] = []
        for value in values:
            if isinstance(value, JObject):
                pairs.extend(value.pairs)
            elif value is not None:
                self.type_error(path, what, value)
        return pairs

    def struct_fields(
        self,
        values: Sequence[JValue],
        path: str,
        names: Sequence[str],
        what: str = "an object",
        ignored: Mapping[str, str] | None = None,
    ) -> dict[str, list[JValue]]:
        return self.fields(self.struct(values, path, what), names, path, ignored)

    # -- maps and lists -----------------------------------------------------------------

    def mapping(self, values: Sequence[JValue], path: str, what: str = "an object") -> dict[str, JValue]:
        """A Go map field: keys exact, a repeated key replaces, ``null`` resets to empty."""
        result: dict[str, JValue] = {}
        for value in values:
            if value is None:
                result = {}
            elif isinstance(value, JObject):
                for key, element in value.pairs:
                    result.pop(key, None)  # keep document order of the last occurrence
                    result[key] = element
            else:
                self.type_error(path, what, value)
        return result

    def array(self, values: Sequence[JValue], path: str, what: str) -> list[JValue] | None:
        """A Go slice field: the last array wins, ``null`` empties it. ``None`` if never given."""
        result: list[JValue] | None = None
        for value in values:
            if value is None:
                result = []
            elif isinstance(value, list):
                result = value
            else:
                self.type_error(path, what, value)
        return result

    def list_of(
        self,
        values: Sequence[JValue],
        path: str,
        element: Callable[[JValue, str], _T | None],
        what: str,
    ) -> tuple[_T, ...]:
        items = self.array(values, path, what)
        if not items:
            return ()
        out: list[_T] = []
        for index, item in enumerate(items):
            converted = element(item, f"{path}[{index}]")
            if converted is not None:
                out.append(converted)
        return tuple(out)

    # -- scalars ------------------------------------------------------------------------

    def _last(
        self, values: Sequence[JValue], path: str, convert: Callable[[JValue, str], _T | None]
    ) -> tuple[bool, _T | None]:
        """(given, value) of the last non-null value; null is a no-op for non-pointer fields."""
        given = False
        result: _T | None = None
        for value in values:
            if value is None:
                continue
            converted = convert(value, path)
            if converted is not None:
                given, result = True, converted
        return given, result

    def str_value(self, value: JValue, path: str) -> str | None:
        if value is None:
            return ""
        if isinstance(value, str):
            return _clean(value)
        self.type_error(path, "a string", value)
        return None

    def bool_value(self, value: JValue, path: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.type_error(path, "true or false", value)
        return None

    def uint_value(self, value: JValue, path: str, bits: int = 64) -> int | None:
        expected = "a non-negative integer"
        if not isinstance(value, JNumber):
            self.type_error(path, expected, value)
            return None
        text = value.text
        if not _UINT.fullmatch(text):
            kind = "a negative number" if text.startswith("-") else "a fraction or exponent"
            self.error(path, f"expected {expected}, got {kind}")
            return None
        if len(text) > 20 or int(text) >= 1 << bits:
            self.error(path, f"expected {expected}, got a number above {(1 << bits) - 1}")
            return None
        return int(text)

    def int_value(self, value: JValue, path: str, bits: int = 64) -> int | None:
        expected = "an integer"
        if not isinstance(value, JNumber):
            self.type_error(path, expected, value)
            return None
        text = value.text
        if not _INT.fullmatch(text):
            self.error(path, f"expected {expected}, got a fraction or exponent")
            return None
        limit = 1 << (bits - 1)
        if len(text) > 21 or not -limit <= int(text) < limit:
            self.error(path, f"expected {expected}, got a number outside the {bits}-bit range")
            return None
        return int(text)

    def bytes_value(self, value: JValue, path: str) -> bytes | None:
        """A Go ``[]byte``: standard base64 with padding, or an array of numbers 0–255."""
        if isinstance(value, str):
            text = value.replace("\r", "").replace("\n", "")
            try:
                return base64.b64decode(text.encode("ascii"), validate=True)
            except (binascii.Error, ValueError, UnicodeEncodeError):
                self.error(path, "not valid base64: use standard base64 with padding, or an array of bytes")
                return None
        if isinstance(value, list):
            out = bytearray()
            for index, item in enumerate(value):
                number = self.uint_value(item, f"{path}[{index}]", bits=8)
                if number is None:
                    return None
                out.append(number)
            return bytes(out)
        self.type_error(path, "a base64 string or an array of bytes", value)
        return None

    # Field readers: all values given for one field -> the Go result.

    def string(self, values: Sequence[JValue], path: str, default: str = "") -> str:
        given, result = self._last(values, path, self.str_value)
        return result if given and result is not None else default

    def boolean(self, values: Sequence[JValue], path: str) -> bool:
        given, result = self._last(values, path, self.bool_value)
        return bool(result) if given else False

    def uint(self, values: Sequence[JValue], path: str, bits: int = 64) -> int:
        given, result = self._last(values, path, lambda v, p: self.uint_value(v, p, bits))
        return result if given and result is not None else 0

    def integer(self, values: Sequence[JValue], path: str, bits: int = 64) -> int:
        given, result = self._last(values, path, lambda v, p: self.int_value(v, p, bits))
        return result if given and result is not None else 0

    def uint_pointer(self, values: Sequence[JValue], path: str, bits: int = 64) -> int | None:
        """A Go ``*uint``: ``null`` (or absence) is ``None``, distinct from ``0``."""
        result: int | None = None
        for value in values:
            result = None if value is None else self.uint_value(value, path, bits)
        return result

    def byte_string(self, values: Sequence[JValue], path: str) -> bytes | None:
        """A Go ``[]byte`` field; ``None`` when absent or null."""
        result: bytes | None = None
        for value in values:
            result = None if value is None else self.bytes_value(value, path)
        return result

    def strings(self, values: Sequence[JValue], path: str) -> tuple[str, ...]:
        return self.list_of(values, path, self.str_value, "an array of strings")

    def ints(self, values: Sequence[JValue], path: str) -> tuple[int, ...]:
        return self.list_of(values, path, self.int_value, "an array of integers")
