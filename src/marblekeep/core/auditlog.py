"""The update log, made tamper-evident: a hash chain of JSON lines with a head signed by the root.

MarbleRun keeps an *update log* (reference §9.1): one JSON object per line, written by zap's JSON
encoder, ``{"time":"<2006-01-02T15:04:05.000Z0700>","update":"<message>",<fields in call order>}``.
marblekeep writes exactly those lines, with the same messages and fields, and appends two fields of
its own at the end of every line (clients that parse the lines as JSON ignore unknown keys):

- ``"seq"``: the entry's number, 1 for the first entry of the deployment;
- ``"prevEntrySha256"``: hex SHA-256 of the previous line's UTF-8 bytes (without the newline). The
  first entry carries the hex SHA-256 of the Coordinator root certificate's DER instead, so a chain
  belongs to one deployment.

The *head* is a statement about the newest entry, signed with the Coordinator's root key (ECDSA
P-384 over SHA-256, DER; the same primitive as the manifest signature, so ``openssl dgst -sha256
-verify`` checks it)::

    marblekeep update log head v1
    entries: <N>
    last: <hex SHA-256 of entry N>

Editing, removing, inserting or reordering entries breaks either a ``seq``, a
``prevEntrySha256`` link or the head; :func:`verify_log` reports the first entry that is not as
it was written. Rewriting the whole chain needs the root key.

Entries never hold secret values: secret reads and writes record the user, the secret's name and
its type only. Nothing here does I/O; time is a parameter.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from marblekeep.crypto.signing import sign_sha256, verify_sha256

__all__ = [
    "HEAD_TITLE",
    "LogHead",
    "LogVerification",
    "append_entry",
    "decode_head",
    "encode_head",
    "entry_hash",
    "format_entry",
    "format_time",
    "genesis_hash",
    "head_statement",
    "parse_head",
    "sign_head",
    "verify_log",
]

HEAD_TITLE = "marblekeep update log head v1"
SEQ_FIELD = "seq"
PREV_FIELD = "prevEntrySha256"

FieldValue = str | int | bool | None | Sequence[str]


def format_time(now: dt.datetime) -> str:
    """zap's ISO 8601 layout ``2006-01-02T15:04:05.000Z0700`` in UTC: ``2024-05-01T12:00:00.000Z``."""
    assert now.tzinfo is not None, "now must be timezone-aware"
    utc = now.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def entry_hash(line: str) -> str:
    """Hex SHA-256 of one entry's UTF-8 bytes (the line without its newline)."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def genesis_hash(root_cert_der: bytes) -> str:
    """What the first entry links to: hex SHA-256 of the Coordinator root certificate (DER)."""
    return hashlib.sha256(root_cert_der).hexdigest()


def _json_value(value: FieldValue) -> Any:
    if isinstance(value, str | int | bool) or value is None:
        return value
    return list(value)


def format_entry(
    now: dt.datetime, message: str, fields: Sequence[tuple[str, FieldValue]], *, seq: int, prev: str
) -> str:
    """One log line: time, update, the fields in order, then ``seq`` and ``prevEntrySha256``."""
    doc: dict[str, Any] = {"time": format_time(now), "update": message}
    for key, value in fields:
        doc[key] = _json_value(value)
    doc[SEQ_FIELD] = seq
    doc[PREV_FIELD] = prev
    return json.dumps(doc, separators=(",", ":"))  # ASCII only: non-ASCII text as \u escapes


def append_entry(
    log: Sequence[str],
    root_cert_der: bytes,
    now: dt.datetime,
    message: str,
    fields: Sequence[tuple[str, FieldValue]] = (),
) -> tuple[str, ...]:
    """``log`` with one more entry linked to its last one (or to the root, for the first)."""
    prev = entry_hash(log[-1]) if log else genesis_hash(root_cert_der)
    return (*log, format_entry(now, message, fields, seq=len(log) + 1, prev=prev))


def head_statement(entries: int, last_hash: str) -> bytes:
    """The exact bytes the head signature covers (see the module docstring)."""
    return f"{HEAD_TITLE}\nentries: {entries}\nlast: {last_hash}\n".encode("ascii")


@dataclass(frozen=True)
class LogHead:
    """The signed head of a log: how many entries, the newest entry's hash, the root's signature."""

    entries: int
    last_hash: str
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "lastEntrySha256": self.last_hash,
            "signature": base64.b64encode(self.signature).decode(),
        }


def sign_head(root_key: ec.EllipticCurvePrivateKey, log: Sequence[str]) -> LogHead:
    """Sign the head of ``log`` with the root key (an empty log has ``last`` = 64 zeros)."""
    last = entry_hash(log[-1]) if log else "0" * 64
    return LogHead(len(log), last, sign_sha256(root_key, head_statement(len(log), last)))


def encode_head(head: LogHead) -> bytes:
    """The head as stored (its JSON form, UTF-8)."""
    return json.dumps(head.to_json(), separators=(",", ":")).encode()


def decode_head(data: bytes) -> LogHead | None:
    """A stored head (:func:`encode_head`); None when empty or malformed."""
    try:
        return parse_head(json.loads(data)) if data else None
    except (ValueError, UnicodeDecodeError):
        return None


def parse_head(doc: object) -> LogHead | None:
    """A :class:`LogHead` from its JSON form (``to_json``); None when malformed."""
    if not isinstance(doc, Mapping):
        return None
    entries, last, signature = doc.get("entries"), doc.get("lastEntrySha256"), doc.get("signature")
    if not isinstance(entries, int) or isinstance(entries, bool) or entries < 0:
        return None
    if not isinstance(last, str) or not isinstance(signature, str):
        return None
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return None
    return LogHead(entries, last, sig)


@dataclass(frozen=True)
class LogVerification:
    """The verdict on a log. ``first_broken`` is the 1-based number of the first entry that is not
    as it was written (None when the chain is intact or the break cannot be located)."""

    entries: int
    ok: bool
    first_broken: int | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.ok:
            noun = "entry" if self.entries == 1 else "entries"
            return f"ok: {self.entries} {noun}, hash chain intact, head signed by the Coordinator root"
        where = f"entry {self.first_broken}: " if self.first_broken is not None else ""
        return f"BROKEN: {where}{self.reason}"


def _broken(entries: int, at: int | None, reason: str) -> LogVerification:
    return LogVerification(entries=entries, ok=False, first_broken=at, reason=reason)


def _root_der(root_cert: x509.Certificate) -> bytes:
    return root_cert.public_bytes(serialization.Encoding.DER)


def verify_log(lines: Sequence[str], head: LogHead | None, root_cert: x509.Certificate) -> LogVerification:
    """Check the chain of ``lines`` and the signed ``head`` against the Coordinator root.

    Reports the first entry that is not as written: a line that is not a JSON object, a ``seq``
    out of place (removed, inserted or reordered entries), a ``prevEntrySha256`` that does not
    match the previous entry (that entry was edited), or a head that does not cover the newest
    entry (entries removed at the end, or added without the root key).
    """
    n = len(lines)
    prev = genesis_hash(_root_der(root_cert))
    for index, line in enumerate(lines, start=1):
        try:
            doc = json.loads(line)
        except ValueError:
            return _broken(n, index, "not a JSON object (the line was edited or truncated)")
        if not isinstance(doc, dict) or not isinstance(doc.get("update"), str):
            return _broken(n, index, 'not a log entry (no "update" message)')
        seq = doc.get(SEQ_FIELD)
        if not isinstance(seq, int) or isinstance(seq, bool):
            return _broken(n, index, f"has no {SEQ_FIELD} number (the entry was edited)")
        if seq > index:
            if any(f'"{SEQ_FIELD}":{index},' in later for later in lines[index:]):
                return _broken(n, index, f"found entry {seq} at position {index}: entries were reordered")
            missing = f"entry {index} is" if seq == index + 1 else f"entries {index}..{seq - 1} are"
            return _broken(n, index, f"{missing} missing (found entry {seq} in its place)")
        if seq < index:
            return _broken(
                n, index, f"found entry {seq} at position {index}: entries were reordered or duplicated"
            )
        if doc.get(PREV_FIELD) != prev:
            if index == 1:
                return _broken(
                    n, 1, "does not link to this Coordinator's root certificate (another deployment's log?)"
                )
            return _broken(
                n,
                index - 1,
                f"its SHA-256 differs from the {PREV_FIELD} recorded in entry {index}: entry {index - 1} "
                f"was altered (or entry {index}'s link was)",
            )
        prev = entry_hash(line)
    if head is None:
        return _broken(n, None, "no signed head: the newest entries cannot be checked for removal")
    if head.entries > n:
        more = f"entry {n + 1} is" if head.entries == n + 1 else f"entries {n + 1}..{head.entries} are"
        return _broken(n, n + 1, f"{more} missing (the signed head covers {head.entries} entries)")
    if head.entries < n:
        return _broken(
            n, head.entries + 1, f"not covered by the signed head ({head.entries} entries): added afterwards"
        )
    last = prev if n else "0" * 64
    if head.last_hash != last:
        return _broken(n, n or None, "differs from the entry the signed head covers: it was altered")
    if not verify_sha256(root_cert, head_statement(n, last), head.signature):
        return _broken(n, None, "the head signature does not verify with the Coordinator root certificate")
    return LogVerification(entries=n, ok=True)
