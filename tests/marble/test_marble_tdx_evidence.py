"""TDX evidence through configfs-tsm, against a directory laid out like the kernel's."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from marblekeep.errors import AttestationError
from marblekeep.marble.evidence import SimulationIssuer, TdxTsmIssuer, detect_issuer

QUOTE = (Path(__file__).resolve().parents[1] / "vectors" / "dcap" / "tdx_quote").read_bytes()
REPORT_DATA = bytes(range(64))


def _entry(root: Path, name: str = "e", provider: str = "tdx_guest", generation: int | None = None) -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "provider").write_text(provider + "\n")
    (entry / "outblob").write_bytes(QUOTE)
    if generation is not None:
        (entry / "generation").write_text(f"{generation}\n")
    return entry


def test_issue_writes_inblob_and_returns_outblob(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    issuer = TdxTsmIssuer(tmp_path, entry_name=lambda: "e")
    assert issuer.evidence_type == "tdx"
    assert issuer.issue(REPORT_DATA) == QUOTE
    assert (entry / "inblob").read_bytes() == REPORT_DATA


def test_other_provider_is_refused(tmp_path: Path) -> None:
    _entry(tmp_path, provider="sev_guest")
    with pytest.raises(AttestationError, match="tdx_guest"):
        TdxTsmIssuer(tmp_path, entry_name=lambda: "e").issue(REPORT_DATA)


def test_concurrent_writer_is_detected(tmp_path: Path) -> None:
    """The kernel bumps ``generation`` on every inblob write: a jump of two means another writer
    changed the report data between our write and our read, so the quote is not used."""
    entry = _entry(tmp_path, generation=5)
    (entry / "outblob").unlink()
    os.mkfifo(entry / "outblob")

    def kernel() -> None:  # another process writes inblob, then the quote is produced
        (entry / "generation.new").write_text("7\n")
        os.replace(entry / "generation.new", entry / "generation")  # atomic, like the kernel's counter
        with (entry / "outblob").open("wb") as fh:
            fh.write(QUOTE)

    thread = threading.Thread(target=kernel)
    thread.start()
    with pytest.raises(AttestationError, match="another process"):
        TdxTsmIssuer(tmp_path, entry_name=lambda: "e").issue(REPORT_DATA)
    thread.join(5)


def test_missing_configfs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="configfs-tsm"):
        TdxTsmIssuer(tmp_path / "absent" / "report", entry_name=lambda: "e").issue(REPORT_DATA)


def test_detect_prefers_gramine_then_tdx_then_simulation(tmp_path: Path) -> None:
    gramine, tsm = tmp_path / "attestation", tmp_path / "tsm"
    assert isinstance(detect_issuer(gramine, tsm), SimulationIssuer)
    tsm.mkdir()
    assert isinstance(detect_issuer(gramine, tsm), TdxTsmIssuer)
    gramine.mkdir()
    (gramine / "attestation_type").write_text("dcap")
    assert detect_issuer(gramine, tsm).evidence_type == "sgx-dcap"
