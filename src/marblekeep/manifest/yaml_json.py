"""YAML manifests → JSON bytes, as MarbleRun's CLI converts them (``yaml.YAMLToJSONStrict``).

Bytes that already parse as JSON are returned unchanged, so the fingerprint of a JSON
manifest is the hash of the file. Anything else is read as YAML and marshalled the way Go's
``encoding/json`` marshals the result: compact, map keys sorted, ``<``, ``>``, ``&``, U+2028
and U+2029 escaped as ``\\u003c`` …, integers as integers, floats in Go's shortest form.

YAML is resolved as Go's ``yaml.v2`` resolves it (YAML 1.1 flavour): ``yes/no/on/off/y/n``
are booleans, unquoted timestamps stay strings, sexagesimal numbers stay strings, and
duplicate keys are refused (the *Strict* in ``YAMLToJSONStrict``). Differences from Go are
listed in docs/compatibility.md (Manifest, YAML). Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Hashable
from decimal import Decimal
from typing import Any

import yaml

from marblekeep.errors import ManifestError, Problem
from marblekeep.manifest.gojson import parse_json

__all__ = ["JSON_SUFFIXES", "YAML_SUFFIXES", "manifest_source_to_json", "yaml_to_json"]

#: File name endings read as strict JSON, and as YAML (compared case-insensitively).
JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")

#: Refuse YAML whose JSON form would exceed this (alias expansion bombs).
MAX_JSON_BYTES = 16 * 1024 * 1024

_BOOL_TRUE = frozenset({"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"})
_BOOL_FALSE = frozenset({"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"})
_BOOL_RE = re.compile(
    r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$"
)
_NUMBER_RE = re.compile(
    r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
)
#: yaml.v2's ``yamlStyleFloat`` (applied after removing underscores).
_GO_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_SPECIAL_FLOATS = {
    ".inf": math.inf, ".Inf": math.inf, ".INF": math.inf,
    "+.inf": math.inf, "+.Inf": math.inf, "+.INF": math.inf,
    "-.inf": -math.inf, "-.Inf": -math.inf, "-.INF": -math.inf,
    ".nan": math.nan, ".NaN": math.nan, ".NAN": math.nan,
}


def _go_int(text: str) -> int | None:
    """Go's ``strconv.ParseInt(s, 0, 64)`` / ``ParseUint`` on text without underscores."""
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text[:1] in "+-" else text
    try:
        if body[:2] in ("0b", "0B"):
            value = int(body[2:], 2)
        elif body[:2] in ("0x", "0X"):
            value = int(body[2:], 16)
        elif body[:2] in ("0o", "0O"):
            value = int(body[2:], 8)
        elif len(body) > 1 and body.startswith("0"):
            value = int(body[1:], 8)
        else:
            value = int(body, 10)
    except ValueError:
        return None
    if value >= 1 << 64 or (sign < 0 and value > 1 << 63):
        return None
    return sign * value


def _go_number(text: str) -> int | float | str:
    """Resolve a plain scalar that looks numeric as yaml.v2 does: int, else float, else string."""
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    plain = text.replace("_", "")
    as_int = _go_int(plain) if plain else None
    if as_int is not None:
        return as_int
    if _GO_FLOAT_RE.fullmatch(plain):
        return float(plain)
    return text


class _GoYamlLoader(yaml.SafeLoader):
    """A safe loader with yaml.v2's scalar resolution and strict (no duplicate) mappings."""


# Replace PyYAML's implicit resolvers for bool, int, float and timestamp by yaml.v2's rules.
_REPLACED_TAGS = (
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
)
_GoYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_GoYamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_RE, list("yYnNtTfFoO"))
_GoYamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", _NUMBER_RE, list("-+0123456789."))


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    value = loader.construct_scalar(node)
    return value in _BOOL_TRUE


def _construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | float | str:
    return _go_number(str(loader.construct_scalar(node)))


