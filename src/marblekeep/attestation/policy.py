"""Package policy: does this verified TEE match a manifest ``Packages.<name>`` entry?

Pure module: no I/O, no clock. Inputs are facts (:class:`TeeClaims` from verified evidence)
and the manifest's :class:`Package`; the output is nothing, or one
:class:`~marblekeep.attestation.explain.AttestationRefused` that lists *every* failing
check with its expected and actual value.

Rules (MarbleRun's, made safer where noted; see docs/attestation.md):

SGX packages
  * TCB status: ``UpToDate`` is always accepted; another status only if it is in
    ``AcceptedTCBStatuses`` (default ``[SWHardeningNeeded]``); ``Revoked`` never.
  * ``AcceptedAdvisories``: when non-empty, every advisory of a non-UpToDate quote must be in
    it (case-insensitive). MarbleRun checks this only for ``SWHardeningNeeded``.
  * ``Debug`` must *equal* the enclave's DEBUG attribute.
  * ``UniqueID`` (MRENCLAVE) and ``SignerID`` (MRSIGNER) equal, case-insensitively, if set;
    ``ProductID`` equal if set; ISVSVN >= ``SecurityVersion`` if set.
TDX packages (``Packages.<name>.TDX``, a marblekeep extension)
  * ``TDX.MRTD`` is required unless the package is a Debug package; MRTD and every given
    RTMR0..3 / MRSEAM must be equal (case-insensitive hex).
  * ``Debug`` must equal the TD attribute DEBUG (bit 0); TCB status and advisories as above.
  * SGX identity fields (UniqueID, SignerID, ProductID, SecurityVersion) do not apply to a
    TD and are refused rather than silently ignored.
Evidence of one TEE kind never satisfies a package of the other.
"""

from __future__ import annotations

import hmac

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.explain import AttestationRefused, FailedCheck, abbreviate
from marblekeep.errors import AttestationError
from marblekeep.manifest.model import Package

__all__ = ["UP_TO_DATE", "check_package", "check_report_data", "package_checks"]

UP_TO_DATE = "UpToDate"
_NEVER_ACCEPTED = ("Revoked",)


def _list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(values) + "]"


def _tcb_checks(name: str, package: Package, claims: TeeClaims) -> list[FailedCheck]:
    failed: list[FailedCheck] = []
    status = claims.tcb_status
    accepted = (UP_TO_DATE, *package.effective_tcb_statuses)
    shown = _list(accepted) + (" (the default)" if not package.accepted_tcb_statuses else "")
    field = f"Packages.{name}.AcceptedTCBStatuses"
    if status in _NEVER_ACCEPTED:
        failed.append(
            FailedCheck(
                "TCBStatus",
                field,
                _list(accepted),
                status,
                f"TCB status {status} is never accepted: the platform's keys or TCB level are revoked"
                " by Intel",
            )
        )
    elif status != UP_TO_DATE and status.lower() not in {s.lower() for s in package.effective_tcb_statuses}:
        hint = ""
        if not package.accepted_tcb_statuses:
            hint = f"; to accept it, add {status} to AcceptedTCBStatuses"
        failed.append(
            FailedCheck(
                "TCBStatus",
                field,
                _list(accepted),
                status or "(none)",
                f"TCB status {status or '(none)'} is not in AcceptedTCBStatuses {shown}{hint}",
            )
        )
    if status != UP_TO_DATE and package.accepted_advisories:
        allowed = {a.lower() for a in package.accepted_advisories}
        missing = tuple(a for a in claims.advisory_ids if a.lower() not in allowed)
        if missing:
            noun = "advisory" if len(missing) == 1 else "advisories"
            failed.append(
                FailedCheck(
                    "Advisories",
                    f"Packages.{name}.AcceptedAdvisories",
                    _list(package.accepted_advisories),
                    _list(claims.advisory_ids),
                    f"{noun} {', '.join(missing)} of TCB status {status} "
                    f"{'is' if len(missing) == 1 else 'are'} not in AcceptedAdvisories"
                    f" {_list(package.accepted_advisories)}",
                )
            )
    return failed


