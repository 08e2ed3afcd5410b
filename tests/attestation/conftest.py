"""Fixtures for the attestation tests: the DCAP vectors (copied into tests/vectors/dcap).

The quotes and collateral are real (Phala-Network/dcap-qvl's samples, MIT; see the README
beside them). Times are pinned inside each collateral's validity window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from attestation_vectors import SGX_MRENCLAVE, TDX_MRTD, VECTORS

from marblekeep.attestation.dcap import Collateral
from marblekeep.manifest.model import Package, TdxPackage


@pytest.fixture(scope="session")
def vectors() -> Path:
    return VECTORS


@pytest.fixture(scope="session")
def sgx_quote() -> bytes:
    return (VECTORS / "sgx_quote").read_bytes()


@pytest.fixture(scope="session")
def sgx_collateral() -> Collateral:
    return Collateral.from_json((VECTORS / "sgx_quote_collateral.json").read_bytes())


@pytest.fixture(scope="session")
def tdx_quote() -> bytes:
    return (VECTORS / "tdx_quote").read_bytes()


@pytest.fixture(scope="session")
def tdx_collateral() -> Collateral:
    return Collateral.from_json((VECTORS / "tdx_quote_collateral.json").read_bytes())


@pytest.fixture(scope="session")
def tdx_outdated_quote() -> bytes:
    return (VECTORS / "tdx_quote_outdated").read_bytes()


@pytest.fixture(scope="session")
def tdx_outdated_collateral() -> Collateral:
    return Collateral.from_json((VECTORS / "tdx_quote_outdated_collateral.json").read_bytes())


@pytest.fixture
def sgx_package() -> Package:
    """A package that takes sgx_quote: its MRENCLAVE, its TCB status accepted."""
    return Package(
        unique_id=SGX_MRENCLAVE,
        accepted_tcb_statuses=("SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"),
    )


@pytest.fixture
def tdx_package() -> Package:
    return Package(tdx=TdxPackage(mrtd=TDX_MRTD))
