"""The Coordinator's PKI: root CA, intermediate / Marble root, and Marble leaf certificates.

Pure: no clock, no files. ``now`` is always a parameter (tz-aware UTC); serial numbers come from
an injectable ``rng`` (default :func:`os.urandom`); key pairs come from ``cryptography``.

The hierarchy (MarbleRun-compatible, see docs/key-hierarchy.md)::

    root CA  "MarbleRun Coordinator"                      fresh P-384, self-signed, never rotated
      └── intermediate "MarbleRun Coordinator - Intermediate CA"   key K, signed by the root
    Marble root "MarbleRun Coordinator - Intermediate CA"  the SAME key K, self-signed
      └── Marble leaf  CN=<uuid>                           fresh P-384 per activation, signed by K

A leaf therefore verifies against the Marble root directly, or against the root CA through the
intermediate. Every Coordinator signature is ECDSA P-384 with SHA-384; every serial is uniformly
random in ``[1, 2^128)``; validity runs from ``now`` for ``2^63 - 1`` nanoseconds (≈292 years),
as MarbleRun's Go code does.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from marblekeep.errors import AuthenticationError, ConfigError, IntegrityError, RequestError

__all__ = [
    "DEFAULT_IPS",
    "INTERMEDIATE_COMMON_NAME",
    "MARBLE_TYPE_OID",
    "MAX_VALIDITY",
    "ROOT_COMMON_NAME",
    "CertifiedKey",
    "IssuedLeaf",
    "LeafIssuer",
    "Rng",
    "create_intermediate",
    "create_root_ca",
    "der_to_pem",
    "leaf_floor",
    "marble_identity",
    "random_serial",
]

Rng = Callable[[int], bytes]

ROOT_COMMON_NAME = "MarbleRun Coordinator"
INTERMEDIATE_COMMON_NAME = "MarbleRun Coordinator - Intermediate CA"
#: Non-critical extension on Marble leaves; its extnValue is the raw UTF-8 Marble type (not DER-wrapped).
MARBLE_TYPE_OID = x509.ObjectIdentifier("1.3.9903.2.1")
#: Go's ``time.Time.Add(math.MaxInt64)``: 2^63-1 ns, truncated to microseconds (certificates keep seconds).
MAX_VALIDITY = dt.timedelta(microseconds=(2**63 - 1) // 1000)
#: IP SANs every Coordinator CA and every Marble leaf carries.
DEFAULT_IPS: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (
    ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("::1"),
)

_CURVE = ec.SECP384R1()
_SIGN_HASH = hashes.SHA384()
_EKU_SERVER_CLIENT = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_KU_CA = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_KU_LEAF = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
# DER prefix of a P-384 SubjectPublicKeyInfo:
# SEQUENCE(118) { AlgId{ecPublicKey, secp384r1}, BIT STRING(98) 00 ...}.
# The 97-byte uncompressed point follows. Used to lift the leaf's SPKI out of its certificate without a
# second (slow) re-encoding through OpenSSL; a test pins it against cryptography's own serialisation.
_P384_SPKI_PREFIX = bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200")
_P384_SPKI_LEN = len(_P384_SPKI_PREFIX) + 97
_IP_CHARS = frozenset("0123456789abcdefABCDEF.:")


def random_serial(rng: Rng = os.urandom) -> int:
    """A certificate serial number drawn uniformly from ``[1, 2^128)``."""
    while True:
        serial = int.from_bytes(rng(16), "big")
        if serial:
            return serial


def der_to_pem(der: bytes, label: str) -> bytes:
    """PEM-armour DER bytes (64-character lines, trailing newline), as Go's ``pem.Encode`` does."""
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    head = f"-----BEGIN {label}-----\n".encode()
    tail = f"-----END {label}-----\n".encode()
    return head + b"\n".join(lines) + (b"\n" if lines else b"") + tail


def _utc(now: dt.datetime) -> dt.datetime:
    assert now.tzinfo is not None, "now must be timezone-aware (UTC)"
    return now.astimezone(dt.UTC)