def _debug_checks(
    name: str, package: Package, claims: TeeClaims, *, unit: str, flag: str, attribute: str
) -> list[FailedCheck]:
    """``Debug`` must equal the TEE's debug flag. ``unit``: enclave or TD; ``flag``: how the flag
    is called when set; ``attribute``: the flag in the explanation."""
    if package.debug == claims.debug:
        return []
    actual = f"a debug {unit} ({flag})" if claims.debug else f"a production {unit}"
    return [
        FailedCheck(
            "Debug",
            f"Packages.{name}.Debug",
            str(package.debug).lower(),
            str(claims.debug).lower(),
            f"the quote is from {actual} but package {name} sets Debug: {str(package.debug).lower()}"
            f" (Debug must equal {attribute})",
        )
    ]


def _hex_equal(expected: str, actual: str) -> bool:
    return expected.strip().lower() == actual.lower()


def _sgx_checks(name: str, package: Package, claims: TeeClaims) -> list[FailedCheck]:
    failed = _tcb_checks(name, package, claims)
    failed += _debug_checks(
        name,
        package,
        claims,
        unit="enclave",
        flag="DEBUG attribute set",
        attribute="the enclave's DEBUG attribute",
    )
    if package.unique_id and not _hex_equal(package.unique_id, claims.mrenclave):
        failed.append(
            FailedCheck(
                "MRENCLAVE",
                f"Packages.{name}.UniqueID",
                package.unique_id.lower(),
                claims.mrenclave,
                f"MRENCLAVE {abbreviate(claims.mrenclave)} does not match package {name} UniqueID"
                f" {abbreviate(package.unique_id.strip().lower())}",
            )
        )
    if package.signer_id and not _hex_equal(package.signer_id, claims.mrsigner):
        failed.append(
            FailedCheck(
                "MRSIGNER",
                f"Packages.{name}.SignerID",
                package.signer_id.lower(),
                claims.mrsigner,
                f"MRSIGNER {abbreviate(claims.mrsigner)} does not match package {name} SignerID"
                f" {abbreviate(package.signer_id.strip().lower())}",
            )
        )
    if package.product_id is not None and package.product_id != claims.isv_prod_id:
        failed.append(
            FailedCheck(
                "ISVPRODID",
                f"Packages.{name}.ProductID",
                str(package.product_id),
                str(claims.isv_prod_id),
                f"ISVPRODID {claims.isv_prod_id} does not match package {name} ProductID"
                f" {package.product_id}",
            )
        )
    if package.security_version is not None and claims.isv_svn < package.security_version:
        failed.append(
            FailedCheck(
                "ISVSVN",
                f"Packages.{name}.SecurityVersion",
                f">= {package.security_version}",
                str(claims.isv_svn),
                f"ISVSVN {claims.isv_svn} is below package {name} SecurityVersion {package.security_version}",
            )
        )
    return failed


def _tdx_checks(name: str, package: Package, claims: TeeClaims) -> list[FailedCheck]:
    assert package.tdx is not None
    tdx = package.tdx
    failed = _tcb_checks(name, package, claims)
    failed += _debug_checks(
        name, package, claims, unit="TD", flag="TD attribute DEBUG set", attribute="the TD attribute DEBUG"
    )
    for field_name, set_value in (
        ("UniqueID", package.unique_id),
        ("SignerID", package.signer_id),
        ("ProductID", package.product_id),
        ("SecurityVersion", package.security_version),
    ):
        if set_value not in (None, ""):
            failed.append(
                FailedCheck(
                    "PackageKind",
                    f"Packages.{name}.{field_name}",
                    "(unset for a TDX package)",
                    str(set_value),
                    f"package {name} is a TDX package but sets the SGX field {field_name}, which a TD"
                    " cannot satisfy: remove it and pin the TD with TDX.MRTD / RTMR0..3",
                )
            )
    if tdx.mrtd is None and not package.debug:
        failed.append(
            FailedCheck(
                "MRTD",
                f"Packages.{name}.TDX.MRTD",
                "(a 96-hex-digit MRTD)",
                claims.mrtd,
                f"package {name} sets no TDX.MRTD, so it would accept any TD: set it to the TD's MRTD"
                f" ({abbreviate(claims.mrtd)} for this quote, if this is the TD you expect)",
            )
        )
    measured: list[tuple[str, str | None, str]] = [
        ("MRTD", tdx.mrtd, claims.mrtd),
        ("MRSEAM", tdx.mrseam, claims.mrseam),
    ]
    rtmrs = (*claims.rtmrs, "", "", "", "")[:4]
    for index, expected in enumerate((tdx.rtmr0, tdx.rtmr1, tdx.rtmr2, tdx.rtmr3)):
        measured.append((f"RTMR{index}", expected, rtmrs[index]))
    for label, expected, actual in measured:
        if expected is not None and not _hex_equal(expected, actual):
            failed.append(
                FailedCheck(
                    label,
                    f"Packages.{name}.TDX.{label}",
                    expected.strip().lower(),
                    actual,
                    f"{label} {abbreviate(actual)} does not match package {name} TDX.{label}"
                    f" {abbreviate(expected.strip().lower())}",
                )
            )
    return failed


