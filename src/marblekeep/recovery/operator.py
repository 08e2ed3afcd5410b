"""What a recovery-key owner does offline (for the CLI's ``recover``, ``encrypt-secret``, ``sign-secret``).

- :func:`decrypt_recovery_secret`: the owner's RSA private key opens the secret the
  Coordinator returned at SetManifest (RSA-OAEP-SHA256), same as
  ``openssl pkeyutl -decrypt -inkey k.pem -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256``.
- :func:`sign_recovery_secret`: RSA PKCS#1 v1.5 SHA-256 signature over the plaintext
  secret, uploaded as ``recoverySecretSignature``.
- :func:`encrypt_for_coordinator`: encrypt the plaintext secret for the Coordinator's
  ephemeral key (``GET /api/v2/recover/public-key``), so it never travels in the clear.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from marblekeep.errors import RecoveryError
from marblekeep.recovery.keys import oaep

__all__ = ["decrypt_recovery_secret", "encrypt_for_coordinator", "load_private_key", "sign_recovery_secret"]


def load_private_key(pem: bytes, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """An RSA private key from PEM (PKCS#1 or PKCS#8)."""
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError):
        raise RecoveryError(
            "the recovery private key cannot be loaded: give the PEM file of the RSA key whose public "
            "half is in the manifest's RecoveryKeys (and its password, if any)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise RecoveryError("the recovery private key must be an RSA key")
    return key


def decrypt_recovery_secret(encrypted: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    try:
        return private_key.decrypt(encrypted, oaep())
    except ValueError:
        raise RecoveryError(
            "the recovery secret does not decrypt with this private key: use the key whose public half "
            "is listed under this name in RecoveryKeys"
        ) from None


def sign_recovery_secret(secret: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.sign(secret, padding.PKCS1v15(), hashes.SHA256())


def encrypt_for_coordinator(secret: bytes, ephemeral_public_key_der: bytes) -> bytes:
    try:
        key = serialization.load_der_public_key(ephemeral_public_key_der)
    except ValueError:
        raise RecoveryError("the Coordinator's ephemeral public key is not a DER public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise RecoveryError("the Coordinator's ephemeral public key is not an RSA key")
    return key.encrypt(secret, oaep())