def _construct_timestamp(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


class _YamlMap:
    """A YAML mapping as its (key, value) pairs: keeps ``1`` and ``true`` apart, unlike a dict."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs


def _key_identity(key: object) -> tuple[type, object]:
    return (type(key), key)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _YamlMap:
    seen: set[tuple[type, object]] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable) or isinstance(key, _YamlMap):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a scalar", key_node.start_mark
            )
        if _key_identity(key) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f'duplicate key "{key}": each key may appear once', key_node.start_mark
            )
        seen.add(_key_identity(key))
    loader.flatten_mapping(node)
    merged: dict[tuple[type, object], tuple[Any, Any]] = {}
    for key, value in loader.construct_pairs(node, deep=True):
        merged.pop(_key_identity(key), None)  # a later (explicit) key overrides a merged one
        merged[_key_identity(key)] = (key, value)
    return _YamlMap(list(merged.values()))


_GoYamlLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_GoYamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_number)
_GoYamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_number)
_GoYamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)
_GoYamlLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def _go_string(text: str) -> str:
    # Go escapes the same control characters as Python's json (\b \f \n \r \t, \u00XX otherwise).
    out = json.dumps(text, ensure_ascii=False)
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], out)


def _go_float(value: float) -> str:
    """Go's ``encoding/json`` float64 format: shortest digits, 'f' in [1e-6, 1e21), else 'e'."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError("NaN and infinite numbers have no JSON form")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    shortest = repr(value)
    if 1e-6 <= abs(value) < 1e21:
        return format(Decimal(shortest).normalize(), "f")
    digits = Decimal(shortest).normalize()
    sign, digit_tuple, exp = digits.as_tuple()
    assert isinstance(exp, int)
    lead = "".join(map(str, digit_tuple))
    power = exp + len(lead) - 1
    mantissa = lead[0] + ("." + lead[1:] if len(lead) > 1 else "")
    return ("-" if sign else "") + f"{mantissa}e{'-' if power < 0 else '+'}{abs(power)}"


def _go_float32_g(value: float) -> str:
    """Go's ``strconv.FormatFloat(v, 'g', -1, 32)`` (how sigs.k8s.io/yaml turns float keys into text)."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    text = ""
    for precision in range(1, 10):
        text = f"{single:.{precision}e}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == single:
            break
    mantissa, _, exp_text = text.partition("e")
    digits = mantissa.replace("-", "").replace(".", "").rstrip("0") or "0"
    exponent = int(exp_text)
    sign = "-" if single < 0 else ""
    if exponent < -4 or exponent >= 6:  # shortest formatting decides with precision 6
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if exponent >= 0:
        whole = digits[: exponent + 1].ljust(exponent + 1, "0")
        frac = digits[exponent + 1 :]
        return sign + whole + ("." + frac if frac else "")
    return f"{sign}0.{'0' * (-exponent - 1)}{digits}"


def _key(key: object) -> str:
    """sigs.k8s.io/yaml's conversion of non-string YAML keys."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        if math.isnan(key):
            return ".nan"
        if math.isinf(key):
            return ".inf" if key > 0 else "-.inf"
        return _go_float32_g(key)
    raise ValueError(f"unsupported map key of type {type(key).__name__}")


class _Encoder:
    def __init__(self) -> None:
        self.size = 0
        self.parts: list[str] = []

    def emit(self, text: str) -> None:
        self.size += len(text)
        if self.size > MAX_JSON_BYTES:
            limit = MAX_JSON_BYTES // (1024 * 1024)
            raise ValueError(f"the JSON form exceeds {limit} MiB (alias expansion?)")
        self.parts.append(text)

    def encode(self, value: object) -> None:
        if value is None:
            self.emit("null")
        elif value is True:
            self.emit("true")
        elif value is False:
            self.emit("false")
        elif isinstance(value, int):
            if value >= 1 << 64 or value < -(1 << 63):
                self.emit(_go_float(float(value)))  # yaml.v2 falls back to float64
            else:
                self.emit(str(value))
        elif isinstance(value, float):
            self.emit(_go_float(value))
        elif isinstance(value, str):
            self.emit(_go_string(value))
        elif isinstance(value, bytes):  # !!binary: yaml.v2 yields the decoded bytes as a string
            self.emit(_go_string(value.decode("utf-8", "replace")))
        elif isinstance(value, list | tuple):
            self.emit("[")
            for index, item in enumerate(value):
                if index:
                    self.emit(",")
                self.encode(item)
            self.emit("]")
        elif isinstance(value, _YamlMap | dict):
            pairs = value.pairs if isinstance(value, _YamlMap) else list(value.items())
            converted = {_key(k): v for k, v in pairs}
            items = sorted(converted.items(), key=lambda kv: kv[0])
            self.emit("{")
            for index, (k, v) in enumerate(items):
                if index:
                    self.emit(",")
                self.emit(_go_string(k))
                self.emit(":")
                self.encode(v)
            self.emit("}")
        elif isinstance(value, set):
            self.encode(dict.fromkeys(value))
        else:
            raise ValueError(f"unsupported YAML value of type {type(value).__name__}")


def yaml_to_json(data: bytes) -> bytes:
    """Return JSON bytes for a JSON or YAML manifest (JSON input comes back unchanged).

    Raises :class:`~marblekeep.errors.ManifestError` when the input is neither.
    """
    try:
        parse_json(data)
    except ManifestError:
        pass
    else:
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"not valid UTF-8 (byte {exc.start}): save the file as UTF-8"
        raise ManifestError(f"manifest is {msg}", problems=[Problem("", msg)]) from None
    try:
        documents = list(yaml.load_all(text, Loader=_GoYamlLoader))  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        msg = f"neither JSON nor valid YAML: {exc.problem or exc.context}{where}"
        raise ManifestError(f"manifest is {msg}", problems=[Problem("", msg)]) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        msg = f"neither JSON nor valid YAML: {reason}"
        raise ManifestError(f"manifest is {msg}", problems=[Problem("", msg)]) from None
    if len(documents) > 1:
        msg = "the YAML file holds several documents (---): keep one manifest per file"
        raise ManifestError(f"manifest is invalid: {msg}", problems=[Problem("", msg)])
    encoder = _Encoder()
    try:
        encoder.encode(documents[0] if documents else None)
    except (ValueError, RecursionError) as exc:
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        msg = f"the YAML cannot be converted to JSON: {reason}"
        raise ManifestError(f"manifest is invalid: {msg}", problems=[Problem("", msg)]) from None
    return "".join(encoder.parts).encode("utf-8")


def manifest_source_to_json(data: bytes, name: str) -> bytes:
    """The manifest JSON bytes of a file called ``name`` (``-`` for standard input).

    Which syntax applies is decided by the name, never by trying one after the other:

    * ``*.json``: strict JSON, byte for byte. A JSON error (a trailing comma, single quotes) is
      reported with its line and column; the file is never read as YAML, so the bytes the
      Coordinator signs are the bytes of the file.
    * ``*.yaml`` / ``*.yml``: YAML, converted as MarbleRun's CLI converts it (:func:`yaml_to_json`;
      a YAML file that is also JSON is used unchanged).
    * standard input and any other name: JSON if the first non-blank character is ``{`` (every
      manifest is a JSON object), strictly as for ``*.json``; otherwise YAML.

    Raises :class:`~marblekeep.errors.ManifestError` naming ``name``. Pure: no I/O.
    """
    lower = name.lower()
    if lower.endswith(YAML_SUFFIXES):
        return yaml_to_json(data)
    if not lower.endswith(JSON_SUFFIXES) and not data.lstrip(b" \t\r\n").startswith(b"{"):
        return yaml_to_json(data)
    try:
        parse_json(data, "standard input" if name == "-" else name)
    except ManifestError as exc:
        hint = (
            "a .json file must be strict JSON (write YAML in a .yaml or .yml file)"
            if lower.endswith(JSON_SUFFIXES)
            else "input that starts with { must be strict JSON"
        )
        problems = [Problem(p.path, f"{p.message}; {hint}") for p in exc.problems]
        raise ManifestError(f"{exc.message}; {hint}", problems=problems) from None
    return data
