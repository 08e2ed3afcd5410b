"""Key-encryption keys (KEKs): the platform key that wraps the store's data-encryption key.

A :class:`KeyEncryptionKeyProvider` hands out one 32-byte KEK and says where the
rollback anchor lives (:mod:`marblekeep.store.anchor`). Providers:

- :class:`GramineSealKeyProvider` — inside Gramine-SGX. Reads the 16-byte sealing
  key ``<attestation_root>/keys/_sgx_mrsigner`` (``SealMode.PRODUCT_KEY``: same key
  for every enclave version signed by the same key with the same product ID, so a
  Coordinator update keeps its state) or ``keys/_sgx_mrenclave``
  (``SealMode.UNIQUE_KEY``: only this exact enclave build opens it). The KEK is
  ``HKDF-SHA256(IKM = the Gramine key, salt = none, info = KEK_INFO_PREFIX + mode, L = 32)``,
  e.g. info ``b"marblekeep/kek/v1/ProductKey"``.
- :class:`SimulationKeyFileProvider` — development only. A 32-byte random key kept in
  a plain file (mode 0600, created on first use). Anyone who can read the file can
  read the state; every load logs a WARNING on the ``marblekeep.seal`` logger.
- ``SealMode.DISABLED`` has no provider: nothing is persisted (use a
  :class:`~marblekeep.store.memory.MemoryStore`), as in MarbleRun.

Providers do file I/O and are called from a worker thread by the sealed store.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from marblekeep.errors import ConfigError, SealError

if TYPE_CHECKING:  # at run time only ``mode.value`` is used: importing the manifest package is slow
    from marblekeep.manifest.model import SealMode

__all__ = [
    "ANCHOR_FILE_NAME",
    "DEFAULT_ATTESTATION_ROOT",
    "KEK_INFO_PREFIX",
    "KEK_SIZE",
    "GramineSealKeyProvider",
    "KeyEncryptionKeyProvider",
    "SimulationKeyFileProvider",
]

SEAL_LOG = logging.getLogger("marblekeep.seal")

KEK_SIZE = 32
DEFAULT_ATTESTATION_ROOT = Path("/dev/attestation")
#: HKDF ``info`` for the KEK derived from a Gramine sealing key is this prefix + the seal mode's name.
KEK_INFO_PREFIX = b"marblekeep/kek/v1/"
#: Name of the rollback-anchor file in an anchor directory.
ANCHOR_FILE_NAME = "rollback-anchor"

_GRAMINE_KEY_FILES = {  # SealMode value -> Gramine key file
    "ProductKey": "_sgx_mrsigner",
    "UniqueKey": "_sgx_mrenclave",
}


@runtime_checkable
class KeyEncryptionKeyProvider(Protocol):
    """Where the KEK comes from. ``load_kek`` may do I/O; it raises ``SealError``/``ConfigError``."""

    @property
    def description(self) -> str:
        """Human-readable name for logs and errors (never contains key material)."""
        ...

    @property
    def anchor_path(self) -> Path | None:
        """The rollback-anchor file kept beside this KEK (``None``: no rollback protection)."""
        ...

    def load_kek(self) -> bytes:
        """The 32-byte key-encryption key."""
        ...


def derive_kek(platform_key: bytes, mode: SealMode) -> bytes:
    """``HKDF-SHA256(platform_key, salt=None, info=KEK_INFO_PREFIX + mode.value, L=32)``."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEK_SIZE, salt=None, info=KEK_INFO_PREFIX + mode.value.encode()
    ).derive(platform_key)


class GramineSealKeyProvider:
    """KEK from Gramine's SGX sealing keys under ``attestation_root`` (usually ``/dev/attestation``)."""

    def __init__(
        self,
        attestation_root: Path,
        mode: SealMode,
        *,
        anchor_dir: Path | None = None,
    ) -> None:
        if mode.value not in _GRAMINE_KEY_FILES:
            raise ConfigError(
                f"SealMode {mode.value} has no sealing key; use ProductKey or UniqueKey "
                "(Disabled means: no persistence and no key provider)"
            )
        self.attestation_root = Path(attestation_root)
        self.mode = mode
        self.key_path = self.attestation_root / "keys" / _GRAMINE_KEY_FILES[mode.value]
        self._anchor_dir = anchor_dir

    @property
    def description(self) -> str:
        return f"Gramine SGX sealing key {self.key_path} ({self.mode.value})"

    @property
    def anchor_path(self) -> Path | None:
        return None if self._anchor_dir is None else self._anchor_dir / ANCHOR_FILE_NAME

    def load_kek(self) -> bytes:
        try:
            with open(self.key_path, "rb") as f:
                key = f.read(64)
        except FileNotFoundError:
            raise ConfigError(
                f"{self.key_path} does not exist: not running inside Gramine-SGX; run the Coordinator "
                "under Gramine, point the attestation root at Gramine's /dev/attestation, or use simulation"
            ) from None
        except OSError as exc:
            raise SealError(f"cannot read the sealing key {self.key_path}: {exc.strerror}") from None
        if len(key) not in (16, 32):
            raise SealError(
                f"sealing key {self.key_path} has {len(key)} bytes, expected 16; "
                "check the Gramine version and the attestation root"
            )
        return derive_kek(key, self.mode)


class SimulationKeyFileProvider:
    """INSECURE, simulation only: the KEK is a plain 32-byte file (created with mode 0600 on first use).

    The rollback anchor lives beside it (``<path>.anchor``). Every :meth:`load_kek`
    logs a WARNING on the ``marblekeep.seal`` logger.
    """

    def __init__(self, path: Path, *, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.path = Path(path)
        self._rng = rng

    @property
    def description(self) -> str:
        return f"simulation key file {self.path} (INSECURE)"

    @property
    def anchor_path(self) -> Path | None:
        return self.path.with_name(self.path.name + ".anchor")

    def _create(self) -> bytes:
        key = self._rng(KEK_SIZE)
        if len(key) != KEK_SIZE:
            raise SealError("the random generator returned a short key")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read()
        except OSError as exc:
            raise ConfigError(
                f"cannot create the simulation key file {self.path}: {exc.strerror}; "
                "check that its directory exists and is writable"
            ) from None
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return key

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                key = f.read(KEK_SIZE + 1)
        except OSError as exc:
            raise SealError(f"cannot read the simulation key file {self.path}: {exc.strerror}") from None
        if len(key) != KEK_SIZE:
            raise SealError(
                f"simulation key file {self.path} has {len(key)} bytes, expected {KEK_SIZE}; restore it "
                "(without it the state needs recovery)"
            )
        if stat.S_IMODE(mode) & 0o077:
            SEAL_LOG.warning(
                "simulation key file %s is readable by group or others (mode %o); chmod 600 it",
                self.path,
                stat.S_IMODE(mode),
            )
        return key

    def load_kek(self) -> bytes:
        key = self._read() if self.path.exists() else self._create()
        SEAL_LOG.warning(
            "INSECURE: the state's key-encryption key is the plain file %s (simulation mode); "
            "anyone who can read it can read the Coordinator's secrets. Never use this in production.",
            self.path,
        )
        return key
