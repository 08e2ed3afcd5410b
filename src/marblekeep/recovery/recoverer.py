"""The recovery upload state machine (``POST /api/v2/recover``), as MarbleRun behaves.

Pure: no I/O. The Coordinator creates one :class:`Recoverer` when it enters Recovery,
passing the stored recovery data ``R`` and two callbacks:

- ``try_key(candidate_dek) -> bool``: does the candidate decrypt the sealed state?
  (:meth:`marblekeep.store.PendingRecovery.try_key`)
- ``recovery_keys(dek) -> (RecoveryKeys PEM map, RecoveryThreshold)``: read from the
  stored manifest once the DEK is known; used to check the upload signatures.

Rules of :meth:`Recoverer.upload`, in order:

1. A secret whose length is not 16, 32 or 33 is first decrypted with the ephemeral
   RSA-4096 key (RSA-OAEP-SHA256) served by ``GET /recover/public-key``
   (:meth:`Recoverer.public_key_der`; created lazily).
2. 33 bytes: a Shamir share. With ``R`` it must hash to an unused entry of ``R``
   (else ``uploaded an invalid or already used secret``); without ``R`` it must not
   repeat. From the second share on, the shares are combined and test-decrypted.
   ``remaining`` is the number of unused entries of ``R`` (not the threshold deficit).
3. Otherwise, without ``R`` (single key, or ``R`` lost): the secret must be 16 or 32
   bytes (``invalid secret length``). If it decrypts the state it is the DEK; else it is
   kept and every non-empty subset of the uploaded secrets is tried XORed (all of one
   length, else ``recovery secrets must match in length``). A hit made of several
   secrets reconstructs ``R`` (returned for the caller to store).
4. Otherwise (XOR multi-party with ``R``): the secret must hash to an unused entry; it
   is XORed in; when every entry is used the result is the candidate DEK.
5. Each upload carries a signature: RSA PKCS#1 v1.5 with SHA-256 over the *plaintext*
   secret, by the owner's recovery key. Signatures are kept per secret and checked only
   once a candidate DEK is found, against the stored manifest's ``RecoveryKeys``: with
   threshold 0 or n there must be exactly n signatures, each key matching a distinct
   one; otherwise exactly t signatures, each matching a distinct key.
6. Once a candidate is found, progress is reset *before* the signatures are checked: a
   failure then means every party uploads again. After success the ephemeral key is
   dropped.

Every failure is a :class:`~marblekeep.errors.RecoveryError` whose message never
contains secret material.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from itertools import combinations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from marblekeep.errors import ManifestError, MarbleKeepError, RecoveryError
from marblekeep.recovery import shamir
from marblekeep.recovery.keys import oaep, parse_recovery_public_key, recovery_data_for

__all__ = ["MSG_DONE", "RecoverProgress", "Recoverer", "progress_message", "verify_signatures"]

MSG_DONE = "Recovery successful."
EPHEMERAL_KEY_BITS = 4096

ERR_INVALID = "uploaded an invalid or already used secret"
ERR_LENGTH = "invalid secret length"
ERR_MISMATCH = "recovery secrets must match in length"


def progress_message(remaining: int) -> str:
    return f"Secret was processed successfully. Upload the next secret. Remaining secrets: {remaining}"


@dataclass(frozen=True)
class RecoverProgress:
    """The answer to one upload. ``dek`` is set (and ``remaining`` is 0) when recovery is complete."""

    remaining: int
    message: str
    dek: bytes | None = field(default=None, repr=False)
    #: R rebuilt from a multi-party XOR hit when no R was stored: the caller should store it.
    recovery_data: bytes | None = None

    @property
    def complete(self) -> bool:
        return self.dek is not None


def _generate_ephemeral_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=EPHEMERAL_KEY_BITS)


def _parse_recovery_data(recovery_data: bytes | None) -> dict[str, bool] | None:
    if recovery_data is None:
        return None
    try:
        parsed = json.loads(recovery_data)
    except (ValueError, UnicodeDecodeError):
        return None  # unreadable R: behave as if it was lost (the XOR-subset path still works)
    if not isinstance(parsed, dict) or not parsed:
        return None  # JSON null (single key) or {}
    return {str(k): bool(v) for k, v in parsed.items()}


def _xor(secrets: Sequence[bytes]) -> bytes:
    out = bytearray(len(secrets[0]))
    for secret in secrets:
        for i, b in enumerate(secret):
            out[i] ^= b
    return bytes(out)


def _signature_matches(key: rsa.RSAPublicKey, secret: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, secret, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_signatures(
    signed: Sequence[tuple[bytes, bytes]], recovery_keys: Mapping[str, str], threshold: int
) -> None:
    """Check ``(secret, signature)`` pairs against the manifest's recovery keys (distinct-key rules)."""
    try:
        keys = [parse_recovery_public_key(name, pem) for name, pem in sorted(recovery_keys.items())]
    except ManifestError as exc:
        raise RecoveryError(f"the stored manifest's recovery keys cannot be used: {exc.message}") from None
    count = len(keys)
    needed = count if threshold in (0, count) else threshold
    if len(signed) != needed:
        raise RecoveryError(
            f"recovery needs signed secrets from {needed} distinct recovery key owners, got {len(signed)}"
        )
    # which key verifies which signature, then a matching in which every signature has its own key
    verifies = [[k for k, key in enumerate(keys) if _signature_matches(key, s, sig)] for s, sig in signed]
    owner: dict[int, int] = {}

    def assign(sig_index: int, seen: set[int]) -> bool:
        for key_index in verifies[sig_index]:
            if key_index in seen:
                continue
            seen.add(key_index)
            if key_index not in owner or assign(owner[key_index], seen):
                owner[key_index] = sig_index
                return True
        return False

    for i in range(len(signed)):
        if not assign(i, set()):
            raise RecoveryError(
                "a recovery secret's signature does not match a distinct recovery key of the manifest; "
                "sign each secret with its owner's recovery private key"
            )


