"""The recovery upload state machine (``POST /api/v2/recover``), as MarbleRun behaves, hardened.

Pure: no I/O. The Coordinator creates one :class:`Recoverer` when it enters Recovery,
passing the stored recovery data ``R``, the stored recovery *public* keys and two callbacks:

- ``try_key(candidate_dek) -> bool``: does the candidate decrypt the sealed state?
  (:meth:`marblekeep.store.PendingRecovery.try_key`)
- ``recovery_keys(dek) -> (RecoveryKeys PEM map, RecoveryThreshold)``: read from the
  stored manifest once the DEK is known; the authoritative signature check.

Rules of :meth:`Recoverer.upload`, in order:

1. A secret whose length is not 16, 32 or 33 is first decrypted with the ephemeral
   RSA-4096 key (RSA-OAEP-SHA256) served by ``GET /recover/public-key``
   (:meth:`Recoverer.public_key_der`; created lazily).
2. **Signed uploads only** (not in MarbleRun): each upload carries a signature, RSA
   PKCS#1 v1.5 with SHA-256 over the *plaintext* secret, by its owner's recovery key. When
   the state stores its recovery public keys (``public_keys`` is not ``None``), an upload
   that no recovery key signed is refused before anything else and nothing of it is kept.
   Each kept upload belongs to the key that signed it: a key has at most one upload kept,
   and a new one from the same key replaces it where no ``R`` says otherwise.
3. 33 bytes: a Shamir share. With ``R`` it must hash to an unused entry of ``R``
   (else ``uploaded an invalid or already used secret``); without ``R`` it must not
   repeat. From the second share on, the kept shares are combined and test-decrypted.
   ``remaining`` is the number of unused entries of ``R`` (not the threshold deficit).
4. Otherwise, without ``R`` (single key, or ``R`` lost): the secret must be 16 or 32
   bytes (``invalid secret length``). If it decrypts the state it is the DEK; else it is
   kept (all kept secrets of one length, else ``recovery secrets must match in length``)
   and the XOR of the kept secrets — one per signing key — is tried. A hit made of several
   secrets reconstructs ``R`` (returned for the caller to store). MarbleRun instead tries
   every subset of every upload so far (2^n work for upload n).
5. Otherwise (XOR multi-party with ``R``): the secret must hash to an unused entry; it
   is XORed in; when every entry is used the result is the candidate DEK.
6. Once a candidate DEK is found, progress is reset and the signatures are checked
   against the *sealed* manifest's ``RecoveryKeys`` (:func:`verify_signatures`): with
   threshold 0 or n there must be exactly n signatures, each key matching a distinct
   one; otherwise exactly t signatures, each matching a distinct key. A failure then
   means every party uploads again. After success the ephemeral key is dropped.

The work of one upload is bounded: at most one RSA decryption, one signature check per
recovery key, and one candidate (two without ``R``: the secret alone and the XOR), whatever
came before. States written before the public keys were stored (``public_keys=None``)
cannot check signatures before the DEK is known; for them the Recoverer keeps only the
last :data:`LEGACY_WINDOW` uploads of the no-``R`` path and tries only the combinations
that contain the newest upload (at most ``2^(LEGACY_WINDOW-1)`` candidates). The
Coordinator stores the public keys the first time it opens such a state.

Every failure is a :class:`~marblekeep.errors.RecoveryError` whose message never
contains secret material. The caller runs :meth:`Recoverer.upload` off the event loop.
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

__all__ = [
    "LEGACY_WINDOW",
    "MSG_DONE",
    "RecoverProgress",
    "Recoverer",
    "progress_message",
    "verify_signatures",
]

MSG_DONE = "Recovery successful."
EPHEMERAL_KEY_BITS = 4096

ERR_INVALID = "uploaded an invalid or already used secret"
ERR_LENGTH = "invalid secret length"
ERR_MISMATCH = "recovery secrets must match in length"
ERR_UNSIGNED = (
    "the recovery secret's signature does not match any recovery key of the manifest: sign the "
    "plaintext secret (RSA PKCS#1 v1.5, SHA-256) with its owner's recovery private key "
    "(marblekeep recover sign-secret); nothing of this upload was kept"
)
ERR_NO_KEYS = (
    "the sealed state has no recovery keys, so it cannot be recovered: set a new manifest instead "
    "(this discards the old state)"
)
ERR_SAME_KEY = (
    "a secret signed by this recovery key was already uploaded; each recovery key owner uploads "
    "their own secret once"
)
#: Uploads kept on the no-R path of a state that does not store its recovery public keys.
LEGACY_WINDOW = 8


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
        public_keys: Mapping[str, str] | None = None,
        ephemeral_key_factory: Callable[[], rsa.RSAPrivateKey] = _generate_ephemeral_key,
    ) -> None:
        self._entries = _parse_recovery_data(recovery_data)
        self._try_key = try_key
        self._recovery_keys = recovery_keys
        self._key_factory = ephemeral_key_factory
        self._ephemeral: rsa.RSAPrivateKey | None = None
        self._public: list[rsa.RSAPublicKey] | None = None
        if public_keys is not None:
            self._public = []
            for name, pem in sorted(public_keys.items()):
                try:
                    self._public.append(parse_recovery_public_key(name, pem))
                except ManifestError:
                    continue  # a key that cannot sign anything; the sealed manifest's check decides
        self.reset()

    @property
    def checks_signatures_first(self) -> bool:
        """Whether uploads are checked against the recovery public keys before they are kept."""
        return self._public is not None

    def reset(self) -> None:
        """Forget every upload (all parties start again)."""
        self._used: set[str] = set()
        self._secrets: list[bytes] = []
        self._signatures: dict[bytes, bytes] = {}
        self._by_signer: dict[int, bytes] = {}

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

    def _signers(self, plain: bytes, signature: bytes) -> list[int] | None:
        """The recovery keys (indexes) whose signature this is; ``None`` when keys are unknown."""
        if self._public is None:
            return None
        if not self._public:
            raise RecoveryError(ERR_NO_KEYS)
        signers = [i for i, key in enumerate(self._public) if _signature_matches(key, plain, signature)]
        if not signers:
            raise RecoveryError(ERR_UNSIGNED)
        return signers

    def upload(self, secret: bytes, signature: bytes) -> RecoverProgress:
        """Process one uploaded secret and its signature (CPU-bound: call it off the event loop)."""
        plain = secret if len(secret) in (16, 32, 33) else self._decrypt(secret)
        signers = self._signers(plain, signature)
        if len(plain) == 33:
            return self._shamir(plain, signature, signers)
        if self._entries is None:
            return self._without_recovery_data(plain, signature, signers)
        return self._xor_with_recovery_data(plain, signature, signers)

    # -- bookkeeping -----------------------------------------------------------------------

    def _free_signer(self, signers: list[int] | None) -> int | None:
        """The first signing key without a kept upload; raises if all have one (R paths)."""
        if signers is None:
            return None
        for index in signers:
            if index not in self._by_signer:
                return index
        raise RecoveryError(ERR_SAME_KEY)

    def _keep(self, plain: bytes, signature: bytes, signer: int | None) -> None:
        if signer is not None:
            self._by_signer[signer] = plain
        self._secrets.append(plain)
        self._signatures[plain] = signature

    def _forget(self, plain: bytes) -> None:
        self._secrets.remove(plain)
        self._signatures.pop(plain, None)
        for index, kept in list(self._by_signer.items()):
            if kept == plain:
                del self._by_signer[index]

    def _replaceable(self, plain: bytes, signers: list[int] | None) -> bytes | None:
        """No-R paths: the kept upload this one replaces (same signer), or, for a state without
        stored keys, the oldest one once :data:`LEGACY_WINDOW` are kept."""
        if signers is None:
            return self._secrets[0] if len(self._secrets) >= LEGACY_WINDOW else None
        free = [i for i in signers if i not in self._by_signer]
        return None if free else self._by_signer[signers[0]]

    def _claim(self, plain: bytes, signers: list[int] | None) -> int | None:
        """Mark the entry of R for this share as used (or refuse); returns the signing key it is
        kept for."""
        assert self._entries is not None
        digest = sha256(plain).hexdigest()
        if digest not in self._entries or digest in self._used:
            raise RecoveryError(ERR_INVALID)
        signer = self._free_signer(signers)
        self._used.add(digest)
        return signer

    def _legacy_subsets(self, size_min: int) -> list[list[bytes]]:
        """Combinations of the kept uploads that contain the newest one (no stored keys)."""
        newest, older = self._secrets[-1], self._secrets[:-1]
        return [
            [*rest, newest]
            for size in range(size_min - 1, len(older) + 1)
            for rest in combinations(older, size)
        ]

    # -- paths -----------------------------------------------------------------------------

    def _shamir(self, plain: bytes, signature: bytes, signers: list[int] | None) -> RecoverProgress:
        if self._entries is not None:
            self._keep(plain, signature, self._claim(plain, signers))
        else:
            if plain in self._secrets:
                raise RecoveryError(ERR_INVALID)
            replaced = self._replaceable(plain, signers)
            if replaced is not None:
                self._forget(replaced)
            self._keep(plain, signature, self._free_signer(signers))
        if len(self._secrets) >= 2:
            candidates = (
                self._legacy_subsets(2)
                if signers is None and self._entries is None
                else [list(self._secrets)]
            )
            for shares in candidates:
                try:
                    candidate = shamir.combine(shares)
                except RecoveryError:
                    if len(candidates) == 1:
                        self.reset()
                        raise RecoveryError(ERR_INVALID) from None
                    continue
                if self._try_key(candidate):
                    return self._finish(candidate, list(shares), None)
        if self._entries is not None and self.remaining == 0:
            self.reset()
            raise RecoveryError("the uploaded shares do not recover the key; every party must upload again")
        return RecoverProgress(self.remaining, progress_message(self.remaining))

    def _without_recovery_data(
        self, plain: bytes, signature: bytes, signers: list[int] | None
    ) -> RecoverProgress:
        if len(plain) not in (16, 32):
            raise RecoveryError(ERR_LENGTH)
        if self._try_key(plain):
            self._signatures[plain] = signature
            return self._finish(plain, [plain], None)
        if plain in self._secrets:
            return RecoverProgress(1, progress_message(1))
        replaced = self._replaceable(plain, signers)
        others = [s for s in self._secrets if s != replaced]
        if others and len(others[0]) != len(plain):
            raise RecoveryError(ERR_MISMATCH)
        if replaced is not None:
            self._forget(replaced)
        self._keep(plain, signature, self._free_signer(signers))
        if len(self._secrets) >= 2:
            subsets = self._legacy_subsets(2) if signers is None else [list(self._secrets)]
            for subset in subsets:
                candidate = _xor(subset)
                if self._try_key(candidate):
                    return self._finish(candidate, subset, recovery_data_for(subset))
        return RecoverProgress(1, progress_message(1))

    def _xor_with_recovery_data(
        self, plain: bytes, signature: bytes, signers: list[int] | None
    ) -> RecoverProgress:
        if self._secrets and len(self._secrets[0]) != len(plain):
            raise RecoveryError(ERR_MISMATCH)
        self._keep(plain, signature, self._claim(plain, signers))
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
