"""Evidence issuers: produce TEE evidence over 64 bytes of report data, on the Marble's side.

- :class:`SimulationIssuer` — no TEE. The "evidence" is the report data itself; only a
  Coordinator started in simulation mode accepts it. Warns on every use.
- :class:`GramineIssuer` — Gramine-SGX with DCAP: writes ``user_report_data`` and reads
  ``quote`` from the attestation pseudo-filesystem (root configurable for tests).

:func:`detect_issuer` chooses between them. This module is an I/O adapter (it reads and
writes the attestation filesystem); the protocol itself lives in :mod:`.protocol`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

from marblekeep.errors import AttestationError
from marblekeep.marble.protocol import REPORT_DATA_SIZE, EvidenceType

__all__ = [
    "DEFAULT_ATTESTATION_ROOT",
    "EvidenceIssuer",
    "GramineIssuer",
    "SimulationIssuer",
    "detect_issuer",
]

log = logging.getLogger("marblekeep.marble")

DEFAULT_ATTESTATION_ROOT = Path("/dev/attestation")
_MAX_QUOTE = 128 * 1024


@runtime_checkable
class EvidenceIssuer(Protocol):
    """Something that turns 64 bytes of report data into evidence of type ``evidence_type``."""

    @property
    def evidence_type(self) -> str: ...

    def issue(self, report_data: bytes) -> bytes: ...


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise AttestationError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")


class SimulationIssuer:
    """No TEE: sends the report data as "evidence". Insecure; a production Coordinator refuses it."""

    evidence_type: str = EvidenceType.SIMULATION

    def __init__(self) -> None:
        self._warned = False

    def issue(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        if not self._warned:  # once per issuer, not on every retry
            log.warning(
                "no TEE: sending simulation evidence; only a Coordinator in simulation mode accepts it"
            )
            self._warned = True
        return bytes(report_data)


class GramineIssuer:
    """Gramine-SGX DCAP quotes through ``<root>/user_report_data`` and ``<root>/quote``.

    The quote is returned raw (SGX ECDSA quote v3), without Open Enclave's 16-byte header.
    """

    evidence_type: str = EvidenceType.SGX_DCAP

    def __init__(self, root: Path = DEFAULT_ATTESTATION_ROOT) -> None:
        self.root = root

    def attestation_type(self) -> str:
        path = self.root / "attestation_type"
        try:
            return path.read_bytes()[:64].decode("ascii", "replace").strip()
        except OSError as exc:
            raise AttestationError(
                f"cannot read {path}: {exc.strerror or exc}; run inside Gramine-SGX with remote attestation"
            ) from None

    def issue(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        kind = self.attestation_type()
        if kind != "dcap":
            raise AttestationError(
                f"{self.root / 'attestation_type'} says {kind[:20]!r}, marblekeep needs 'dcap': "
                'set sgx.remote_attestation = "dcap" in the Gramine manifest'
            )
        report_path = self.root / "user_report_data"
        quote_path = self.root / "quote"
        try:
            with report_path.open("wb", buffering=0) as fh:
                written = fh.write(report_data)
            if written != REPORT_DATA_SIZE:
                raise AttestationError(f"short write to {report_path}: {written} of {REPORT_DATA_SIZE} bytes")
        except OSError as exc:
            raise AttestationError(f"cannot write {report_path}: {exc.strerror or exc}") from None
        try:
            with quote_path.open("rb") as fh:
                quote = fh.read(_MAX_QUOTE + 1)
        except OSError as exc:
            raise AttestationError(f"cannot read {quote_path}: {exc.strerror or exc}") from None
        if not quote:
            raise AttestationError(f"{quote_path} is empty: Gramine produced no quote (is AESM/QE running?)")
        if len(quote) > _MAX_QUOTE:
            raise AttestationError(f"{quote_path} is larger than {_MAX_QUOTE} bytes: not an SGX quote")
        return quote


def detect_issuer(root: Path = DEFAULT_ATTESTATION_ROOT) -> EvidenceIssuer:
    """Gramine when ``<root>/attestation_type`` exists and is not ``none``, simulation otherwise.

    ``none`` is what gramine-direct (no SGX) and SGX without remote attestation report: there is
    no quote to get, so the Marble falls back to simulation evidence (and says so).
    """
    marker = root / "attestation_type"
    if not marker.exists():
        return SimulationIssuer()
    gramine = GramineIssuer(root)
    if gramine.attestation_type() == "none":
        log.warning("%s is 'none': Gramine without remote attestation, using simulation evidence", marker)
        return SimulationIssuer()
    return gramine
