"""The activation core's checks, one by one and in their order (reference §5.3 + the nil-UUID rule)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from core_support import (
    BACKEND_SGX,
    FRONTEND_MRENCLAVE,
    FRONTEND_SGX,
    NIL_UUID,
    NOW,
    SIMULATED,
    UUID_A,
    UUID_B,
    deploy,
    manifest_dict,
    refused,
    run,
)

from marblekeep.attestation.claims import TeeKind
from marblekeep.core.activation import ActivationInput, PreparedDeployment, activate
from marblekeep.core.deployment import CoordinatorState, Deployment, new_deployment
from marblekeep.errors import ActivationRefused, StateError


@pytest.fixture(scope="module")
def dep() -> Deployment:
    return deploy()


@pytest.fixture(scope="module")
def prepared(dep: Deployment) -> PreparedDeployment:
    return PreparedDeployment(dep)


def with_counts(dep: Deployment, **counts: int) -> PreparedDeployment:
    return PreparedDeployment(dataclasses.replace(dep, activations=dict(counts)))


# --------------------------------------------------------------------------- 1. state


def test_no_manifest_yet_is_a_state_error_not_a_refusal() -> None:
    fresh = new_deployment(["localhost"], NOW)
    assert fresh.state is CoordinatorState.ACCEPTING_MANIFEST
    with pytest.raises(StateError, match="cannot accept marbles in current state"):
        run(fresh)


def test_recovery_state_is_a_state_error(dep: Deployment) -> None:
    recovering = dataclasses.replace(dep, state=CoordinatorState.RECOVERY)
    with pytest.raises(StateError, match="cannot accept marbles"):
        run(recovering)


def test_state_is_checked_before_the_marble_type() -> None:
    fresh = new_deployment(["localhost"], NOW)
    with pytest.raises(StateError):
        run(fresh, "no-such-type", NIL_UUID, claims=BACKEND_SGX, simulation=False)


# --------------------------------------------------------------------------- 2. type and package


def test_unknown_marble_type_is_refused_and_lists_the_known_types(prepared: PreparedDeployment) -> None:
    exc = refused(prepared, "backnd")
    assert exc.reason == "unknown_type"
    assert "unknown marble type 'backnd'" in exc.message
    assert "backend" in exc.message and "frontend" in exc.message
    assert exc.message.startswith("marble verification failed")


def test_unknown_type_comes_before_evidence(prepared: PreparedDeployment) -> None:
    # Simulation evidence to a non-simulation Coordinator would be refused too, but later.
    exc = refused(prepared, "nope", claims=SIMULATED, simulation=False)
    assert exc.reason == "unknown_type"


def test_undefined_package_is_refused(dep: Deployment) -> None:
    # A valid manifest cannot say this; a damaged state could. Build it by hand.
    assert dep.manifest is not None
    packages = {k: v for k, v in dep.manifest.packages.items() if k != "frontend"}
    broken = dataclasses.replace(dep, manifest=dataclasses.replace(dep.manifest, packages=packages))
    exc = refused(broken, "frontend")
    assert exc.reason == "undefined_package"
    assert "undefined package 'frontend'" in exc.message
    # ... and the other Marbles still start.
    run(broken, "backend")


# --------------------------------------------------------------------------- 3. evidence


def test_simulation_evidence_is_refused_outside_simulation_mode(prepared: PreparedDeployment) -> None:
    exc = refused(prepared, claims=SIMULATED, simulation=False)
    assert exc.reason == "attestation"
    assert "simulation evidence" in exc.message
    assert "not in simulation mode" in exc.message


def test_simulation_evidence_is_accepted_in_simulation_mode(prepared: PreparedDeployment) -> None:
    result = run(prepared, claims=SIMULATED, simulation=True)
    assert result.env["SEAL_KEY"]


def test_matching_sgx_claims_are_accepted_outside_simulation(prepared: PreparedDeployment) -> None:
    run(prepared, "backend", claims=BACKEND_SGX, simulation=False)
    run(prepared, "frontend", claims=FRONTEND_SGX, simulation=False)


def test_wrong_mrenclave_is_refused_with_the_policy_explanation(prepared: PreparedDeployment) -> None:
    wrong = dataclasses.replace(FRONTEND_SGX, mrenclave="33" * 32)
    exc = refused(prepared, "frontend", claims=wrong, simulation=False)
    assert exc.reason == "attestation"
    assert exc.message.startswith("marble verification failed: ")
    # The attestation explanation passes through: which check, expected and actual (abbreviated).
    assert "MRENCLAVE" in exc.message
    assert "3333…3333" in exc.message
    assert f"{FRONTEND_MRENCLAVE[:4]}…{FRONTEND_MRENCLAVE[-4:]}" in exc.message
    assert "frontend" in exc.message
    assert [p.path for p in exc.problems] == ["Packages.frontend.UniqueID"]


def test_every_failing_sgx_check_is_reported_at_once(prepared: PreparedDeployment) -> None:
    bad = dataclasses.replace(
        BACKEND_SGX, mrsigner="01" * 32, isv_prod_id=4, isv_svn=1, debug=True, tcb_status="OutOfDate"
    )
    exc = refused(prepared, "backend", claims=bad, simulation=False)
    assert exc.reason == "attestation"
    paths = {p.path for p in exc.problems}
    assert {
        "Packages.backend.SignerID",
        "Packages.backend.ProductID",
        "Packages.backend.SecurityVersion",
        "Packages.backend.Debug",
        "Packages.backend.AcceptedTCBStatuses",
    } <= paths
    assert "OutOfDate" in exc.message


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"isv_svn": 1}, "Packages.backend.SecurityVersion"),
        ({"isv_prod_id": 9}, "Packages.backend.ProductID"),
        ({"debug": True}, "Packages.backend.Debug"),
        ({"mrsigner": "cd" * 32}, "Packages.backend.SignerID"),
    ],
)
def test_each_sgx_identity_check_refuses(
    prepared: PreparedDeployment, change: dict[str, Any], path: str
) -> None:
    exc = refused(prepared, "backend", claims=dataclasses.replace(BACKEND_SGX, **change), simulation=False)
    assert exc.reason == "attestation"
    assert [p.path for p in exc.problems] == [path]


def test_a_higher_svn_is_accepted(prepared: PreparedDeployment) -> None:
    run(prepared, "backend", claims=dataclasses.replace(BACKEND_SGX, isv_svn=9), simulation=False)


def test_tdx_claims_never_satisfy_an_sgx_package(prepared: PreparedDeployment) -> None:
    tdx = dataclasses.replace(BACKEND_SGX, kind=TeeKind.TDX, mrtd="11" * 48)
    exc = refused(prepared, "backend", claims=tdx, simulation=False)
    assert exc.reason == "attestation"
    assert "TDX" in exc.message


def test_simulation_mode_skips_the_measurement_checks(prepared: PreparedDeployment) -> None:
    # As MarbleRun: a simulation Coordinator skips the package's measurement checks ...
    wrong = dataclasses.replace(FRONTEND_SGX, mrenclave="33" * 32, debug=True)
    run(prepared, "frontend", claims=wrong, simulation=True)


def test_simulation_mode_still_enforces_type_budget_and_uuid(dep: Deployment) -> None:
    # ... but everything else still applies.
    assert refused(dep, "nope", simulation=True).reason == "unknown_type"
    assert refused(with_counts(dep, limited=2), "limited", simulation=True).reason == "max_activations"
    assert refused(dep, "backend", NIL_UUID, simulation=True).reason == "invalid_uuid"


def test_evidence_is_checked_before_max_activations(dep: Deployment) -> None:
    exhausted = with_counts(dep, limited=2)
    wrong = dataclasses.replace(BACKEND_SGX, isv_svn=0)
    assert refused(exhausted, "limited", claims=wrong, simulation=False).reason == "attestation"


# --------------------------------------------------------------------------- 4. MaxActivations


def test_max_activations_counts_up_and_then_refuses(dep: Deployment) -> None:
    current = dep
    counts: list[int | None] = []
    for i in range(2):
        result = run(current, "limited", UUID_A if i == 0 else UUID_B)
        counts.append(result.new_activation_count)
        assert result.new_activation_count is not None
        current = dataclasses.replace(
            current, activations={**current.activations, "limited": result.new_activation_count}
        )
    assert counts == [1, 2]
    exc = refused(current, "limited", UUID_A)
    assert exc.reason == "max_activations"
    assert "reached max activations count (2)" in exc.message
    assert "'limited'" in exc.message
    assert "Marbles.limited.MaxActivations" in exc.message  # names the field to fix


def test_refusal_does_not_change_the_count(dep: Deployment) -> None:
    prepared = with_counts(dep, limited=2)
    refused(prepared, "limited")
    assert prepared.deployment.activations == {"limited": 2}


def test_counts_are_per_marble_type(dep: Deployment) -> None:
    prepared = with_counts(dep, limited=2, backend=500)
    assert run(prepared, "backend").new_activation_count is None  # unlimited: nothing to persist
    refused(prepared, "limited")


def test_unlimited_marbles_need_no_state_write(prepared: PreparedDeployment) -> None:
    for _ in range(3):
        assert run(prepared, "backend").new_activation_count is None


def test_a_failed_render_does_not_count_as_an_activation(dep: Deployment) -> None:
    manifest = manifest_dict()
    manifest["Marbles"]["limited"]["Parameters"]["Env"]["TOKEN"] = "{{ string .Secrets.api_token }}"
    exc = refused(deploy(manifest), "limited")
    assert exc.reason == "parameters"  # the caller persists new_activation_count only on success


def test_max_activations_comes_before_the_uuid_check(dep: Deployment) -> None:
    # MarbleRun parses the UUID after the activation-budget check.
    exc = refused(with_counts(dep, limited=2), "limited", NIL_UUID)
    assert exc.reason == "max_activations"


# --------------------------------------------------------------------------- 5. nil UUID


def test_the_nil_uuid_is_refused(prepared: PreparedDeployment) -> None:
    exc = refused(prepared, "backend", NIL_UUID)
    assert exc.reason == "invalid_uuid"
    assert "nil UUID" in exc.message
    assert "random (v4) UUID" in exc.message


def test_the_nil_uuid_does_not_burn_an_activation(dep: Deployment) -> None:
    exc = refused(with_counts(dep, limited=1), "limited", NIL_UUID)
    assert exc.reason == "invalid_uuid"


# --------------------------------------------------------------------------- input shapes


def test_activate_takes_an_explicit_clock_and_rng(prepared: PreparedDeployment) -> None:
    calls: list[int] = []

    def rng(n: int) -> bytes:
        calls.append(n)
        return bytes(range(n))

    inp = ActivationInput("backend", UUID_A, ("backend.internal",), SIMULATED)
    result = activate(prepared, inp, NOW, simulation=True, rng=rng)
    assert result.files["/etc/static.conf"] == b"listen = 8443\n"
    assert calls, "activation draws its randomness (serials) from the injected rng"


def test_a_bad_dns_name_is_a_refusal_naming_it(prepared: PreparedDeployment) -> None:
    with pytest.raises(ActivationRefused) as info:
        run(prepared, dns_names=("bad name with spaces",))
    assert info.value.reason == "parameters"
    assert "issuing credentials" in info.value.message
