"""The Coordinator's evidence verifier: DCAP quotes checked with collateral, off the event loop.

Glue between the Marble API and :mod:`marblekeep.attestation`: the evidence type the Marble
declared must match the quote's own TEE type, collateral comes from the cache (PCCS or a
directory, refreshed in the background, never expired), and the signature/TCB verification runs in
the :class:`~marblekeep.attestation.dcap.QuoteVerifierPool` so both cores serve it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.collateral import (
    CollateralCache,
    CollateralSource,
    DirectoryCollateralSource,
    PccsCollateralSource,
)
from marblekeep.attestation.dcap import QuoteVerifierPool
from marblekeep.attestation.evidence import parse_header, strip_oe_header
from marblekeep.errors import AttestationError, ConfigError
from marblekeep.marble.protocol import EvidenceType

__all__ = ["DcapEvidenceVerifier", "collateral_source"]

_EXPECTED_KIND = {EvidenceType.SGX_DCAP.value: TeeKind.SGX, EvidenceType.TDX.value: TeeKind.TDX}


def collateral_source(pccs_url: str | None, collateral_dir: Path | None) -> CollateralSource | None:
    if pccs_url and collateral_dir:
        raise ConfigError("give either --pccs-url or --collateral-dir, not both")
    if pccs_url:
        return PccsCollateralSource(pccs_url)
    if collateral_dir:
        return DirectoryCollateralSource(collateral_dir)
    return None


class DcapEvidenceVerifier:
    def __init__(
        self,
        source: CollateralSource,
        *,
        clock: Callable[[], dt.datetime],
        workers: int | None = None,
    ) -> None:
        self.cache = CollateralCache(source, clock=clock)
        self.pool = QuoteVerifierPool(workers)

    def start(self) -> None:
        self.pool.start()
        self.cache.start()

    async def aclose(self) -> None:
        await self.cache.aclose()
        self.pool.close()

    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims:
        expected = _EXPECTED_KIND.get(evidence_type)
        if expected is None:
            raise AttestationError(f"evidence type {evidence_type!r} is not supported: use sgx-dcap or tdx")
        quote = strip_oe_header(evidence)
        kind = parse_header(quote).kind
        if kind is not expected:
            raise AttestationError(
                f"evidence declared as {evidence_type} holds a {kind.value.upper()} quote: declare the type "
                "that matches the quote"
            )
        collateral = await self.cache.fetch(quote)
        return await self.pool.verify(quote, collateral, now)
