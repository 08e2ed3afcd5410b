"""The manifest's value types.

These frozen dataclasses are what the rest of marblekeep consumes. A
:class:`Manifest` that exists has been parsed *and* validated
(``marblekeep.manifest.load_manifest``); nothing else constructs one from
untrusted input. Field names follow MarbleRun's Go field names in snake_case.

The raw bytes the user uploaded are kept in :attr:`Manifest.raw`: the
fingerprint and the signature are over them, never over a re-serialisation.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_ACCEPTED_TCB_STATUSES",
    "CertTemplate",
    "Config",
    "FileEntry",
    "Infrastructure",
    "Manifest",
    "Marble",
    "Package",
    "Parameters",
    "Role",
    "SealMode",
    "Secret",
    "SecretType",
    "TLSTag",
    "TLSTagEntry",
    "TdxPackage",
    "User",
]

#: MarbleRun's default when ``AcceptedTCBStatuses`` is empty (``UpToDate`` is always accepted).
DEFAULT_ACCEPTED_TCB_STATUSES: tuple[str, ...] = ("SWHardeningNeeded",)


class SecretType(enum.Enum):
    SYMMETRIC_KEY = "symmetric-key"
    CERT_RSA = "cert-rsa"
    CERT_ECDSA = "cert-ecdsa"
    CERT_ED25519 = "cert-ed25519"
    PLAIN = "plain"

    @property
    def is_certificate(self) -> bool:
        return self in (SecretType.CERT_RSA, SecretType.CERT_ECDSA, SecretType.CERT_ED25519)


class SealMode(enum.Enum):
    PRODUCT_KEY = "ProductKey"  # also what "" means
    UNIQUE_KEY = "UniqueKey"
    DISABLED = "Disabled"


@dataclass(frozen=True)
class FileEntry:
    """One ``Parameters.Files`` or ``Parameters.Env`` entry, already decoded from its Encoding."""

    data: bytes
    encoding: str = "string"  # "string" | "base64" | "hex", lower-case, as written (for re-encoding)
    no_templates: bool = False


@dataclass(frozen=True)
class Parameters:
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    env: Mapping[str, FileEntry] = field(default_factory=dict)
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class TdxPackage:
    """marblekeep extension: the TDX measurements a package accepts (hex strings, lower-case).

    ``None`` means "not checked". Written in the manifest as ``Packages.<name>.TDX``.
    """

    mrtd: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None
    mrseam: str | None = None


@dataclass(frozen=True)
class Package:
    debug: bool = False
    unique_id: str = ""
    signer_id: str = ""
    product_id: int | None = None
    security_version: int | None = None
    accepted_tcb_statuses: tuple[str, ...] = ()
    accepted_advisories: tuple[str, ...] = ()
    tdx: TdxPackage | None = None  # set => this package describes a TDX guest, not an SGX enclave

    @property
    def effective_tcb_statuses(self) -> tuple[str, ...]:
        """The accepted statuses with MarbleRun's default applied (``UpToDate`` is implicit)."""
        return self.accepted_tcb_statuses or DEFAULT_ACCEPTED_TCB_STATUSES


@dataclass(frozen=True)
class Marble:
    package: str
    max_activations: int = 0  # 0 = unlimited
    parameters: Parameters = field(default_factory=Parameters)
    tls: tuple[str, ...] = ()
    disable_secret_binding: bool = False


@dataclass(frozen=True)
class CertTemplate:
    """The subset of Go's ``x509.Certificate`` that a manifest's ``Secrets.<n>.Cert`` object sets."""

    common_name: str = ""
    organization: tuple[str, ...] = ()
    organizational_unit: tuple[str, ...] = ()
    country: tuple[str, ...] = ()
    province: tuple[str, ...] = ()
    locality: tuple[str, ...] = ()
    street_address: tuple[str, ...] = ()
    postal_code: tuple[str, ...] = ()
    serial_number: str = ""  # Subject.SerialNumber (a name attribute, not the certificate serial)
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    email_addresses: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    key_usage: int = 0  # Go x509.KeyUsage bitmask
    ext_key_usage: tuple[int, ...] = ()  # Go x509.ExtKeyUsage values
    is_ca: bool = False
    max_path_len: int = 0
    max_path_len_zero: bool = False
    not_after: dt.datetime | None = None


@dataclass(frozen=True)
class Secret:
    """A secret: its definition and (once generated or uploaded) its value.

    For ``symmetric-key`` and ``plain``: ``public == private ==`` the key bytes.
    For certificates: ``cert`` is DER, ``public`` is PKIX DER, ``private`` is PKCS#8 DER.
    Empty bytes / ``None`` mean "no value yet" (an unset user-defined secret).
    """

    type: SecretType
    size: int = 0
    shared: bool = False
    user_defined: bool = False
    valid_for: int = 0
    cert_template: CertTemplate | None = None
    cert: bytes | None = None
    private: bytes = b""
    public: bytes = b""

    @property
    def has_value(self) -> bool:
        return bool(self.public or self.private or self.cert)


@dataclass(frozen=True)
class User:
    certificate: str  # PEM as written; only the first block is used
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    resource_type: str  # "Packages" | "Secrets" | "Manifest"
    resource_names: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()  # as written; compare case-insensitively


@dataclass(frozen=True)
class TLSTagEntry:
    addr: str = ""
    port: str = ""
    cert: str = ""
    disable_client_auth: bool = False


@dataclass(frozen=True)
class TLSTag:
    outgoing: tuple[TLSTagEntry, ...] = ()
    incoming: tuple[TLSTagEntry, ...] = ()


@dataclass(frozen=True)
class Config:
    seal_mode: SealMode = SealMode.PRODUCT_KEY
    feature_gates: tuple[str, ...] = ()  # canonical spelling: SignQuoteEndpoint, MonotonicCounter, ...
    update_threshold: int = 0
    recovery_threshold: int = 0
    rotate_root_secret: bool = False

    def feature_enabled(self, gate: str) -> bool:
        return any(g.lower() == gate.lower() for g in self.feature_gates)


@dataclass(frozen=True)
class Infrastructure:
    """``Infrastructures.<name>``: parsed for compatibility; MarbleRun does not check its content."""

    cpusvn: bytes | None = None
    qesvn: int | None = None
    pcesvn: int | None = None
    root_ca: bytes | None = None


@dataclass(frozen=True)
class Manifest:
    raw: bytes  # exactly the (YAML→JSON converted) bytes uploaded
    packages: Mapping[str, Package]
    marbles: Mapping[str, Marble]
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    users: Mapping[str, User] = field(default_factory=dict)
    roles: Mapping[str, Role] = field(default_factory=dict)
    recovery_keys: Mapping[str, str] = field(default_factory=dict)  # name -> PEM
    tls: Mapping[str, TLSTag] = field(default_factory=dict)
    config: Config = field(default_factory=Config)
    infrastructures: Mapping[str, object] = field(default_factory=dict)
