"""Constants of the DCAP vectors (tests/vectors/dcap), shared by the attestation tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dcap"

#: inside sgx_quote's collateral window (2025-06-19T10:56:11Z .. 2025-07-19T10:01:18Z)
SGX_AT = dt.datetime(2025, 6, 25, tzinfo=dt.UTC)
#: inside tdx_quote_outdated's collateral window
TDX_OUTDATED_AT = dt.datetime(2026, 2, 25, tzinfo=dt.UTC)

SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