def package_checks(package_name: str, package: Package, claims: TeeClaims) -> list[FailedCheck]:
    """Every check of ``package`` that ``claims`` fails (empty: accepted)."""
    wants_tdx = package.tdx is not None
    if claims.kind is TeeKind.SIMULATION:
        return [
            FailedCheck(
                "TEE",
                f"Packages.{package_name}",
                "TDX quote" if wants_tdx else "SGX quote",
                "simulation evidence",
                f"simulation evidence cannot satisfy package {package_name}: only a Coordinator"
                " started in simulation mode skips quote checks",
            )
        ]
    if wants_tdx and claims.kind is not TeeKind.TDX:
        return [
            FailedCheck(
                "TEE",
                f"Packages.{package_name}.TDX",
                "TDX quote",
                f"{claims.kind.value.upper()} quote",
                f"package {package_name} describes a TDX guest (Packages.{package_name}.TDX) but the quote"
                f" is an {claims.kind.value.upper()} enclave quote",
            )
        ]
    if not wants_tdx and claims.kind is not TeeKind.SGX:
        return [
            FailedCheck(
                "TEE",
                f"Packages.{package_name}",
                "SGX quote",
                f"{claims.kind.value.upper()} quote",
                f"package {package_name} describes an SGX enclave but the quote is a"
                f" {claims.kind.value.upper()} quote (a TDX package needs Packages.{package_name}.TDX)",
            )
        ]
    if wants_tdx:
        return _tdx_checks(package_name, package, claims)
    return _sgx_checks(package_name, package, claims)


def _claims_details(claims: TeeClaims) -> dict[str, object]:
    details: dict[str, object] = {
        "tee": claims.kind.value,
        "tcb_status": claims.tcb_status,
        "advisory_ids": list(claims.advisory_ids),
        "debug": claims.debug,
    }
    if claims.kind is TeeKind.SGX:
        details.update(
            mrenclave=claims.mrenclave,
            mrsigner=claims.mrsigner,
            isv_prod_id=claims.isv_prod_id,
            isv_svn=claims.isv_svn,
        )
    elif claims.kind is TeeKind.TDX:
        details.update(mrtd=claims.mrtd, rtmrs=list(claims.rtmrs), mrseam=claims.mrseam)
    return details


def check_package(package_name: str, package: Package, claims: TeeClaims) -> None:
    """Accept ``claims`` for ``package`` or raise one :class:`AttestationRefused` listing all failures."""
    failed = package_checks(package_name, package, claims)
    if failed:
        raise AttestationRefused(
            f"quote refused by package {package_name}: " + "; ".join(c.message for c in failed),
            checks=failed,
            details={"package": package_name, "claims": _claims_details(claims)},
        )


def check_report_data(claims: TeeClaims, expected_prefix: bytes) -> None:
    """The quote's report data must start with ``expected_prefix`` (the activation binding)."""
    if not 1 <= len(expected_prefix) <= 64:
        raise AttestationError(
            f"report data binding: expected prefix of {len(expected_prefix)} bytes; it must be 1..64 bytes"
        )
    actual = claims.report_data[: len(expected_prefix)]
    if not hmac.compare_digest(actual, expected_prefix):
        expected_hex, actual_hex = expected_prefix.hex(), actual.hex()
        check = FailedCheck(
            "ReportData",
            "report_data",
            expected_hex,
            actual_hex,
            f"report data {abbreviate(actual_hex or '(empty)')} does not match the activation binding"
            f" {abbreviate(expected_hex)} (first {len(expected_prefix)} bytes): the quote was made for"
            " another request (replayed or relayed), or the Marble computed the binding differently",
        )
        raise AttestationRefused(f"quote refused: {check.message}", checks=[check])
