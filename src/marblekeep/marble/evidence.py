"""Evidence issuers: produce TEE evidence over 64 bytes of report data, on the Marble's side.

- :class:`SimulationIssuer` — no TEE. The "evidence" is the report data itself; only a
  Coordinator started in simulation mode accepts it. Warns on every use.
- :class:`GramineIssuer` — Gramine-SGX with DCAP: writes ``user_report_data`` and reads
  ``quote`` from the attestation pseudo-filesystem (root configurable for tests).
- :class:`TdxTsmIssuer` — a TDX guest (Linux 6.7+): a TDX quote through configfs-tsm
  (``/sys/kernel/config/tsm/report``; root configurable for tests).

:func:`detect_issuer` chooses between them. This module is an I/O adapter (it reads and
writes the attestation filesystem); the protocol itself lives in :mod:`.protocol`.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from marblekeep.errors import AttestationError
from marblekeep.marble.protocol import REPORT_DATA_SIZE, EvidenceType

__all__ = [
    "DEFAULT_ATTESTATION_ROOT",
    "DEFAULT_TSM_REPORT_ROOT",
    "EvidenceIssuer",
    "GramineIssuer",
    "SimulationIssuer",
    "TdxTsmIssuer",
    "detect_issuer",
]

log = logging.getLogger("marblekeep.marble")

DEFAULT_ATTESTATION_ROOT = Path("/dev/attestation")
DEFAULT_TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
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


class TdxTsmIssuer:
    """TDX quotes through Linux configfs-tsm.

    For each quote: create a report entry ``<root>/<name>`` (the kernel fills it with ``inblob``,
    ``outblob``, ``provider`` and ``generation``), write the 64 bytes of report data to ``inblob``,
    read the quote from ``outblob``, and remove the entry. ``provider`` must be ``tdx_guest``; a
    ``generation`` that moved by more than one write means another process wrote ``inblob`` at the
    same time, and the quote is refused rather than sent with the wrong report data.
    """

    evidence_type: str = EvidenceType.TDX

    def __init__(
        self,
        root: Path = DEFAULT_TSM_REPORT_ROOT,
        *,
        entry_name: Callable[[], str] = lambda: f"marblekeep-{os.getpid()}-{secrets.token_hex(4)}",
    ) -> None:
        self.root = root
        self._entry_name = entry_name

    def _read(self, path: Path, limit: int) -> bytes:
        try:
            with path.open("rb") as fh:
                return fh.read(limit)
        except OSError as exc:
            raise AttestationError(f"cannot read {path}: {exc.strerror or exc}") from None

    def issue(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        entry = self.root / self._entry_name()
        try:
            entry.mkdir(exist_ok=True)
        except OSError as exc:
            raise AttestationError(
                f"cannot create {entry}: {exc.strerror or exc}; run in a TDX guest with configfs-tsm "
                "(Linux 6.7 or later, configfs mounted at /sys/kernel/config)"
            ) from None
        try:
            provider = self._read(entry / "provider", 64).decode("ascii", "replace").strip()
            if provider != "tdx_guest":
                raise AttestationError(
                    f"{entry / 'provider'} says {provider[:20]!r}, marblekeep needs 'tdx_guest' (a TDX guest)"
                )
            before = self._generation(entry)
            try:
                with (entry / "inblob").open("wb", buffering=0) as fh:
                    written = fh.write(report_data)
            except OSError as exc:
                raise AttestationError(f"cannot write {entry / 'inblob'}: {exc.strerror or exc}") from None
            if written != REPORT_DATA_SIZE:
                raise AttestationError(
                    f"short write to {entry / 'inblob'}: {written} of {REPORT_DATA_SIZE} bytes"
                )
            quote = self._read(entry / "outblob", _MAX_QUOTE + 1)
            after = self._generation(entry)
            if before is not None and after is not None and after != before + 1:
                raise AttestationError(
                    f"{entry} was written by another process at the same time; request the quote again"
                )
        finally:
            try:
                entry.rmdir()
            except OSError:
                log.debug("could not remove the configfs-tsm entry %s", entry)
        if not quote:
            raise AttestationError(f"{entry / 'outblob'} is empty: the TDX quoting service produced no quote")
        if len(quote) > _MAX_QUOTE:
            raise AttestationError(f"{entry / 'outblob'} is larger than {_MAX_QUOTE} bytes: not a TDX quote")
        return quote

    def _generation(self, entry: Path) -> int | None:
        path = entry / "generation"
        if not path.exists():
            return None
        try:
            return int(self._read(path, 32).decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return None


def detect_issuer(
    root: Path = DEFAULT_ATTESTATION_ROOT, tsm_root: Path = DEFAULT_TSM_REPORT_ROOT
) -> EvidenceIssuer:
    """Gramine when ``<root>/attestation_type`` exists and is not ``none``; a TDX guest when the
    configfs-tsm report directory ``tsm_root`` exists; simulation otherwise.

    ``none`` is what gramine-direct (no SGX) and SGX without remote attestation report: there is
    no quote to get, so the Marble falls back to simulation evidence (and says so).
    """
    marker = root / "attestation_type"
    if marker.exists():
        gramine = GramineIssuer(root)
        if gramine.attestation_type() != "none":
            return gramine
        log.warning("%s is 'none': Gramine without remote attestation, using simulation evidence", marker)
        return SimulationIssuer()
    if tsm_root.is_dir():
        return TdxTsmIssuer(tsm_root)
    return SimulationIssuer()
