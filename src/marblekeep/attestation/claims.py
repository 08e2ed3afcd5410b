"""What verified evidence says about a TEE: the input of every package policy check.

A :class:`TeeClaims` only exists after the evidence (quote, or simulation evidence)
verified; its fields are then facts. Measurements are lower-case hex strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["TCB_STATUSES", "TeeClaims", "TeeKind"]

#: The TCB statuses verified evidence can have (Intel's spelling, as MarbleRun compares them).
TCB_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


class TeeKind(enum.Enum):
    SIMULATION = "simulation"  # no TEE at all: accepted only by a Coordinator in simulation mode
    SGX = "sgx"
    TDX = "tdx"


@dataclass(frozen=True)
class TeeClaims:
    kind: TeeKind
    report_data: bytes = b""  # 64 bytes for SGX/TDX
    tcb_status: str = ""  # e.g. "UpToDate", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"
    advisory_ids: tuple[str, ...] = ()
    debug: bool = False
    # SGX enclave report
    mrenclave: str = ""
    mrsigner: str = ""
    isv_prod_id: int = 0
    isv_svn: int = 0
    # TDX TD report
    mrtd: str = ""
    rtmrs: tuple[str, ...] = field(default_factory=tuple)  # RTMR0..RTMR3
    mrseam: str = ""
