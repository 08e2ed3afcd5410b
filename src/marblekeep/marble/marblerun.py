"""MarbleRun's Marble activation, the request side: from a decoded ``rpc.ActivationReq`` to what the
activation core needs. Pure: no sockets, no clock.

What a MarbleRun premain sends (docs/protocol.md, "MarbleRun's protocol"): its Marble type, its
UUID as text, a DER certificate signing request (CSR) and a quote whose report data starts with
SHA-256 of the DER of the self-signed TLS client certificate it presents in the same TLS
handshake. The Coordinator:

1. parses the UUID (the canonical 36-character form, either case) and bounds the fields;
2. parses the CSR and **verifies its signature** (a CSR that does not verify is refused); the
   CSR's key is not used: the Coordinator generates the Marble's key, as MarbleRun does;
3. takes from the CSR what MarbleRun copies into the Marble's certificate: the DNS and IP subject
   alternative names (in that order, as Go writes them), and the subject with the common name
   replaced by the UUID and the organisation dropped (MarbleRun sets it to the Marble root's empty
   issuer organisation). Go keeps only its nine ``pkix.Name`` fields and writes them in a fixed
   order; so does :func:`leaf_subject`.

The quote's binding (``report_data[0:32] == SHA-256(client certificate DER)``) is checked by the
service once the quote is verified: :func:`expected_report_data_prefix`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from uuid import UUID

from cryptography import x509
from cryptography.x509.oid import NameOID

from marblekeep.errors import RequestError
from marblekeep.marble.marblerun_wire import ActivationReq
from marblekeep.marble.protocol import (
    MAX_DNS_NAME_BYTES,
    MAX_DNS_NAMES,
    MAX_EVIDENCE_BYTES,
    MAX_MARBLE_TYPE_BYTES,
)

__all__ = [
    "MAX_CSR_BYTES",
    "MarbleRunRequest",
    "expected_report_data_prefix",
    "leaf_subject",
    "parse_marblerun_request",
]

#: A premain's CSR is ~500 bytes; 16 KiB leaves room for many SANs and refuses junk early.
MAX_CSR_BYTES = 16 * 1024

_UUID_RE = re.compile(r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Go's pkix.Name fields, in ToRDNSequence's order (Organization is dropped for Marble leaves).
_MULTI_FIELDS = (
    NameOID.COUNTRY_NAME,
    NameOID.STATE_OR_PROVINCE_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.STREET_ADDRESS,
    NameOID.POSTAL_CODE,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
)


@dataclass(frozen=True)
class MarbleRunRequest:
    """A MarbleRun activation request, parsed and bounded."""

    marble_type: str
    uuid: UUID
    #: The CSR's DNS names, then its IP addresses as text (what the Marble's certificate carries).
    dns_names: tuple[str, ...]
    #: Subject attributes the CSR asks for besides CN and O, as ``(oid, value)`` in Go's order;
    #: empty for MarbleRun's premains (their CSR subject is empty).
    subject_extra: tuple[tuple[x509.ObjectIdentifier, str], ...]
    quote: bytes = field(repr=False)


def _marble_type(value: str) -> str:
    if len(value.encode("utf-8")) > MAX_MARBLE_TYPE_BYTES:
        raise RequestError(f"MarbleType is longer than {MAX_MARBLE_TYPE_BYTES} bytes")
    if _CONTROL_RE.search(value):
        raise RequestError("MarbleType contains control characters")
    return value


def _uuid(value: str) -> UUID:
    if not _UUID_RE.match(value):
        raise RequestError(
            f"UUID {value[:64]!r} is not a UUID in its 36-character form (8-4-4-4-12 hexadecimal digits); "
            "check the Marble's UUID file (EDG_MARBLE_UUID_FILE)"
        )
    return UUID(value)


def _sans(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = ext.get_values_for_type(x509.DNSName)
    ips = ext.get_values_for_type(x509.IPAddress)
    if len(dns) + len(ips) > MAX_DNS_NAMES:
        raise RequestError(f"CSR: more than {MAX_DNS_NAMES} DNS names and IP addresses")
    for name in dns:
        printable = name.isascii() and name.isprintable() and " " not in name
        if not name or len(name) > MAX_DNS_NAME_BYTES or not printable:
            raise RequestError(
                f"CSR: DNS name {name[:64]!r} is not valid "
                f"(1-{MAX_DNS_NAME_BYTES} printable ASCII characters without spaces)"
            )
    out = list(dns)
    for ip in ips:
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise RequestError("CSR: IP address SANs must be addresses, not networks")
        text = str(ip.ipv4_mapped) if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else str(ip)
        if text not in out:
            out.append(text)
    return tuple(out)


def _subject_extra(csr: x509.CertificateSigningRequest) -> tuple[tuple[x509.ObjectIdentifier, str], ...]:
    values: dict[x509.ObjectIdentifier, list[str]] = {}
    serial = ""
    for attr in csr.subject:
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
        if attr.oid == NameOID.SERIAL_NUMBER:
            serial = value  # Go keeps the last one
        elif attr.oid in _MULTI_FIELDS:
            values.setdefault(attr.oid, []).append(value)
    out = [(oid, v) for oid in _MULTI_FIELDS for v in values.get(oid, ())]
    if serial:
        out.append((NameOID.SERIAL_NUMBER, serial))
    return tuple(out)


def leaf_subject(uuid: UUID, extra: tuple[tuple[x509.ObjectIdentifier, str], ...]) -> x509.Name:
    """The Marble leaf's subject: the CSR's kept attributes in Go's order with CN = the UUID
    (before SERIALNUMBER, as Go writes it); each multi-valued field is one RDN."""
    rdns: list[x509.RelativeDistinguishedName] = []
    for oid in _MULTI_FIELDS:
        attrs = [x509.NameAttribute(oid, v) for o, v in extra if o == oid]
        if attrs:
            rdns.append(x509.RelativeDistinguishedName(attrs))
    rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(uuid))]))
    rdns.extend(
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.SERIAL_NUMBER, v)])
        for o, v in extra
        if o == NameOID.SERIAL_NUMBER
    )
    return x509.Name(rdns)


def parse_marblerun_request(req: ActivationReq) -> MarbleRunRequest:
    """Check and parse an ``ActivationReq``; raises :class:`RequestError` naming the field."""
    marble_type = _marble_type(req.marble_type)
    uuid = _uuid(req.uuid)
    if len(req.quote) > MAX_EVIDENCE_BYTES:
        raise RequestError(f"Quote is larger than {MAX_EVIDENCE_BYTES} bytes")
    if not req.csr:
        raise RequestError("CSR is empty: the Marble must send a DER certificate signing request")
    if len(req.csr) > MAX_CSR_BYTES:
        raise RequestError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(req.csr)
        valid = csr.is_signature_valid
    except (ValueError, TypeError):
        raise RequestError("CSR is not a DER-encoded PKCS#10 certificate signing request") from None
    if not valid:
        raise RequestError("CSR: its signature does not verify with its own public key")
    try:
        sans = _sans(csr)
        extra = _subject_extra(csr)
    except (ValueError, TypeError):
        raise RequestError("CSR: its subject or subject alternative names cannot be parsed") from None
    return MarbleRunRequest(marble_type, uuid, sans, extra, req.quote)


def expected_report_data_prefix(client_cert_der: bytes) -> bytes:
    """What the quote's report data must start with: SHA-256 of the TLS client certificate's DER."""
    return hashlib.sha256(client_cert_der).digest()