class Recoverer:
    """Collects recovery secret uploads until the DEK is found (see the module docstring)."""

    def __init__(
        self,
        recovery_data: bytes | None,
        try_key: Callable[[bytes], bool],
        recovery_keys: Callable[[bytes], tuple[Mapping[str, str], int]],
        *,
        ephemeral_key_factory: Callable[[], rsa.RSAPrivateKey] = _generate_ephemeral_key,
    ) -> None:
        self._entries = _parse_recovery_data(recovery_data)
        self._try_key = try_key
        self._recovery_keys = recovery_keys
        self._key_factory = ephemeral_key_factory
        self._ephemeral: rsa.RSAPrivateKey | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every upload (all parties start again)."""
        self._used: set[str] = set()
        self._secrets: list[bytes] = []
        self._signatures: dict[bytes, bytes] = {}

    @property
    def remaining(self) -> int:
        if self._entries is None:
            return 1
        return len(self._entries) - len(self._used)

    def public_key_der(self) -> bytes:
        """The ephemeral RSA-4096 public key (PKIX DER) for encrypted uploads; created on first use."""
        if self._ephemeral is None:
            self._ephemeral = self._key_factory()
        return self._ephemeral.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _decrypt(self, secret: bytes) -> bytes:
        if self._ephemeral is None:
            raise RecoveryError(
                "decrypting the recovery secret failed: no ephemeral key was requested; upload the "
                "decrypted secret, or encrypt it for GET /api/v2/recover/public-key first"
            )
        try:
            return self._ephemeral.decrypt(secret, oaep())
        except ValueError:
            raise RecoveryError(
                "decrypting the recovery secret failed: it was not encrypted for this Coordinator's current "
                "ephemeral key; fetch the public key again and re-encrypt"
            ) from None

    def upload(self, secret: bytes, signature: bytes) -> RecoverProgress:
        """Process one uploaded secret and its signature."""
        plain = secret if len(secret) in (16, 32, 33) else self._decrypt(secret)
        if len(plain) == 33:
            return self._shamir(plain, signature)
        if self._entries is None:
            return self._without_recovery_data(plain, signature)
        return self._xor_with_recovery_data(plain, signature)

    # -- paths -----------------------------------------------------------------------------

    def _claim(self, plain: bytes) -> None:
        """Mark the entry of R for this share as used, or refuse."""
        assert self._entries is not None
        digest = sha256(plain).hexdigest()
        if digest not in self._entries or digest in self._used:
            raise RecoveryError(ERR_INVALID)
        self._used.add(digest)

    def _shamir(self, plain: bytes, signature: bytes) -> RecoverProgress:
        if self._entries is not None:
            self._claim(plain)
        elif plain in self._secrets:
            raise RecoveryError(ERR_INVALID)
        self._secrets.append(plain)
        self._signatures[plain] = signature
        if len(self._secrets) >= 2:
            try:
                candidate = shamir.combine(self._secrets)
            except RecoveryError:
                self.reset()
                raise RecoveryError(ERR_INVALID) from None
            if self._try_key(candidate):
                return self._finish(candidate, list(self._secrets), None)
        if self._entries is not None and self.remaining == 0:
            self.reset()
            raise RecoveryError("the uploaded shares do not recover the key; every party must upload again")
        return RecoverProgress(self.remaining, progress_message(self.remaining))

    def _without_recovery_data(self, plain: bytes, signature: bytes) -> RecoverProgress:
        if len(plain) not in (16, 32):
            raise RecoveryError(ERR_LENGTH)
        self._signatures[plain] = signature
        if self._try_key(plain):
            return self._finish(plain, [plain], None)
        if self._secrets and len(self._secrets[0]) != len(plain):
            del self._signatures[plain]
            raise RecoveryError(ERR_MISMATCH)
        if plain not in self._secrets:
            self._secrets.append(plain)
        for size in range(2, len(self._secrets) + 1):
            for subset in combinations(self._secrets, size):
                candidate = _xor(subset)
                if self._try_key(candidate):
                    return self._finish(candidate, list(subset), recovery_data_for(list(subset)))
        return RecoverProgress(1, progress_message(1))

    def _xor_with_recovery_data(self, plain: bytes, signature: bytes) -> RecoverProgress:
        if self._secrets and len(self._secrets[0]) != len(plain):
            raise RecoveryError(ERR_MISMATCH)
        self._claim(plain)
        self._secrets.append(plain)
        self._signatures[plain] = signature
        if self.remaining > 0:
            return RecoverProgress(self.remaining, progress_message(self.remaining))
        candidate = _xor(self._secrets)
        secrets = list(self._secrets)
        if not self._try_key(candidate):
            self.reset()
            raise RecoveryError("the recovered key does not decrypt the state; every party must upload again")
        return self._finish(candidate, secrets, None)

    def _finish(self, dek: bytes, used: list[bytes], rebuilt: bytes | None) -> RecoverProgress:
        signed = [(s, self._signatures[s]) for s in used]
        self.reset()  # from here on, any failure means everybody uploads again (as MarbleRun)
        try:
            keys, threshold = self._recovery_keys(dek)
        except RecoveryError:
            raise
        except MarbleKeepError as exc:
            raise RecoveryError(f"the recovered state cannot be read: {exc.message}") from None
        except Exception as exc:
            raise RecoveryError(
                f"the recovered state's recovery keys cannot be read ({type(exc).__name__}); "
                "every party must upload again"
            ) from None
        verify_signatures(signed, keys, threshold)
        self._ephemeral = None
        return RecoverProgress(0, MSG_DONE, dek=dek, recovery_data=rebuilt)
