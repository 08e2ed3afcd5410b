"""The tamper-evident update log: MarbleRun's line format, the hash chain, the signed head, and
detection of every deletion, reordering and edit (pure; plus openssl checking the head)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import NOW
from marblekeep.core.auditlog import (
    LogHead,
    append_entry,
    entry_hash,
    format_time,
    genesis_hash,
    head_statement,
    parse_head,
    sign_head,
    verify_log,
)
from marblekeep.core.deployment import new_deployment

CA = new_deployment(["localhost"], NOW).ca
OTHER_CA = new_deployment(["localhost"], NOW).ca
ROOT_DER = CA.root.cert_der


def build(n: int) -> tuple[tuple[str, ...], LogHead]:
    log: tuple[str, ...] = ()
    for i in range(n):
        log = append_entry(
            log,
            ROOT_DER,
            NOW + dt.timedelta(seconds=i),
            "Secret set",
            (("user", f"user{i}"), ("secret", f"s{i}"), ("type", "plain")),
        )
    return log, sign_head(CA.root.key, log)


LOG, HEAD = build(6)


def test_line_format_is_marblerun_field_order_then_chain_fields() -> None:
    first = json.loads(LOG[0])
    assert list(first) == ["time", "update", "user", "secret", "type", "seq", "prevEntrySha256"]
    assert first["time"] == "2026-05-01T12:00:00.123Z"  # zap's 2006-01-02T15:04:05.000Z0700 in UTC
    assert first["seq"] == 1
    assert first["prevEntrySha256"] == genesis_hash(ROOT_DER)
    second = json.loads(LOG[1])
    assert second["prevEntrySha256"] == entry_hash(LOG[0])
    # compact JSON, one object per line, as zap writes it
    assert LOG[0].startswith('{"time":"2026-05-01T12:00:00.123Z","update":"Secret set","user":"user0"')


def test_time_is_converted_to_utc_with_milliseconds() -> None:
    cet = dt.timezone(dt.timedelta(hours=2))
    assert format_time(dt.datetime(2026, 1, 2, 5, 4, 3, 9000, tzinfo=cet)) == "2026-01-02T03:04:03.009Z"


def test_non_ascii_names_are_escaped_so_lines_are_plain_ascii() -> None:
    log = append_entry((), ROOT_DER, NOW, "Secret set", (("user", "jürgen\u2028"),))
    assert log[0].isascii()
    assert json.loads(log[0])["user"] == "jürgen\u2028"


def test_intact_log_verifies() -> None:
    result = verify_log(LOG, HEAD, CA.root.cert)
    assert result.ok and result.entries == 6 and result.first_broken is None
    assert result.describe().startswith("ok: 6 entries")


def test_empty_log_with_signed_head_verifies() -> None:
    assert verify_log((), sign_head(CA.root.key, ()), CA.root.cert).ok


@pytest.mark.parametrize("index", range(6))
def test_deleting_any_entry_is_detected_at_that_entry(index: int) -> None:
    tampered = LOG[:index] + LOG[index + 1 :]
    result = verify_log(tampered, HEAD, CA.root.cert)
    assert not result.ok
    assert result.first_broken == index + 1
    assert "missing" in result.reason


@pytest.mark.parametrize("index", range(5))
def test_swapping_neighbours_is_detected_at_the_first_of_them(index: int) -> None:
    tampered = list(LOG)
    tampered[index], tampered[index + 1] = tampered[index + 1], tampered[index]
    result = verify_log(tampered, HEAD, CA.root.cert)
    assert not result.ok
    assert result.first_broken == index + 1
    assert "reordered" in result.reason


@pytest.mark.parametrize("index", range(6))
def test_editing_any_entry_is_detected_at_that_entry(index: int) -> None:
    tampered = list(LOG)
    tampered[index] = tampered[index].replace(f'"user{index}"', '"mallory"')
    assert tampered[index] != LOG[index]
    result = verify_log(tampered, HEAD, CA.root.cert)
    assert not result.ok
    assert result.first_broken == index + 1
    assert "altered" in result.reason


@pytest.mark.parametrize("index", range(6))
def test_editing_an_entry_and_relinking_the_rest_needs_the_root_key(index: int) -> None:
    """An attacker who rewrites the chain after an edit still cannot sign a new head."""
    entries = [json.loads(line) for line in LOG]
    entries[index]["user"] = "mallory"
    relinked: list[str] = []
    prev = genesis_hash(ROOT_DER)
    for doc in entries:
        doc["prevEntrySha256"] = prev
        line = json.dumps(doc, separators=(",", ":"))
        relinked.append(line)
        prev = entry_hash(line)
    forged = LogHead(len(relinked), prev, HEAD.signature)
    result = verify_log(relinked, forged, CA.root.cert)
    assert not result.ok and "signature" in result.reason
    # ... and a head signed by another deployment's root does not help either
    assert not verify_log(relinked, sign_head(OTHER_CA.root.key, relinked), CA.root.cert).ok


def test_truncating_the_newest_entries_is_detected() -> None:
    result = verify_log(LOG[:4], HEAD, CA.root.cert)
    assert not result.ok and result.first_broken == 5
    assert "entries 5..6 are missing" in result.reason


def test_entries_appended_without_the_root_key_are_detected() -> None:
    longer = append_entry(LOG, ROOT_DER, NOW, "Secret set", (("user", "mallory"),))
    result = verify_log(longer, HEAD, CA.root.cert)
    assert not result.ok and result.first_broken == 7


def test_a_log_of_another_deployment_does_not_verify() -> None:
    result = verify_log(LOG, HEAD, OTHER_CA.root.cert)
    assert not result.ok and result.first_broken == 1


def test_garbage_line_and_missing_head_are_reported() -> None:
    broken = [*LOG[:2], "not json", *LOG[3:]]
    assert verify_log(broken, HEAD, CA.root.cert).first_broken == 3
    no_head = verify_log(LOG, None, CA.root.cert)
    assert not no_head.ok and "no signed head" in no_head.reason


def test_head_json_round_trip_and_malformed_heads() -> None:
    assert parse_head(HEAD.to_json()) == HEAD
    for bad in (
        None,
        [],
        {"entries": "6"},
        {**HEAD.to_json(), "signature": "%%%"},
        {**HEAD.to_json(), "entries": True},
    ):
        assert parse_head(bad) is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_head_signature_verifies_with_openssl(tmp_path: Path) -> None:
    """The head is checkable without marblekeep: openssl dgst -sha256 over the statement."""
    statement = tmp_path / "head.txt"
    statement.write_bytes(head_statement(HEAD.entries, HEAD.last_hash))
    (tmp_path / "head.sig").write_bytes(HEAD.signature)
    (tmp_path / "root.pub").write_bytes(
        CA.root.cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "root.pub", "-signature", "head.sig", "head.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "Verified OK" in out.stdout
    assert statement.read_text().startswith("marblekeep update log head v1\nentries: 6\nlast: ")


_ops = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("swap"), st.integers(0, 5), st.integers(0, 5)),
    st.tuples(st.just("edit"), st.integers(0, 5), st.text(min_size=1, max_size=8)),
    st.tuples(st.just("duplicate"), st.integers(0, 5)),
)


@settings(max_examples=200, deadline=None)
@given(op=_ops)
def test_any_change_to_the_stored_entries_is_detected(op: tuple[object, ...]) -> None:
    entries = list(LOG)
    kind = op[0]
    if kind == "delete":
        del entries[int(op[1])]  # type: ignore[call-overload]
    elif kind == "swap":
        i, j = int(op[1]), int(op[2])  # type: ignore[call-overload]
        entries[i], entries[j] = entries[j], entries[i]
    elif kind == "edit":
        i = int(op[1])  # type: ignore[call-overload]
        doc = json.loads(entries[i])
        doc["user"] = str(op[2])
        entries[i] = json.dumps(doc, separators=(",", ":"))
    else:
        i = int(op[1])  # type: ignore[call-overload]
        entries.insert(i, entries[i])
    result = verify_log(entries, HEAD, CA.root.cert)
    assert result.ok == (entries == list(LOG))
