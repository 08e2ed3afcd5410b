"""Package policy on real verified quotes: the issue's Done-when list, one refusal per cause.

Each refusal must name the check, the expected and the actual value; several failing
checks come back together in one error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from attestation_vectors import SGX_AT, SGX_MRENCLAVE, SGX_MRSIGNER, TDX_MRTD, TDX_OUTDATED_AT

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.dcap import Collateral, verify_quote
from marblekeep.attestation.explain import AttestationRefused, abbreviate, rfc3339
from marblekeep.attestation.policy import check_package, check_report_data, package_checks
from marblekeep.errors import AttestationError, CollateralError
from marblekeep.manifest.model import Package, TdxPackage

OTHER_HEX = "6b28" + "00" * 28 + "a1c0"  # 32 bytes


@pytest.fixture(scope="module")
def sgx_claims(sgx_quote: bytes, sgx_collateral: Collateral) -> TeeClaims:
    return verify_quote(sgx_quote, sgx_collateral, SGX_AT)


@pytest.fixture(scope="module")
def tdx_claims(tdx_quote: bytes, tdx_collateral: Collateral) -> TeeClaims:
    return verify_quote(tdx_quote, tdx_collateral, dt.datetime(2025, 6, 25, tzinfo=dt.UTC))


def refusal(package: Package, claims: TeeClaims, name: str = "backend") -> AttestationRefused:
    with pytest.raises(AttestationRefused) as info:
        check_package(name, package, claims)
    return info.value


# --------------------------------------------------------------------------- the verified facts


def test_sgx_quote_verifies_with_status_and_advisories(sgx_claims: TeeClaims) -> None:
    assert sgx_claims.kind is TeeKind.SGX
    assert sgx_claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert sgx_claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert sgx_claims.mrenclave == SGX_MRENCLAVE
    assert sgx_claims.mrsigner == SGX_MRSIGNER
    assert (sgx_claims.isv_prod_id, sgx_claims.isv_svn, sgx_claims.debug) == (0, 0, False)
    assert sgx_claims.report_data == b"Hello, world!".ljust(64, b"\0")


def test_package_with_its_mrenclave_and_status_accepted_takes_it(
    sgx_package: Package, sgx_claims: TeeClaims
) -> None:
    check_package("backend", sgx_package, sgx_claims)
    assert package_checks("backend", sgx_package, sgx_claims) == []


def test_signer_product_and_version_also_take_it(sgx_claims: TeeClaims) -> None:
    package = Package(
        signer_id=SGX_MRSIGNER.upper(),  # case-insensitive, as MarbleRun
        product_id=0,
        security_version=0,
        accepted_tcb_statuses=("ConfigurationAndSWHardeningNeeded",),
        accepted_advisories=("intel-sa-00289", "INTEL-SA-00615"),  # case-insensitive
    )
    check_package("backend", package, sgx_claims)


# --------------------------------------------------------------------------- each refusal


def test_another_mrenclave(sgx_package: Package, sgx_claims: TeeClaims) -> None:
    error = refusal(dataclasses.replace(sgx_package, unique_id=OTHER_HEX), sgx_claims)
    assert "MRENCLAVE 33d8…2fbb does not match package backend UniqueID 6b28…a1c0" in error.message
    (check,) = error.checks
    assert (check.check, check.field) == ("MRENCLAVE", "Packages.backend.UniqueID")
    assert (check.expected, check.actual) == (OTHER_HEX, SGX_MRENCLAVE)
    assert error.problems[0].path == "Packages.backend.UniqueID"
    assert error.details["claims"]["mrenclave"] == SGX_MRENCLAVE  # type: ignore[index]
    assert error.code == "attestation_refused" and error.http_status == 403


def test_another_mrsigner(sgx_claims: TeeClaims) -> None:
    package = Package(
        signer_id=OTHER_HEX,
        product_id=0,
        security_version=0,
        accepted_tcb_statuses=("ConfigurationAndSWHardeningNeeded",),
    )
    error = refusal(package, sgx_claims)
    assert "MRSIGNER 815f…e0e6 does not match package backend SignerID 6b28…a1c0" in error.message
    assert [c.check for c in error.checks] == ["MRSIGNER"]


def test_security_version_1(sgx_package: Package, sgx_claims: TeeClaims) -> None:
    error = refusal(dataclasses.replace(sgx_package, security_version=1), sgx_claims)
    assert "ISVSVN 0 is below package backend SecurityVersion 1" in error.message
    (check,) = error.checks
    assert (check.field, check.expected, check.actual) == ("Packages.backend.SecurityVersion", ">= 1", "0")


def test_product_id_mismatch(sgx_package: Package, sgx_claims: TeeClaims) -> None:
    error = refusal(dataclasses.replace(sgx_package, product_id=3), sgx_claims)
    assert "ISVPRODID 0 does not match package backend ProductID 3" in error.message


def test_debug_true_refuses_a_production_enclave(sgx_package: Package, sgx_claims: TeeClaims) -> None:
    error = refusal(dataclasses.replace(sgx_package, debug=True), sgx_claims)
    (check,) = error.checks
    assert check.check == "Debug" and (check.expected, check.actual) == ("true", "false")
    assert "production enclave but package backend sets Debug: true" in error.message


def test_default_accepted_statuses_refuse_it(sgx_claims: TeeClaims) -> None:
    error = refusal(Package(unique_id=SGX_MRENCLAVE), sgx_claims)
    assert (
        "TCB status ConfigurationAndSWHardeningNeeded is not in AcceptedTCBStatuses"
        " [UpToDate, SWHardeningNeeded] (the default)" in error.message
    )
    (check,) = error.checks
    assert check.field == "Packages.backend.AcceptedTCBStatuses"
    assert check.actual == "ConfigurationAndSWHardeningNeeded"


def test_explicit_status_list_message_has_no_default_hint(sgx_claims: TeeClaims) -> None:
    package = Package(unique_id=SGX_MRENCLAVE, accepted_tcb_statuses=("SWHardeningNeeded",))
    error = refusal(package, sgx_claims)
    assert (
        "TCB status ConfigurationAndSWHardeningNeeded is not in AcceptedTCBStatuses"
        " [UpToDate, SWHardeningNeeded]" in error.message
    )
    assert "default" not in error.message


def test_advisory_list_without_intel_sa_00615(sgx_package: Package, sgx_claims: TeeClaims) -> None:
    package = dataclasses.replace(sgx_package, accepted_advisories=("INTEL-SA-00289",))
    error = refusal(package, sgx_claims)
    assert (
        "advisory INTEL-SA-00615 of TCB status ConfigurationAndSWHardeningNeeded is not in" in error.message
    )
    assert "AcceptedAdvisories [INTEL-SA-00289]" in error.message
    (check,) = error.checks
    assert check.actual == "[INTEL-SA-00289, INTEL-SA-00615]"


def test_time_after_collateral_expiry(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    expiry = dt.datetime(2025, 7, 19, 10, 1, 18, tzinfo=dt.UTC)
    verify_quote(sgx_quote, sgx_collateral, expiry)  # the last valid second
    with pytest.raises(CollateralError) as info:
        verify_quote(sgx_quote, sgx_collateral, expiry + dt.timedelta(seconds=1))
    assert info.value.message.startswith("collateral expired 2025-07-19T10:01:18Z")
    assert "QE identity" in info.value.message


def test_all_failing_checks_come_back_together(sgx_claims: TeeClaims) -> None:
    package = Package(
        debug=True,
        unique_id=OTHER_HEX,
        signer_id=OTHER_HEX,
        product_id=7,
        security_version=2,
        accepted_advisories=("INTEL-SA-00289",),
    )
    error = refusal(package, sgx_claims)
    assert [c.check for c in error.checks] == [
        "TCBStatus",
        "Advisories",
        "Debug",
        "MRENCLAVE",
        "MRSIGNER",
        "ISVPRODID",
        "ISVSVN",
    ]
    assert len(error.problems) == 7
    assert error.diagnostics().count("\n") == 7  # message + one line per problem
    assert len(error.details["checks"]) == 7  # type: ignore[arg-type]


def test_up_to_date_is_always_accepted_and_ignores_advisories() -> None:
    claims = TeeClaims(kind=TeeKind.SGX, tcb_status="UpToDate", mrenclave=SGX_MRENCLAVE)
    check_package("p", Package(unique_id=SGX_MRENCLAVE, accepted_tcb_statuses=("OutOfDate",)), claims)
    check_package("p", Package(unique_id=SGX_MRENCLAVE, accepted_advisories=("X",)), claims)


def test_sw_hardening_needed_accepted_by_default() -> None:
    claims = TeeClaims(kind=TeeKind.SGX, tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00334",))
    check_package("p", Package(), claims)
    # safer than MarbleRun: advisories are enforced for every non-UpToDate status
    other = dataclasses.replace(claims, tcb_status="OutOfDate")
    error = refusal(Package(accepted_tcb_statuses=("OutOfDate",), accepted_advisories=("Y",)), other, "p")
    assert [c.check for c in error.checks] == ["Advisories"]


def test_revoked_is_never_accepted() -> None:
    claims = TeeClaims(kind=TeeKind.SGX, tcb_status="Revoked")
    error = refusal(Package(accepted_tcb_statuses=("Revoked",)), claims, "p")
    assert "TCB status Revoked is never accepted" in error.message


def test_simulation_evidence_never_satisfies_a_package() -> None:
    error = refusal(Package(), TeeClaims(kind=TeeKind.SIMULATION), "p")
    assert [c.check for c in error.checks] == ["TEE"]
    assert "simulation evidence" in error.message


# --------------------------------------------------------------------------- TDX


def test_tdx_quote_accepted_by_tdx_package_with_its_mrtd(tdx_package: Package, tdx_claims: TeeClaims) -> None:
    assert tdx_claims.kind is TeeKind.TDX and tdx_claims.tcb_status == "UpToDate"
    assert tdx_claims.mrtd == TDX_MRTD and not tdx_claims.debug
    check_package("td", tdx_package, tdx_claims)
    # pinning every RTMR and MRSEAM too
    full = TdxPackage(
        mrtd=TDX_MRTD.upper(),
        rtmr0=tdx_claims.rtmrs[0],
        rtmr1=tdx_claims.rtmrs[1],
        rtmr2=tdx_claims.rtmrs[2],
        rtmr3=tdx_claims.rtmrs[3],
        mrseam=tdx_claims.mrseam,
    )
    check_package("td", Package(tdx=full), tdx_claims)


def test_tdx_quote_refused_by_sgx_package(sgx_package: Package, tdx_claims: TeeClaims) -> None:
    error = refusal(sgx_package, tdx_claims)
    assert [c.check for c in error.checks] == ["TEE"]
    assert "package backend describes an SGX enclave but the quote is a TDX quote" in error.message


def test_sgx_quote_refused_by_tdx_package(tdx_package: Package, sgx_claims: TeeClaims) -> None:
    error = refusal(tdx_package, sgx_claims, "td")
    assert "package td describes a TDX guest (Packages.td.TDX) but the quote is an SGX" in error.message


def test_tdx_measurement_mismatches_are_explained(tdx_claims: TeeClaims) -> None:
    wrong = "ab" * 48
    package = Package(tdx=TdxPackage(mrtd=wrong, rtmr2=wrong), debug=True)
    error = refusal(package, tdx_claims, "td")
    assert [c.check for c in error.checks] == ["Debug", "MRTD", "RTMR2"]
    assert f"MRTD 91eb…18b7 does not match package td TDX.MRTD {abbreviate(wrong)}" in error.message
    assert error.checks[2].field == "Packages.td.TDX.RTMR2"
    assert error.checks[2].actual == tdx_claims.rtmrs[2]


def test_tdx_package_without_mrtd_or_with_sgx_fields_is_refused(tdx_claims: TeeClaims) -> None:
    error = refusal(Package(tdx=TdxPackage(), unique_id=SGX_MRENCLAVE), tdx_claims, "td")
    assert {c.field for c in error.checks} == {"Packages.td.UniqueID", "Packages.td.TDX.MRTD"}


def test_tdx_quote_outdated_is_refused_with_a_clear_reason(
    tdx_outdated_quote: bytes, tdx_outdated_collateral: Collateral
) -> None:
    with pytest.raises(AttestationError) as info:
        verify_quote(tdx_outdated_quote, tdx_outdated_collateral, TDX_OUTDATED_AT)
    message = info.value.message
    assert "No matching TCB level found" in message
    assert "tdx/90C06F000000/platform" in message and "update its firmware" in message


# --------------------------------------------------------------------------- report data


def test_report_data_binding(sgx_claims: TeeClaims) -> None:
    check_report_data(sgx_claims, b"Hello, world!")
    check_report_data(sgx_claims, b"Hello, world!".ljust(64, b"\0"))
    with pytest.raises(AttestationRefused) as info:
        check_report_data(sgx_claims, b"Hello, World!")
    assert "does not match the activation binding" in info.value.message
    (check,) = info.value.checks
    assert check.actual == b"Hello, world!".hex() and check.expected == b"Hello, World!".hex()
    with pytest.raises(AttestationError):
        check_report_data(sgx_claims, b"")
    with pytest.raises(AttestationError):
        check_report_data(sgx_claims, bytes(65))


def test_helpers() -> None:
    assert abbreviate(SGX_MRENCLAVE) == "33d8…2fbb"
    assert abbreviate("abcd") == "abcd"
    assert rfc3339(dt.datetime(2025, 7, 19, 12, 1, 18, tzinfo=dt.timezone(dt.timedelta(hours=2)))) == (
        "2025-07-19T10:01:18Z"
    )
