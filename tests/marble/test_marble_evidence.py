"""Evidence issuers: simulation, Gramine's /dev/attestation (a temporary directory stands in for it)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from marblekeep.errors import AttestationError
from marblekeep.marble.evidence import EvidenceIssuer, GramineIssuer, SimulationIssuer, detect_issuer

REPORT_DATA = bytes(range(64))
FAKE_QUOTE = b"\x03\x00\x02\x00" + b"Q" * 1000


def gramine_root(tmp_path: Path, kind: str = "dcap") -> Path:
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text(kind + "\n")
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(FAKE_QUOTE)
    return root


def test_simulation_returns_report_data_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    issuer = SimulationIssuer()
    assert isinstance(issuer, EvidenceIssuer)
    assert issuer.evidence_type == "simulation"
    with caplog.at_level(logging.WARNING, logger="marblekeep.marble"):
        assert issuer.issue(REPORT_DATA) == REPORT_DATA
    expected = "no TEE: sending simulation evidence; only a Coordinator in simulation mode accepts it"
    assert expected in caplog.text


@pytest.mark.parametrize("issuer", [SimulationIssuer(), GramineIssuer(Path("/nonexistent"))])
def test_report_data_must_be_64_bytes(issuer: EvidenceIssuer) -> None:
    with pytest.raises(AttestationError, match="64 bytes"):
        issuer.issue(bytes(32))


def test_gramine_writes_report_data_then_reads_quote(tmp_path: Path) -> None:
    root = gramine_root(tmp_path)
    issuer = GramineIssuer(root)
    assert isinstance(issuer, EvidenceIssuer)
    assert issuer.evidence_type == "sgx-dcap"
    assert issuer.issue(REPORT_DATA) == FAKE_QUOTE  # raw quote, no OE header
    assert (root / "user_report_data").read_bytes() == REPORT_DATA


def test_gramine_reads_quote_after_writing(tmp_path: Path) -> None:
    """The quote is read after the write: a FIFO as `quote` only answers once report data was written."""
    root = gramine_root(tmp_path)
    (root / "quote").unlink()
    os.mkfifo(root / "quote")
    order: list[str] = []

    class Recording(GramineIssuer):
        def issue(self, report_data: bytes) -> bytes:
            order.append("issue")
            return super().issue(report_data)

    def feed() -> None:
        with (root / "quote").open("wb") as fifo:  # blocks until the issuer opens it for reading
            written = (root / "user_report_data").read_bytes() == REPORT_DATA
            order.append("quote-opened-after-write" if written else "quote-opened-before-write")
            fifo.write(FAKE_QUOTE)

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert Recording(root).issue(REPORT_DATA) == FAKE_QUOTE
    feeder.join(5)
    assert order == ["issue", "quote-opened-after-write"]


@pytest.mark.parametrize("kind", ["epid", "none", "garbage"])
def test_gramine_refuses_other_attestation_types(tmp_path: Path, kind: str) -> None:
    root = gramine_root(tmp_path, kind)
    with pytest.raises(AttestationError, match=f"says '{kind}', marblekeep needs 'dcap'.*remote_attestation"):
        GramineIssuer(root).issue(REPORT_DATA)
    assert (root / "user_report_data").read_bytes() == bytes(64)  # nothing written


def test_gramine_errors_name_the_file(tmp_path: Path) -> None:
    root = gramine_root(tmp_path)
    (root / "quote").write_bytes(b"")
    with pytest.raises(AttestationError, match="quote is empty"):
        GramineIssuer(root).issue(REPORT_DATA)
    (root / "quote").unlink()
    with pytest.raises(AttestationError, match=r"cannot read .*quote"):
        GramineIssuer(root).issue(REPORT_DATA)
    with pytest.raises(AttestationError, match=r"cannot read .*attestation_type"):
        GramineIssuer(tmp_path / "missing").issue(REPORT_DATA)


def test_detect_issuer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(detect_issuer(tmp_path / "missing"), SimulationIssuer)
    dcap = gramine_root(tmp_path)
    detected = detect_issuer(dcap)
    assert isinstance(detected, GramineIssuer)
    assert detected.root == dcap
    none_root = tmp_path / "none"
    none_root.mkdir()
    (none_root / "attestation_type").write_text("none")
    with caplog.at_level(logging.WARNING, logger="marblekeep.marble"):
        assert isinstance(detect_issuer(none_root), SimulationIssuer)
    assert "without remote attestation" in caplog.text
    epid_root = tmp_path / "epid"
    epid_root.mkdir()
    (epid_root / "attestation_type").write_text("epid")
    assert isinstance(detect_issuer(epid_root), GramineIssuer)  # and then fails loudly, never simulation
