"""MarbleRun's side of the Marble API, for tests: its messages built with Google's ``protobuf``
package (an independent codec) and a Marble's TLS identity made as MarbleRun's premain makes it.

The classes come from a descriptor written here from the published schema (no generated code, no
protoc): ``rpc.ActivationReq``, ``rpc.ActivationResp``, ``rpc.Parameters``. Tests use them to
cross-check marblekeep's hand-written codec, and the gRPC tests use them as the client's messages.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

MAX_VALIDITY = dt.timedelta(days=365 * 292)

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="marblekeep_test_coordinator.proto", package="rpc", syntax="proto3"
    )
    req = fdp.message_type.add(name="ActivationReq")
    for name, number, kind in (
        ("Quote", 1, _F.TYPE_BYTES),
        ("CSR", 2, _F.TYPE_BYTES),
        ("MarbleType", 3, _F.TYPE_STRING),
        ("UUID", 4, _F.TYPE_STRING),
    ):
        req.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    params = fdp.message_type.add(name="Parameters")
    for name, number in (("Files", 1), ("Env", 2)):
        entry = params.nested_type.add(name=f"{name}Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
        params.field.add(
            name=name,
            number=number,
            type=_F.TYPE_MESSAGE,
            label=_F.LABEL_REPEATED,
            type_name=f".rpc.Parameters.{name}Entry",
        )
    params.field.add(name="Argv", number=3, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    resp = fdp.message_type.add(name="ActivationResp")
    resp.field.add(
        name="Parameters",
        number=1,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_OPTIONAL,
        type_name=".rpc.Parameters",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"rpc.{name}"))
        for name in ("ActivationReq", "ActivationResp", "Parameters")
    }


_CLASSES = _build()
PbActivationReq: Any = _CLASSES["ActivationReq"]
PbActivationResp: Any = _CLASSES["ActivationResp"]
PbParameters: Any = _CLASSES["Parameters"]


@dataclass
class MarbleRunMarble:
    """A Marble's TLS identity as MarbleRun's premain makes it (reference §5.2): a fresh P-384 key,
    a self-signed certificate ``CN=MarbleRun Marble`` with the DNS names and loopback IPs, and a CSR
    with the same key, an empty subject and SANs = default IPs then DNS names."""

    dns_names: tuple[str, ...] = ("localhost",)
    uuid: uuid_mod.UUID = field(default_factory=uuid_mod.uuid4)
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    csr_subject: x509.Name = field(default_factory=lambda: x509.Name([]))

    def __post_init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        san = x509.SubjectAlternativeName(
            [*(x509.DNSName(n) for n in self.dns_names), *(x509.IPAddress(ip) for ip in ips)]
        )
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MarbleRun Marble")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + MAX_VALIDITY)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        csr_san = x509.SubjectAlternativeName(
            [*(x509.IPAddress(ip) for ip in ips), *(x509.DNSName(n) for n in self.dns_names)]
        )
        self.csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(self.csr_subject)
            .add_extension(csr_san, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def csr_der(self) -> bytes:
        return self.csr.public_bytes(serialization.Encoding.DER)

    def request(
        self, marble_type: str, *, quote: bytes = b"", uuid: str | None = None, csr: bytes | None = None
    ) -> bytes:
        msg = PbActivationReq(
            Quote=quote,
            CSR=self.csr_der if csr is None else csr,
            MarbleType=marble_type,
            UUID=str(self.uuid) if uuid is None else uuid,
        )
        return bytes(msg.SerializeToString())
