"""The secret-read audit trail: who read which secret, when; bounded, and only for those allowed.

Secret reads (``GET /api/v2/secrets``) are not part of the public update log (MarbleRun's log
holds manifest and secret *changes* only, reference §9.1): anyone may read that log, and a reader
could otherwise add an entry, a state write and a signature per request. Instead every read is
recorded here and in the Coordinator's log (logger ``marblekeep.coordinator``, message
``secrets read``), and served by ``GET /api/v2/audit/secret-reads`` to authenticated users:

- every user sees their own reads;
- a user holding ``UpdateManifest`` (the deployment's administrators) sees every read;
- a user holding ``WriteSecret`` on a secret (its owner) sees the reads of that secret.

An entry shows only the secrets its viewer may see (an entry with none left is not shown).

Memory is bounded: the trail is a ring buffer of at most ``max_entries`` entries and about
``max_bytes`` bytes; the oldest entries are dropped first. Entries carry a sequence number that
never repeats, so a reader polling with ``since`` learns how many entries it missed (``dropped``).
The trail lives in memory and starts empty at every start of the Coordinator; the durable record
is the Coordinator's log. Entries never hold secret values. Pure: time is a parameter.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from marblekeep.core.auditlog import format_time

__all__ = ["SecretRead", "SecretReadAudit", "TrailPage"]

#: Bytes counted per entry besides its names (the entry object, its tuples, its time: measured
#: as process memory per entry with CPython 3.11).
_ENTRY_OVERHEAD = 360


@dataclass(frozen=True)
class SecretRead:
    seq: int
    time: dt.datetime
    user: str
    secrets: tuple[tuple[str, str], ...]  # (name, type)

    def size(self) -> int:
        return _ENTRY_OVERHEAD + len(self.user) + sum(len(n) + len(t) + 16 for n, t in self.secrets)

    def to_json(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        shown = self.secrets if names is None else tuple(s for s in self.secrets if s[0] in set(names))
        return {
            "seq": self.seq,
            "time": format_time(self.time),
            "user": self.user,
            "secrets": [{"name": n, "type": t} for n, t in shown],
        }


@dataclass(frozen=True)
class TrailPage:
    """What one viewer sees: entries after ``since``, and how many entries nobody can see any more."""

    entries: tuple[dict[str, Any], ...]
    next_seq: int  # pass as ``since`` next time
    dropped: int  # entries after ``since`` that left the ring buffer before this call


class SecretReadAudit:
    """The ring buffer (see the module docstring). Not thread-safe: use it from one event loop."""

    def __init__(self, *, max_entries: int = 100_000, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: deque[SecretRead] = deque()
        self._bytes = 0
        self._next = 1

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def record(self, now: dt.datetime, user: str, secrets: Sequence[tuple[str, str]]) -> SecretRead:
        entry = SecretRead(self._next, now, user, tuple(secrets))
        self._next += 1
        self._entries.append(entry)
        self._bytes += entry.size()
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            self._bytes -= self._entries.popleft().size()
        return entry

    def page(
        self,
        since: int,
        *,
        sees_all: bool,
        viewer: str,
        owned: Callable[[str], bool],
        limit: int = 1000,
    ) -> TrailPage:
        """Entries with ``seq > since`` that ``viewer`` may see (``owned(name)``: holds WriteSecret)."""
        oldest = self._entries[0].seq if self._entries else self._next
        dropped = max(0, oldest - 1 - since)
        shown: list[dict[str, Any]] = []
        last = since
        complete = True
        for entry in self._entries:
            if entry.seq <= since:
                continue
            if len(shown) >= limit:
                complete = False
                break
            last = entry.seq
            if sees_all or entry.user == viewer:
                shown.append(entry.to_json())
                continue
            names = [n for n, _t in entry.secrets if owned(n)]
            if names:
                shown.append(entry.to_json(names))
        next_seq = max(since, self._next - 1) if complete else last
        return TrailPage(tuple(shown), next_seq, dropped)
