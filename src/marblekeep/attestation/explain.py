"""Explanations: how a refused quote says *why*.

Every refusal names the check, the expected and the actual value, e.g.::

    MRENCLAVE 33d8…2fbb does not match package backend UniqueID 6b28…a1c0

Long hex values are abbreviated as ``first4…last4`` in messages; the full values
are in :attr:`AttestationRefused.details` (for logs, ``--json`` and API clients).
All failing checks are collected into one error instead of stopping at the first.

Pure module: no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from marblekeep.errors import AttestationError, Problem

__all__ = ["AttestationRefused", "FailedCheck", "abbreviate", "rfc3339"]


def abbreviate(value: str, keep: int = 4) -> str:
    """``33d8736d…452fbb`` → ``33d8…2fbb``; short values are returned unchanged."""
    if len(value) <= 2 * keep + 1:
        return value
    return f"{value[:keep]}…{value[-keep:]}"


def rfc3339(moment: dt.datetime) -> str:
    """``2025-07-19T10:01:18Z``: UTC, second precision. Naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FailedCheck:
    """One failed policy check.

    ``check`` is the name of the check (``MRENCLAVE``, ``TCBStatus`` ...), ``field`` the
    manifest path of the setting it compares against (``Packages.backend.UniqueID``),
    ``expected`` / ``actual`` the full values as text, ``message`` the human sentence.
    """

    check: str
    field: str
    expected: str
    actual: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "field": self.field,
            "expected": self.expected,
            "actual": self.actual,
            "message": self.message,
        }


class AttestationRefused(AttestationError):
    """Verified evidence was refused by a policy (package, report data binding).

    ``problems`` holds one :class:`~marblekeep.errors.Problem` per failed check (its path is
    the manifest field); ``checks`` the structured checks; ``details`` a JSON-ready dict
    with the full (unabbreviated) values.
    """

    code = "attestation_refused"

    def __init__(
        self,
        message: str,
        *,
        checks: Sequence[FailedCheck],
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, problems=[Problem(c.field, c.message) for c in checks])
        self.checks: tuple[FailedCheck, ...] = tuple(checks)
        merged: dict[str, object] = dict(details or {})
        merged["checks"] = [c.as_dict() for c in self.checks]
        self.details: dict[str, object] = merged
