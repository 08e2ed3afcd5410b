"""Verify a Coordinator's quote before its root certificate is trusted (pure: no I/O, no clock).

The Coordinator's quote endpoint returns its certificate chain (intermediate, root) and an SGX
quote whose report data starts with ``SHA-256(root DER ‖ nonce)``. The client checks, in order:

1. the quote verifies (Intel signature chain, collateral, TCB level) at time ``now``;
2. the report data binds the root certificate and this client's fresh nonce (no replay, and the
   root in the answer is the enclave's own);
3. the enclave is the expected one: the *era config* (MarbleRun's ``era-config.json``:
   ``SecurityVersion``, ``UniqueID``, ``SignerID``, ``ProductID``, ``Debug``, optionally
   ``AcceptedTCBStatuses`` / ``AcceptedAdvisories``) applied with the package policy of
   :mod:`marblekeep.attestation.policy`.

Unlike a Marble package, ``Debug: true`` in an era config accepts a production enclave too, as
MarbleRun's client does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import string
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from marblekeep.attestation.claims import TeeClaims
from marblekeep.attestation.dcap import Collateral, verify_quote
from marblekeep.attestation.explain import AttestationRefused, FailedCheck
from marblekeep.attestation.policy import check_report_data, package_checks
from marblekeep.errors import ConfigError
from marblekeep.manifest.gojson import go_field
from marblekeep.manifest.model import Package

__all__ = [
    "DEFAULT_ACCEPTED_TCB_STATUSES",
    "EraConfig",
    "coordinator_report_data",
    "parse_era_config",
    "verify_coordinator_quote",
]

#: MarbleRun CLI's default for ``--accepted-tcb-statuses``.
DEFAULT_ACCEPTED_TCB_STATUSES: tuple[str, ...] = ("UpToDate", "SWHardeningNeeded")
_PACKAGE_NAME = "coordinator"


@dataclass(frozen=True)
class EraConfig:
    """The identity a Coordinator enclave must have (MarbleRun's era config)."""

    unique_id: str = ""
    signer_id: str = ""
    product_id: int | None = None
    security_version: int | None = None
    debug: bool = False
    accepted_tcb_statuses: tuple[str, ...] | None = None  # None: not in the file
    accepted_advisories: tuple[str, ...] = ()

    def package(self, accepted_tcb_statuses: tuple[str, ...]) -> Package:
        return Package(
            debug=self.debug,
            unique_id=self.unique_id,
            signer_id=self.signer_id,
            product_id=self.product_id,
            security_version=self.security_version,
            accepted_tcb_statuses=accepted_tcb_statuses,
            accepted_advisories=self.accepted_advisories,
        )


def _hex32(value: Any, name: str, source: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) != 64 or any(c not in string.hexdigits for c in value):
        raise ConfigError(f"era config {source}: {name} must be 64 hex digits (a SHA-256 measurement)")
    return value.lower()


def _uint(value: Any, name: str, source: str, limit: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ConfigError(f"era config {source}: {name} must be an integer from 0 to {limit}")
    return value


def _strings(value: Any, name: str, source: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'era config {source}: {name} must be a list of strings, e.g. ["UpToDate"]')
    return tuple(value)


def parse_era_config(data: bytes, source: str) -> EraConfig:
    """Parse an era config (JSON object). It must pin the enclave: ``UniqueID`` or ``SignerID``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"era config {source}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"era config {source}: must be a JSON object")
    debug = go_field(doc, "Debug")
    if debug is not None and not isinstance(debug, bool):
        raise ConfigError(f"era config {source}: Debug must be true or false")
    era = EraConfig(
        unique_id=_hex32(go_field(doc, "UniqueID"), "UniqueID", source),
        signer_id=_hex32(go_field(doc, "SignerID"), "SignerID", source),
        product_id=_uint(go_field(doc, "ProductID"), "ProductID", source, 0xFFFF),
        security_version=_uint(go_field(doc, "SecurityVersion"), "SecurityVersion", source, 0xFFFF),
        debug=bool(debug),
        accepted_tcb_statuses=_strings(go_field(doc, "AcceptedTCBStatuses"), "AcceptedTCBStatuses", source),
        accepted_advisories=_strings(go_field(doc, "AcceptedAdvisories"), "AcceptedAdvisories", source) or (),
    )
    if not era.unique_id and not era.signer_id:
        raise ConfigError(
            f"era config {source}: sets neither UniqueID nor SignerID, so it would accept any enclave; set"
            " UniqueID (MRENCLAVE) or SignerID (MRSIGNER) with ProductID and SecurityVersion"
        )
    return era


def coordinator_report_data(root: x509.Certificate, nonce: bytes) -> bytes:
    """What the Coordinator's quote must carry in report data [0:32]: SHA-256(root DER ‖ nonce)."""
    return hashlib.sha256(root.public_bytes(serialization.Encoding.DER) + nonce).digest()


def verify_coordinator_quote(
    quote: bytes,
    root: x509.Certificate,
    nonce: bytes,
    era: EraConfig,
    accepted_tcb_statuses: tuple[str, ...],
    collateral: Collateral,
    now: dt.datetime,
) -> TeeClaims:
    """Verify the quote, its binding to ``root`` and ``nonce``, and the era config; return the claims.

    Raises :class:`AttestationError` (an ``AttestationRefused`` listing every failed check when the
    enclave's identity or TCB is not accepted) or :class:`CollateralError`.
    """
    claims = verify_quote(quote, collateral, now)
    check_report_data(claims, coordinator_report_data(root, nonce))
    package = era.package(accepted_tcb_statuses)
    if era.debug and not claims.debug:  # MarbleRun's client: Debug=true also accepts production
        package = replace(package, debug=False)
    failed = [_reworded(check) for check in package_checks(_PACKAGE_NAME, package, claims)]
    if failed:
        raise AttestationRefused(
            "the Coordinator's quote is refused: " + "; ".join(c.message for c in failed),
            checks=failed,
        )
    return claims


def _reworded(check: FailedCheck) -> FailedCheck:
    """A package check's words for an era config (``--accepted-tcb-statuses`` for the TCB list)."""

    def words(text: str) -> str:
        return (
            text.replace(f"Packages.{_PACKAGE_NAME}.AcceptedTCBStatuses", "--accepted-tcb-statuses")
            .replace(f"Packages.{_PACKAGE_NAME}.", "era config ")
            .replace(f"package {_PACKAGE_NAME}", "the era config")
            .replace("to AcceptedTCBStatuses", "to --accepted-tcb-statuses")
            .replace("not in AcceptedTCBStatuses", "not in --accepted-tcb-statuses")
        )

    return replace(check, field=words(check.field), message=words(check.message))
