"""Signatures the Coordinator makes with its root key.

The manifest signature is MarbleRun's: ECDSA with the P-384 root key over SHA-256 of the *raw*
manifest bytes as uploaded (never a re-serialisation), ASN.1 DER encoded. Users check it with::

    openssl dgst -sha256 -verify root-pub.pem -signature manifest.sig manifest.json

The same primitive signs quotes for the sign-quote endpoint (over SHA-256 of the message given).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["sign_manifest", "sign_sha256", "verify_manifest_signature", "verify_sha256"]


def sign_sha256(root_key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """DER-encoded ECDSA signature by ``root_key`` over SHA-256(``message``)."""
    return root_key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_sha256(root_cert: x509.Certificate, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid :func:`sign_sha256` signature of ``message`` by the cert's key."""
    public_key = root_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_manifest(root_key: ec.EllipticCurvePrivateKey, raw: bytes) -> bytes:
    """The manifest signature: DER ECDSA (P-384 root key) over SHA-256 of the raw manifest bytes."""
    return sign_sha256(root_key, raw)


def verify_manifest_signature(root_cert: x509.Certificate, raw: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the root key's signature of the raw manifest bytes."""
    return verify_sha256(root_cert, raw, signature)