def _cn(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key (P-384), with the DER and PEM forms computed once."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert_der: bytes = field(init=False, repr=False)
    cert_pem: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        object.__setattr__(self, "cert_der", der)
        object.__setattr__(self, "cert_pem", der_to_pem(der, "CERTIFICATE"))

    def key_pkcs8_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER (for the encrypted state store only)."""
        return self.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_der(cls, cert_der: bytes, key_der: bytes) -> CertifiedKey:
        """Load a stored certificate + PKCS#8 key pair; checks the key is P-384 and matches the cert.

        Raises :class:`IntegrityError` when the stored bytes do not form such a pair.
        """
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise IntegrityError(
                "stored CA certificate or key cannot be parsed: the state is damaged; restore a backup"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
            raise IntegrityError(
                "stored CA key is not a P-384 ECDSA key: the state is damaged; restore a backup"
            )
        if cert.public_key() != key.public_key():
            raise IntegrityError(
                "stored CA key does not match its certificate: the state is damaged; restore a backup"
            )
        return cls(cert, key)


def _split_names(
    names: Sequence[str], what: str, error: type[ConfigError] | type[RequestError]
) -> tuple[list[x509.GeneralName], list[x509.GeneralName]]:
    """Split host names into (DNS SANs, IP SANs); the IP list starts with 127.0.0.1 and ::1."""
    dns: list[x509.GeneralName] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = list(DEFAULT_IPS)
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise error(f"{what}[{index}]: a DNS name or IP address must be a non-empty string")
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        if _IP_CHARS.issuperset(name):  # cheap pre-check: parsing raises (slowly) for most host names
            try:
                ip = ipaddress.ip_address(name)
            except ValueError:
                ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            ip = None  # Go's net.ParseIP rejects zones: such an entry is a (strange) DNS name
        if ip is not None:
            if ip not in ips:
                ips.append(ip)
            continue
        if len(name) > 253 or not (name.isascii() and name.isprintable()) or " " in name:
            raise error(
                f"{what}[{index}]: {name[:64]!r} is not a valid DNS name "
                "(printable ASCII without spaces, at most 253 characters)"
            )
        dns.append(x509.DNSName(name))
    return dns, [x509.IPAddress(ip) for ip in ips]


def _ca_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    issuer_ski: x509.SubjectKeyIdentifier | None,
    san: x509.SubjectAlternativeName,
    now: dt.datetime,
    rng: Rng,
) -> x509.Certificate:
    # Extension order follows Go's x509.CreateCertificate: KU, EKU, BC, SKI, AKI, SAN.
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial(rng))
        .not_valid_before(now)
        .not_valid_after(now + MAX_VALIDITY)
        .add_extension(_KU_CA, critical=True)
        .add_extension(_EKU_SERVER_CLIENT, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer_ski is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
        )
    builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, _SIGN_HASH)


def _ca_san(dns_names: Sequence[str]) -> x509.SubjectAlternativeName:
    dns, ips = _split_names(dns_names, "Coordinator DNS names", ConfigError)
    return x509.SubjectAlternativeName([*dns, *ips])


def create_root_ca(dns_names: Sequence[str], now: dt.datetime, *, rng: Rng = os.urandom) -> CertifiedKey:
    """The Coordinator root CA: fresh P-384 key, ``CN=MarbleRun Coordinator``, self-signed.

    SANs: the non-IP entries of ``dns_names`` as DNS names; IPs 127.0.0.1, ::1, then the IP entries.
    Raises :class:`ConfigError` for an empty or non-ASCII name.
    """
    now = _utc(now)
    san = _ca_san(dns_names)
    key = ec.generate_private_key(_CURVE)
    name = _cn(ROOT_COMMON_NAME)
    cert = _ca_certificate(
        subject=name,
        issuer=name,
        public_key=key.public_key(),
        signer=key,
        issuer_ski=None,
        san=san,
        now=now,
        rng=rng,
    )
    return CertifiedKey(cert, key)


def _subject_key_identifier(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def create_intermediate(
    root: CertifiedKey, dns_names: Sequence[str], now: dt.datetime, *, rng: Rng = os.urandom
) -> tuple[CertifiedKey, CertifiedKey]:
    """A fresh P-384 key K and two certificates for it: ``(intermediate, marble_root)``.

    The intermediate is signed by ``root`` (AKI = root SKI); the Marble root has the same subject
    (``CN=MarbleRun Coordinator - Intermediate CA``) and is self-signed. Both carry the CA extensions
    of the root and the SANs built from ``dns_names``.
    """
    now = _utc(now)
    san = _ca_san(dns_names)
    key = ec.generate_private_key(_CURVE)
    public_key = key.public_key()
    name = _cn(INTERMEDIATE_COMMON_NAME)
    intermediate = _ca_certificate(
        subject=name,
        issuer=root.cert.subject,
        public_key=public_key,
        signer=root.key,
        issuer_ski=_subject_key_identifier(root.cert),
        san=san,
        now=now,
        rng=rng,
    )
    marble_root = _ca_certificate(
        subject=name,
        issuer=name,
        public_key=public_key,
        signer=key,
        issuer_ski=None,
        san=san,
        now=now,
        rng=rng,
    )
    return CertifiedKey(intermediate, key), CertifiedKey(marble_root, key)


@dataclass(frozen=True)
class IssuedLeaf:
    """A Marble's TLS credentials, in the encodings activation hands out."""

    cert_der: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pkcs8_der: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    public_der: bytes = field(repr=False)


class LeafIssuer:
    """Issues Marble leaf certificates under one Marble root; build once per root, reuse per activation.

    Everything that does not depend on the Marble (issuer name, AKI, key usages, basic constraints)
    is prepared here, so :meth:`issue` costs one P-384 key generation, one signature and one key
    serialisation.
    """

    def __init__(self, marble_root: CertifiedKey, *, rng: Rng = os.urandom) -> None:
        self._signer = marble_root.key
        self._rng = rng
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            _subject_key_identifier(marble_root.cert)
        )
        # Extension order follows Go: KU, EKU, BC, AKI, SAN, then the extra Marble-type extension.
        self._base = (
            x509.CertificateBuilder()
            .issuer_name(marble_root.cert.subject)
            .add_extension(_KU_LEAF, critical=True)
            .add_extension(_EKU_SERVER_CLIENT, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(aki, critical=False)
        )

    def issue(
        self,
        uuid: UUID,
        marble_type: str,
        dns_names: Sequence[str],
        now: dt.datetime,
        *,
        subject: x509.Name | None = None,
    ) -> IssuedLeaf:
        """A fresh key and certificate ``CN=<uuid>`` for one activation of a Marble of ``marble_type``.

        ``dns_names`` are the Marble's host names; entries that parse as IP addresses become IP SANs,
        and 127.0.0.1 and ::1 are always present. ``subject`` replaces the plain ``CN=<uuid>``
        (MarbleRun's protocol takes further subject attributes from the Marble's CSR; the caller
        puts the UUID in it). Raises :class:`RequestError` for a bad name.
        """
        dns, ips = _split_names(dns_names, "dns_names", RequestError)
        now = _utc(now)
        key = ec.generate_private_key(_CURVE)
        cert = (
            self._base.subject_name(subject if subject is not None else _cn(str(uuid)))
            .public_key(key.public_key())
            .serial_number(random_serial(self._rng))
            .not_valid_before(now)
            .not_valid_after(now + MAX_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([*dns, *ips]), critical=False)
            .add_extension(
                x509.UnrecognizedExtension(MARBLE_TYPE_OID, marble_type.encode("utf-8")), critical=False
            )
            .sign(self._signer, _SIGN_HASH)
        )
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        key_der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # The first occurrence of the SPKI prefix is the subject key: nothing before it in the TBS
        # (a 16-byte serial, ASCII names, ASCII times) can hold these 23 bytes.
        at = cert_der.find(_P384_SPKI_PREFIX)
        assert at >= 0
        return IssuedLeaf(
            cert_der=cert_der,
            cert_pem=der_to_pem(cert_der, "CERTIFICATE"),
            key_pkcs8_der=key_der,
            key_pem=der_to_pem(key_der, "PRIVATE KEY"),
            public_der=cert_der[at : at + _P384_SPKI_LEN],
        )


def leaf_floor(issuer_key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> None:
    """The unavoidable work of one leaf: a P-384 key generation and one signature of a minimal
    certificate. For benchmarks: :meth:`LeafIssuer.issue` is measured against this."""
    key = ec.generate_private_key(_CURVE)
    name = _cn("floor")
    (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + MAX_VALIDITY)
        .sign(issuer_key, _SIGN_HASH)
    )


def marble_identity(cert: x509.Certificate, marble_root: x509.Certificate) -> tuple[str, UUID]:
    """The ``(marble_type, uuid)`` of a Marble leaf certificate issued under ``marble_root``.

    Checks the signature against the Marble root (validity is not checked, as in MarbleRun), that
    the CN is a UUID and that the Marble-type extension is present. Raises
    :class:`AuthenticationError` otherwise.
    """
    try:
        cert.verify_directly_issued_by(marble_root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticationError(
            "client certificate was not issued by the current Marble root: activate the Marble again"
        ) from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        value = cns[0].value if cns else ""
        uuid = UUID(value if isinstance(value, str) else value.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthenticationError("client certificate's common name is not a Marble UUID") from exc
    try:
        ext = cert.extensions.get_extension_for_oid(MARBLE_TYPE_OID).value
    except x509.ExtensionNotFound as exc:
        raise AuthenticationError("client certificate lacks the Marble type extension 1.3.9903.2.1") from exc
    assert isinstance(ext, x509.UnrecognizedExtension)
    try:
        marble_type = ext.value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthenticationError("client certificate's Marble type is not UTF-8") from exc
    return marble_type, uuid
