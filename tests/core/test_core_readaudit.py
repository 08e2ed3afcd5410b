"""The secret-read audit trail is a bounded ring buffer with gap detection (issue 11, #8)."""

from __future__ import annotations

import datetime as dt

from marblekeep.core.readaudit import SecretReadAudit

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _page(trail: SecretReadAudit, since: int = 0, **kw: object) -> tuple[list[int], int, int]:
    page = trail.page(since, sees_all=True, viewer="x", owned=lambda n: False, **kw)  # type: ignore[arg-type]
    return [e["seq"] for e in page.entries], page.next_seq, page.dropped


def test_bounded_by_entries_and_reports_what_was_dropped() -> None:
    trail = SecretReadAudit(max_entries=3)
    for i in range(10):
        trail.record(NOW + dt.timedelta(seconds=i), "bob", [("k", "plain")])
    assert len(trail) == 3
    assert _page(trail) == ([8, 9, 10], 10, 7)
    assert _page(trail, since=8) == ([9, 10], 10, 0)
    assert _page(trail, since=10) == ([], 10, 0)
    assert _page(trail, since=0, limit=2) == ([8, 9], 9, 7)


def test_bounded_by_bytes_at_400_reads_per_second_for_ten_minutes() -> None:
    trail = SecretReadAudit(max_entries=10**9, max_bytes=64 * 1024)
    for _ in range(400 * 600):
        trail.record(NOW, "bob", [("a_secret_name", "symmetric-key")])
    assert trail.size_bytes <= 64 * 1024
    assert 0 < len(trail) < 400
    seqs, next_seq, dropped = _page(trail)
    assert seqs[-1] == 400 * 600 == next_seq and dropped == 400 * 600 - len(seqs)


def test_visibility_own_owned_or_all() -> None:
    trail = SecretReadAudit()
    trail.record(NOW, "bob", [("a", "plain"), ("b", "plain")])
    trail.record(NOW, "eve", [("c", "plain")])

    def seen(viewer: str, sees_all: bool, owns: set[str]) -> list[tuple[str, list[str]]]:
        page = trail.page(0, sees_all=sees_all, viewer=viewer, owned=lambda n: n in owns)
        return [(e["user"], [s["name"] for s in e["secrets"]]) for e in page.entries]

    assert seen("admin", True, set()) == [("bob", ["a", "b"]), ("eve", ["c"])]
    assert seen("bob", False, set()) == [("bob", ["a", "b"])]
    assert seen("owner", False, {"b"}) == [("bob", ["b"])]
    assert seen("nobody", False, set()) == []
