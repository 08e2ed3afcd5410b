"""The sign-quote contract (MarbleRun's ``/sign-quote``, feature gate ``SignQuoteEndpoint``).

Pure module. The endpoint (wired by the API layer) verifies a quote, then signs
``SHA-256(base64std(quote exactly as submitted) || tcb_status)`` with the Coordinator's root
key, ECDSA P-384, ASN.1 DER. The quote is not checked against any manifest package.

* :func:`is_raw_sgx_quote` — MarbleRun's ``IsRawSGXQuote``: such input gets an Open Enclave
  header before verification (our :func:`~marblekeep.attestation.dcap.verify_quote` takes
  both forms, so this only matters for the record).
* :func:`sign_quote_payload` — the 32-byte digest to sign; sign it with
  ``ec.ECDSA(utils.Prehashed(hashes.SHA256()))``.
* :func:`verify_sign_quote_signature` — what a client does with the answer.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

__all__ = [
    "SIGN_QUOTE_STATUSES",
    "is_raw_sgx_quote",
    "sign_quote_message",
    "sign_quote_payload",
    "verify_sign_quote_signature",
]

#: The status strings the signature can cover (MarbleRun's spelling).
SIGN_QUOTE_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "OutOfDate",
    "Revoked",
    "ConfigurationNeeded",
    "OutOfDateConfigurationNeeded",
    "SWHardeningNeeded",
    "ConfigurationAndSWHardeningNeeded",
)


def is_raw_sgx_quote(quote: bytes) -> bool:
    """True for a raw SGX quote: version 3, attestation key type <= 3, TEE type 0, QE and PCE SVN > 0."""
    if len(quote) < 12:
        return False
    fields: tuple[int, int, int, int, int] = struct.unpack_from("<HHIHH", quote, 0)
    version, key_type, tee_type, qe_svn, pce_svn = fields
    return version == 3 and key_type <= 3 and tee_type == 0 and qe_svn > 0 and pce_svn > 0


def sign_quote_message(quote_as_submitted: bytes, tcb_status: str) -> bytes:
    """``base64std(quote) + status``: the message whose SHA-256 is signed."""
    return base64.b64encode(quote_as_submitted) + tcb_status.encode("utf-8")


def sign_quote_payload(quote_as_submitted: bytes, tcb_status: str) -> bytes:
    """``SHA-256(base64std(quote) + status)``: the digest the root key signs (pre-hashed)."""
    return hashlib.sha256(sign_quote_message(quote_as_submitted, tcb_status)).digest()


def verify_sign_quote_signature(
    public_key: ec.EllipticCurvePublicKey, quote_as_submitted: bytes, tcb_status: str, signature: bytes
) -> bool:
    """Check a sign-quote signature (DER ECDSA over the payload) against the root public key."""
    try:
        public_key.verify(
            signature,
            sign_quote_payload(quote_as_submitted, tcb_status),
            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
        )
    except InvalidSignature:
        return False
    return True
