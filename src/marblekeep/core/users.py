"""Users and their permissions, from the manifest (reference §1.7).

A user is identified by the exact DER of the certificate listed in the manifest (only the first PEM
block counts). Permissions are additive across roles; action names compare case-insensitively.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from marblekeep.manifest.model import Manifest

__all__ = ["user_certificates"]


def user_certificates(manifest: Manifest | None) -> dict[str, bytes]:
    """name → DER of the user's certificate (validated manifests always parse)."""
    if manifest is None:
        return {}
    out: dict[str, bytes] = {}
    for name, user in manifest.users.items():
        try:
            cert = x509.load_pem_x509_certificate(user.certificate.encode())
        except ValueError:
            continue  # load_manifest refuses such manifests; never reached for a valid one
        out[name] = cert.public_bytes(serialization.Encoding.DER)
    return out
