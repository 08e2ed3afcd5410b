"""The values a template is executed against, and the two function sets.

A template sees one root object (:class:`TemplateData`)::

    .MarbleRun                      (old spelling .Marblerun: the same object)
        .RootCA                     ReservedSecret: the Marble root certificate
        .MarbleCert                 ReservedSecret: this Marble's leaf certificate and key
        .CoordinatorRoot            ReservedSecret
        .CoordinatorIntermediate    ReservedSecret
        .SealKey                    32 raw bytes: the Marble's virtual sealing key
    .Secrets.<name>                 SecretValue (e.g. marblekeep.manifest.model.Secret)
    .Previous.Secrets.<name>        SecretValue, resolved against the previous root secret

Layering: templating is the lower layer. It owns :class:`SecretValue`, the shape of a secret it
reads, and imports nothing from :mod:`marblekeep.manifest`; the manifest's ``Secret`` satisfies
the protocol, and the template dry run (which needs both) sits above them in
:mod:`marblekeep.manifest.dryrun`.

Pure values: nothing here does I/O. ``repr`` never shows private keys or the seal key.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from marblekeep.errors import TemplateError

__all__ = ["PLAIN_TYPE", "FunctionSet", "ReservedSecret", "SecretKind", "SecretValue", "TemplateData"]

#: The ``Type`` of the secrets that ``string`` accepts.
PLAIN_TYPE = "plain"


class SecretKind(Protocol):
    """A secret's type as a template sees it: its ``.value`` is the manifest spelling
    (``symmetric-key``, ``cert-ecdsa``, ``plain``, ...); an enum member fits."""

    @property
    def value(self) -> str: ...


class SecretValue(Protocol):
    """What a template reads from a secret (``.Secrets.<name>``): MarbleRun's Secret fields.

    ``cert`` is DER (``None`` or empty: the secret has no certificate), ``public`` PKIX DER or the
    key bytes, ``private`` PKCS#8 DER or the key bytes. :class:`marblekeep.manifest.model.Secret`
    satisfies it; templating never imports the manifest package.
    """

    @property
    def type(self) -> SecretKind | None: ...
    @property
    def size(self) -> int: ...
    @property
    def shared(self) -> bool: ...
    @property
    def user_defined(self) -> bool: ...
    @property
    def valid_for(self) -> int: ...
    @property
    def cert(self) -> bytes | None: ...
    @property
    def public(self) -> bytes: ...
    @property
    def private(self) -> bytes: ...


class FunctionSet(enum.Enum):
    """Which encoding functions a template may call.

    ``FILES`` (``Parameters.Files``): pem, hex, base64, raw, index.
    ``ENV`` (``Parameters.Env``): pem, hex, base64, string, index.
    """

    FILES = "files"
    ENV = "env"


@dataclass(frozen=True)
class ReservedSecret:
    """A Coordinator-provided credential: ``.MarbleRun.RootCA`` and its siblings.

    ``cert`` is DER, ``public`` PKIX DER, ``private`` PKCS#8 DER. Empty means "not provided"
    (the Coordinator's CA certificates have no ``public``/``private`` for templates).
    """

    cert: bytes | None = None
    public: bytes = b""
    private: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class TemplateData:
    """The root object of a template (``.`` and ``$``)."""

    root_ca: ReservedSecret
    marble_cert: ReservedSecret
    coordinator_root: ReservedSecret
    coordinator_intermediate: ReservedSecret
    seal_key: bytes = field(repr=False)
    secrets: Mapping[str, SecretValue] = field(repr=False)
    previous_secrets: Mapping[str, SecretValue] = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("root_ca", "marble_cert", "coordinator_root", "coordinator_intermediate"):
            if not isinstance(getattr(self, name), ReservedSecret):
                raise TemplateError(
                    f"TemplateData.{name} must be a ReservedSecret, got {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.seal_key, bytes):
            raise TemplateError(f"TemplateData.seal_key must be bytes, got {type(self.seal_key).__name__}")
        for name in ("secrets", "previous_secrets"):
            if not isinstance(getattr(self, name), Mapping):
                raise TemplateError(
                    f"TemplateData.{name} must be a mapping of name to Secret, "
                    f"got {type(getattr(self, name)).__name__}"
                )
