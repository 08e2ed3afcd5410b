"""Secret generation and derivation (MarbleRun's ``GenerateSecrets``, plus the virtual seal key).

Pure: randomness comes from an injectable ``rng`` (default :func:`os.urandom`), time from ``now``.

- Shared ``symmetric-key``: ``Size/8`` random bytes, generated once (at SetManifest).
- Per-Marble ``symmetric-key``: HKDF-SHA256(IKM = root secret, salt = canonical UUID string ||
  secret name, info = Marble type or ``b""`` with DisableSecretBinding, L = Size/8).
- Seal key: HKDF-SHA256(IKM = seal master secret, salt = 16 raw UUID bytes, info = ``b""``, L = 32).
- ``cert-rsa`` / ``cert-ecdsa`` / ``cert-ed25519``: a fresh key and a certificate issued by the
  Marble root (issuer name) and signed ECDSA-SHA384 by the intermediate key.
- ``UserDefined`` secrets are never generated here; a generated ``plain`` secret is an error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
from collections.abc import Mapping, Sequence
from uuid import UUID

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from marblekeep.crypto.pki import CertifiedKey, Rng, random_serial
from marblekeep.errors import ActivationRefused, IntegrityError, ManifestError, Problem
from marblekeep.manifest.model import CertTemplate, Secret, SecretType

__all__ = [
    "DEFAULT_CERT_COMMON_NAME",
    "DEFAULT_KEY_USAGE",
    "DEFAULT_VALID_FOR_DAYS",
    "ECDSA_CURVES",
    "GO_EXT_KEY_USAGES",
    "MAX_SYMMETRIC_KEY_BITS",
    "MIN_RSA_BITS",
    "cert_template_from_certificate",
    "derive_marble_key",
    "derive_seal_key",
    "generate_cert_secret",
    "generate_marble_secrets",
    "generate_shared_secrets",
    "generate_symmetric_key",
    "legacy_root_secret",
]

DEFAULT_VALID_FOR_DAYS = 365
DEFAULT_CERT_COMMON_NAME = "MarbleRun Generated Certificate"
DEFAULT_KEY_USAGE = 1 | 32  # Go: DigitalSignature | CertSign
#: HKDF-SHA256 can output at most 255 * 32 bytes; we apply the same cap to shared keys.
MAX_SYMMETRIC_KEY_BITS = 255 * 32 * 8
#: Go refuses RSA below 1024 bits; MarbleRun runs in FIPS mode, where 2048 is the floor.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
ECDSA_CURVES: Mapping[int, ec.EllipticCurve] = {
    224: ec.SECP224R1(),
    256: ec.SECP256R1(),
    384: ec.SECP384R1(),
    521: ec.SECP521R1(),
}
#: Go's ``x509.ExtKeyUsage`` values (what manifests write) → OIDs.
GO_EXT_KEY_USAGES: Mapping[int, ObjectIdentifier] = {
    0: ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    1: ExtendedKeyUsageOID.SERVER_AUTH,
    2: ExtendedKeyUsageOID.CLIENT_AUTH,
    3: ExtendedKeyUsageOID.CODE_SIGNING,
    4: ExtendedKeyUsageOID.EMAIL_PROTECTION,
    5: ObjectIdentifier("1.3.6.1.5.5.7.3.5"),  # IPSECEndSystem
    6: ObjectIdentifier("1.3.6.1.5.5.7.3.6"),  # IPSECTunnel
    7: ObjectIdentifier("1.3.6.1.5.5.7.3.7"),  # IPSECUser
    8: ExtendedKeyUsageOID.TIME_STAMPING,
    9: ExtendedKeyUsageOID.OCSP_SIGNING,
    10: ObjectIdentifier("1.3.6.1.4.1.311.10.3.3"),  # MicrosoftServerGatedCrypto
    11: ObjectIdentifier("2.16.840.1.113730.4.1"),  # NetscapeServerGatedCrypto
    12: ObjectIdentifier("1.3.6.1.4.1.311.2.1.22"),  # MicrosoftCommercialCodeSigning
    13: ObjectIdentifier("1.3.6.1.4.1.311.61.1.1"),  # MicrosoftKernelCodeSigning
}
_EKU_BY_OID = {oid: value for value, oid in GO_EXT_KEY_USAGES.items()}
# Go x509.KeyUsage bits, in cryptography's KeyUsage argument order.
_KU_BITS = (
    ("digital_signature", 1),
    ("content_commitment", 2),
    ("key_encipherment", 4),
    ("data_encipherment", 8),
    ("key_agreement", 16),
    ("key_cert_sign", 32),
    ("crl_sign", 64),
    ("encipher_only", 128),
    ("decipher_only", 256),
)
_KU_ALL = 511
_DEFAULT_IPS = ("127.0.0.1", "::1")
# Go's pkix.Name.ToRDNSequence order; multi-valued attributes form one multi-valued RDN.
_NAME_FIELDS = (
    ("country", NameOID.COUNTRY_NAME),
    ("province", NameOID.STATE_OR_PROVINCE_NAME),
    ("locality", NameOID.LOCALITY_NAME),
    ("street_address", NameOID.STREET_ADDRESS),
    ("postal_code", NameOID.POSTAL_CODE),
    ("organization", NameOID.ORGANIZATION_NAME),
    ("organizational_unit", NameOID.ORGANIZATIONAL_UNIT_NAME),
)
_SECRET_HASH = hashes.SHA384()


# --------------------------------------------------------------------------- symmetric keys


def _symmetric_size(size_bits: int, where: str) -> int:
    if size_bits <= 0 or size_bits % 8:
        raise ManifestError(
            f"{where}: a symmetric key needs a Size that is a nonzero multiple of 8 bits, got {size_bits}",
            problems=[Problem(where, "set Size to a nonzero multiple of 8, e.g. 128 or 256")],
        )
    if size_bits > MAX_SYMMETRIC_KEY_BITS:
        raise ManifestError(
            f"{where}: a symmetric key can have at most {MAX_SYMMETRIC_KEY_BITS} bits, got {size_bits}",
            problems=[Problem(where, f"set Size to at most {MAX_SYMMETRIC_KEY_BITS}")],
        )
    return size_bits // 8


def generate_symmetric_key(size_bits: int, rng: Rng = os.urandom) -> bytes:
    """``size_bits/8`` bytes from ``rng``; ``size_bits`` must be a nonzero multiple of 8."""
    return _random_key("Size", size_bits, rng)


def _random_key(where: str, size_bits: int, rng: Rng) -> bytes:
    length = _symmetric_size(size_bits, where)
    key = rng(length)
    if len(key) != length:
        raise IntegrityError("the random source returned fewer bytes than requested")
    return key


def _reject_nil(uuid: UUID) -> None:
    if uuid.int == 0:
        raise ActivationRefused(
            "the nil UUID 00000000-0000-0000-0000-000000000000 is not a valid Marble UUID"
        )


def derive_marble_key(
    root_secret: bytes,
    uuid: UUID,
    secret_name: str,
    marble_type: str,
    size_bits: int,
    *,
    disable_binding: bool,
) -> bytes:
    """A per-Marble symmetric key, deterministic in (root secret, UUID, name, type).

    HKDF-SHA256 with IKM = ``root_secret``, salt = ``str(uuid)`` (lower-case, hyphenated) followed by
    the UTF-8 secret name, info = the UTF-8 Marble type (``b""`` when ``disable_binding``),
    L = ``size_bits / 8`` (at most 255 * 32 bytes).
    """
    length = _symmetric_size(size_bits, f"Secrets.{secret_name}.Size")
    _reject_nil(uuid)
    if len(root_secret) < 32:
        raise IntegrityError("the stored root secret is shorter than 32 bytes: the state is damaged")
    salt = str(uuid).encode("ascii") + secret_name.encode("utf-8")
    info = b"" if disable_binding else marble_type.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(root_secret)


def derive_seal_key(seal_master_secret: bytes, uuid: UUID) -> bytes:
    """A Marble's 32-byte virtual sealing key.

    HKDF-SHA256 with IKM = the 32-byte seal master secret, salt = the 16 raw UUID bytes
    (``uuid.bytes``, big-endian RFC 4122 order), info = ``b""``, L = 32. Two Marbles that claim the
    same UUID get the same key.
    """
    _reject_nil(uuid)
    if len(seal_master_secret) != 32:
        raise IntegrityError("the stored seal master secret is not 32 bytes: the state is damaged")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=uuid.bytes, info=b"").derive(seal_master_secret)


def legacy_root_secret(root_key: ec.EllipticCurvePrivateKey) -> bytes:
    """MarbleRun's fallback IKM for state without a root secret (pre v1.9.0): the root CA's private
    scalar as a fixed-length big-endian value (48 bytes for P-384), as MarbleRun does since Mar 2026."""
    size = (root_key.curve.key_size + 7) // 8
    return root_key.private_numbers().private_value.to_bytes(size, "big")


# --------------------------------------------------------------------------- certificate secrets


def _name_from_template(template: CertTemplate) -> x509.Name:
    rdns: list[x509.RelativeDistinguishedName] = []
    for attr, oid in _NAME_FIELDS:
        values: tuple[str, ...] = getattr(template, attr)
        if values:
            rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, v) for v in values]))
    for value, oid in (
        (template.common_name, NameOID.COMMON_NAME),
        (template.serial_number, NameOID.SERIAL_NUMBER),
    ):
        if value:
            rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)]))
    return x509.Name(rdns)


def _key_usage(bits: int, where: str) -> x509.KeyUsage:
    if bits < 0 or bits & ~_KU_ALL:
        raise ManifestError(
            f"{where}: KeyUsage {bits} has bits outside Go's x509.KeyUsage (1..256)",
            problems=[Problem(where, "use a sum of 1, 2, 4, 8, 16, 32, 64, 128, 256")],
        )
    flags = {name: bool(bits & bit) for name, bit in _KU_BITS}
    if (flags["encipher_only"] or flags["decipher_only"]) and not flags["key_agreement"]:
        raise ManifestError(
            f"{where}: EncipherOnly (128) and DecipherOnly (256) need KeyAgreement (16)",
            problems=[Problem(where, "add 16 (KeyAgreement) or drop 128/256")],
        )
    return x509.KeyUsage(**flags)


def _ext_key_usage(values: Sequence[int], where: str) -> x509.ExtendedKeyUsage:
    oids: list[ObjectIdentifier] = []
    for index, value in enumerate(values):
        oid = GO_EXT_KEY_USAGES.get(value)
        if oid is None:
            raise ManifestError(
                f"{where}[{index}]: unknown ExtKeyUsage {value}",
                problems=[Problem(f"{where}[{index}]", "use one of Go's x509.ExtKeyUsage values 0..13")],
            )
        oids.append(oid)
    return x509.ExtendedKeyUsage(oids)


def _general_names(template: CertTemplate, dns_names: Sequence[str], where: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    try:
        names.extend(x509.DNSName(n) for n in dns_names)
        names.extend(x509.RFC822Name(e) for e in template.email_addresses)
    except (ValueError, TypeError) as exc:
        raise ManifestError(
            f"{where}.DNSNames/EmailAddresses: a name is not valid ASCII",
            problems=[Problem(f"{where}.DNSNames", "use ASCII (IDNA-encoded) names")],
        ) from exc
    ips = template.ip_addresses or _DEFAULT_IPS
    for index, ip in enumerate(ips):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise ManifestError(
                f"{where}.IPAddresses[{index}]: {ip[:64]!r} is not an IP address",
                problems=[Problem(f"{where}.IPAddresses[{index}]", "write an IPv4 or IPv6 address")],
            ) from exc
    for index, uri in enumerate(template.uris):
        try:
            names.append(x509.UniformResourceIdentifier(uri))
        except (ValueError, TypeError) as exc:
            raise ManifestError(
                f"{where}.URIs[{index}]: not a valid URI",
                problems=[Problem(f"{where}.URIs[{index}]", "write an ASCII URI")],
            ) from exc
    return names


def _generate_key(
    secret: Secret, where: str
) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if secret.type is SecretType.CERT_ECDSA:
        curve = ECDSA_CURVES.get(secret.size)
        if curve is None:
            raise ManifestError(
                f"{where}.Size: cert-ecdsa needs Size 224, 256, 384 or 521, got {secret.size}",
                problems=[Problem(f"{where}.Size", "set Size to 224, 256, 384 or 521")],
            )
        return ec.generate_private_key(curve)
    if secret.type is SecretType.CERT_RSA:
        if not MIN_RSA_BITS <= secret.size <= MAX_RSA_BITS:
            raise ManifestError(
                f"{where}.Size: cert-rsa needs Size between {MIN_RSA_BITS} and {MAX_RSA_BITS}, "
                f"got {secret.size}",
                problems=[Problem(f"{where}.Size", "set Size to 2048, 3072 or 4096")],
            )
        return rsa.generate_private_key(public_exponent=65537, key_size=secret.size)
    if secret.type is SecretType.CERT_ED25519:
        if secret.size != 0:
            raise ManifestError(
                f"{where}.Size: cert-ed25519 takes no Size, got {secret.size}",
                problems=[Problem(f"{where}.Size", "remove Size (or set it to 0)")],
            )
        return ed25519.Ed25519PrivateKey.generate()
    raise ManifestError(
        f"{where}.Type: {secret.type.value} is not a certificate type",
        problems=[Problem(f"{where}.Type", "use cert-rsa, cert-ecdsa or cert-ed25519")],
    )


def cert_template_from_certificate(cert: x509.Certificate) -> CertTemplate:
    """The template fields of an existing certificate (how a stored certificate acts as template)."""

    def values(oid: ObjectIdentifier) -> tuple[str, ...]:
        return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(oid))

    cn = values(NameOID.COMMON_NAME)
    serial = values(NameOID.SERIAL_NUMBER)
    exts = cert.extensions
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    try:
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        pass
    key_usage = 0
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        for name, bit in _KU_BITS:
            if name in ("encipher_only", "decipher_only") and not ku.key_agreement:
                continue
            if getattr(ku, name):
                key_usage |= bit
    except x509.ExtensionNotFound:
        pass
    ext_key_usage: tuple[int, ...] = ()
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
        ext_key_usage = tuple(_EKU_BY_OID[oid] for oid in eku if oid in _EKU_BY_OID)
    except x509.ExtensionNotFound:
        pass
    is_ca = False
    max_path_len = 0
    max_path_len_zero = False
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
        if bc.path_length is not None:
            max_path_len = bc.path_length
            max_path_len_zero = bc.path_length == 0
    except x509.ExtensionNotFound:
        pass
    return CertTemplate(
        common_name=cn[0] if cn else "",
        organization=values(NameOID.ORGANIZATION_NAME),
        organizational_unit=values(NameOID.ORGANIZATIONAL_UNIT_NAME),
        country=values(NameOID.COUNTRY_NAME),
        province=values(NameOID.STATE_OR_PROVINCE_NAME),
        locality=values(NameOID.LOCALITY_NAME),
        street_address=values(NameOID.STREET_ADDRESS),
        postal_code=values(NameOID.POSTAL_CODE),
        serial_number=serial[0] if serial else "",
        dns_names=dns,
        ip_addresses=ips,
        email_addresses=emails,
        uris=uris,
        key_usage=key_usage,
        ext_key_usage=ext_key_usage,
        is_ca=is_ca,
        max_path_len=max_path_len,
        max_path_len_zero=max_path_len_zero,
        not_after=cert.not_valid_after_utc,
    )


def _issuer_aki(issuer: CertifiedKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


def _cert_secret(
    name: str,
    secret: Secret,
    issuer: CertifiedKey,
    now: dt.datetime,
    *,
    keep_not_after: bool,
    rng: Rng,
) -> Secret:
    where = f"Secrets.{name}" if name else "Secret"
    assert now.tzinfo is not None, "now must be timezone-aware (UTC)"
    now = now.astimezone(dt.UTC)
    if secret.cert:
        try:
            template = cert_template_from_certificate(x509.load_der_x509_certificate(secret.cert))
        except ValueError as exc:
            raise IntegrityError(
                f"{where}: the stored certificate cannot be parsed: the state is damaged"
            ) from exc
    else:
        template = secret.cert_template or CertTemplate()
    key = _generate_key(secret, where)

    # Defaults (reference §3.3), applied when a field is empty.
    dns_names = template.dns_names or ("localhost",)
    common_name = template.common_name or (dns_names[0] if len(dns_names) == 1 else DEFAULT_CERT_COMMON_NAME)
    key_usage = template.key_usage or DEFAULT_KEY_USAGE
    ext_key_usage = template.ext_key_usage or (1, 2)

    valid_for = secret.valid_for
    if template.not_after is None:
        valid_for = valid_for or DEFAULT_VALID_FOR_DAYS
        not_after = now + dt.timedelta(days=valid_for)
    elif valid_for and (not keep_not_after or template.not_after <= now):
        # A kept NotAfter that has already passed is renewed from ValidFor instead of minting an
        # expired certificate (MarbleRun would keep it).
        not_after = now + dt.timedelta(days=valid_for)
    else:
        not_after = template.not_after
    if not_after <= now:
        raise ManifestError(
            f"{where}.Cert.NotAfter lies in the past",
            problems=[Problem(f"{where}.Cert.NotAfter", "set a future date, or use ValidFor (days)")],
        )

    path_length: int | None = None
    if template.is_ca and (template.max_path_len > 0 or template.max_path_len_zero):
        path_length = max(template.max_path_len, 0)

    try:
        subject = _name_from_template(dataclasses.replace(template, common_name=common_name))
    except ValueError as exc:
        raise ManifestError(
            f"{where}.Cert.Subject: an attribute has an invalid value (e.g. Country must be 2 letters)",
            problems=[Problem(f"{where}.Cert.Subject", "fix the subject attribute values")],
        ) from exc
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(random_serial(rng))
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(_key_usage(key_usage, f"{where}.Cert.KeyUsage"), critical=True)
        .add_extension(_ext_key_usage(ext_key_usage, f"{where}.Cert.ExtKeyUsage"), critical=False)
        .add_extension(x509.BasicConstraints(ca=template.is_ca, path_length=path_length), critical=True)
    )
    if template.is_ca:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    builder = builder.add_extension(_issuer_aki(issuer), critical=False)
    builder = builder.add_extension(
        x509.SubjectAlternativeName(_general_names(template, dns_names, f"{where}.Cert")), critical=False
    )
    cert = builder.sign(issuer.key, _SECRET_HASH)
    return dataclasses.replace(
        secret,
        valid_for=valid_for,
        cert=cert.public_bytes(serialization.Encoding.DER),
        private=key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        public=public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def generate_cert_secret(
    secret: Secret,
    issuer: CertifiedKey,
    now: dt.datetime,
    *,
    keep_not_after: bool,
    rng: Rng = os.urandom,
    name: str = "",
) -> Secret:
    """A fresh key and certificate for a ``cert-*`` secret; returns ``secret`` with the value set.

    ``issuer`` is the Marble root (its subject is the issuer name; its key, which is the
    intermediate key, signs with ECDSA-SHA384). The template is the stored certificate when
    ``secret.cert`` is set (MarbleRun's per-Marble placeholder and package-update path), otherwise
    ``secret.cert_template``. Defaults for empty fields: DNSNames ``["localhost"]``, IPs 127.0.0.1
    and ::1, KeyUsage DigitalSignature|CertSign, ExtKeyUsage ServerAuth+ClientAuth, CN = the single
    DNS name or ``"MarbleRun Generated Certificate"``.

    Validity: NotBefore = ``now``. Without a template NotAfter: ``now + ValidFor`` days (365 when 0,
    and the returned ``valid_for`` becomes 365). With one: kept when ``keep_not_after`` (shared
    secrets) or ValidFor is 0, else reset to ``now + ValidFor``.
    Raises :class:`ManifestError` naming the field for a bad definition; ``name`` prefixes paths.
    """
    return _cert_secret(name, secret, issuer, now, keep_not_after=keep_not_after, rng=rng)


def _not_generated(name: str) -> ManifestError:
    return ManifestError(
        f"Secrets.{name}: unsupported secret of type plain (only user-defined secrets can be plain)",
        problems=[Problem(f"Secrets.{name}.UserDefined", "set UserDefined: true for plain secrets")],
    )


def generate_shared_secrets(
    defs: Mapping[str, Secret],
    issuer: CertifiedKey,
    now: dt.datetime,
    rng: Rng = os.urandom,
) -> dict[str, Secret]:
    """Values for every shared, non-user-defined secret in ``defs`` (others are left out).

    Symmetric keys: ``Size/8`` bytes from ``rng``. Certificates: issued now; a stored certificate
    (``cert`` set) is the template and its NotAfter is kept (package updates); pass the manifest
    definition without ``cert`` to regenerate from the manifest template (full updates).
    """
    out: dict[str, Secret] = {}
    for name, secret in defs.items():
        if secret.user_defined or not secret.shared:
            continue
        if secret.type is SecretType.SYMMETRIC_KEY:
            key = _random_key(f"Secrets.{name}.Size", secret.size, rng)
            out[name] = dataclasses.replace(secret, cert=None, private=key, public=key)
        elif secret.type.is_certificate:
            out[name] = _cert_secret(name, secret, issuer, now, keep_not_after=True, rng=rng)
        else:
            raise _not_generated(name)
    return out


def generate_marble_secrets(
    defs: Mapping[str, Secret],
    *,
    root_secret: bytes,
    uuid: UUID,
    marble_type: str,
    disable_binding: bool,
    issuer: CertifiedKey,
    now: dt.datetime,
    rng: Rng = os.urandom,
) -> dict[str, Secret]:
    """Values for every per-Marble (not shared, not user-defined) secret in ``defs`` for one Marble.

    Symmetric keys are derived (:func:`derive_marble_key`), so they are stable across activations;
    certificates are fresh on every call (new key, new serial, ValidFor counted from ``now``).
    Refuses the nil UUID (it would otherwise be indistinguishable from "shared").
    """
    _reject_nil(uuid)
    out: dict[str, Secret] = {}
    for name, secret in defs.items():
        if secret.user_defined or secret.shared:
            continue
        if secret.type is SecretType.SYMMETRIC_KEY:
            key = derive_marble_key(
                root_secret, uuid, name, marble_type, secret.size, disable_binding=disable_binding
            )
            out[name] = dataclasses.replace(secret, cert=None, private=key, public=key)
        elif secret.type.is_certificate:
            out[name] = _cert_secret(name, secret, issuer, now, keep_not_after=False, rng=rng)
        else:
            raise _not_generated(name)
    return out
