"""The values a template is executed against, and the two function sets.

A template sees one root object (:class:`TemplateData`)::

    .MarbleRun                      (old spelling .Marblerun: the same object)
        .RootCA                     ReservedSecret: the Marble root certificate
        .MarbleCert                 ReservedSecret: this Marble's leaf certificate and key
        .CoordinatorRoot            ReservedSecret
        .CoordinatorIntermediate    ReservedSecret
        .SealKey                    32 raw bytes: the Marble's virtual sealing key
    .Secrets.<name>                 Secret (marblekeep.manifest.model.Secret)
    .Previous.Secrets.<name>        Secret, resolved against the previous root secret

Pure values: nothing here does I/O. ``repr`` never shows private keys or the seal key.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from marblekeep.errors import TemplateError
from marblekeep.manifest.model import Secret

__all__ = ["FunctionSet", "ReservedSecret", "TemplateData"]


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
    secrets: Mapping[str, Secret] = field(repr=False)
    previous_secrets: Mapping[str, Secret] = field(repr=False)

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
