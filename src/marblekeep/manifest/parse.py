"""Turn manifest JSON into the value types of :mod:`marblekeep.manifest.model`.

This is the *shape* step: Go ``encoding/json`` semantics (see :mod:`.gojson`), ``Files`` and
``Env`` decoded from their ``Encoding``, certificate templates mapped from Go's
``x509.Certificate`` field names, the marblekeep ``TDX`` package extension. It reports every
shape problem it finds and still builds a best-effort :class:`Manifest`, so that the rules in
:mod:`.validate` can report their problems in the same pass. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from marblekeep.errors import Problem
from marblekeep.manifest.gojson import Decoder, JNumber, JObject, JValue, join, kind_of
from marblekeep.manifest.model import (
    CertTemplate,
    Config,
    FileEntry,
    Infrastructure,
    Manifest,
    Marble,
    Package,
    Parameters,
    Role,
    SealMode,
    Secret,
    SecretType,
    TdxPackage,
    TLSTag,
    TLSTagEntry,
    User,
)

__all__ = ["ParsedManifest", "parse_manifest_tree"]

#: Config.SealMode exactly as MarbleRun's Check accepts it (case-sensitive); "" means ProductKey.
SEAL_MODES: dict[str, SealMode] = {
    "": SealMode.PRODUCT_KEY,
    "ProductKey": SealMode.PRODUCT_KEY,
    "UniqueKey": SealMode.UNIQUE_KEY,
    "Disabled": SealMode.DISABLED,
}

#: Config.FeatureGates MarbleRun knows, by lower-case name (matched case-insensitively).
FEATURE_GATES: dict[str, str] = {
    name.lower(): name for name in ("SignQuoteEndpoint", "MonotonicCounter", "AzureHSMSealing")
}

TDX_FIELDS = ("MRTD", "RTMR0", "RTMR1", "RTMR2", "RTMR3", "MRSEAM")
TDX_MEASUREMENT_HEX = 96  # 48 bytes

#: Go's x509.ExtKeyUsage values: Any=0 ... MicrosoftKernelCodeSigning=13.
MAX_EXT_KEY_USAGE = 13
#: Go's x509.KeyUsage bits: DigitalSignature=1 ... DecipherOnly=256.
MAX_KEY_USAGE = (1 << 9) - 1

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})",
)
_HEX = re.compile(r"[0-9a-fA-F]*")


@dataclass
class ParsedManifest:
    """What the shape step produced: a best-effort manifest, its problems and its warnings.

    ``unknown_secret_types`` maps secret names whose ``Type`` is not one MarbleRun knows to
    the type as written (those secrets are absent from ``manifest.secrets``).
    """

    manifest: Manifest
    problems: list[Problem]
    warnings: list[Problem] = field(default_factory=list)
    unknown_secret_types: dict[str, str] = field(default_factory=dict)
    seal_mode_written: str = ""


def _short(text: str, limit: int = 60) -> str:
    """A user-written identifier for a message (never used for secret values)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _ManifestParser:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.d = Decoder()
        self.warnings: list[Problem] = []
        self.unknown_secret_types: dict[str, str] = {}
        self.seal_mode_written = ""

    # -- top level ------------------------------------------------------------------------

    def parse(self, tree: JValue) -> ParsedManifest:
        d = self.d
        if not isinstance(tree, JObject) and tree is not None:
            d.error("", f"expected a JSON object at the top level, got {kind_of(tree)}")
            tree = None
        top = d.fields(tree.pairs if tree else (), _TOP_FIELDS, "")
        packages = {
            name: self.package(value, f"Packages.{name}")
            for name, value in d.mapping(top.get("Packages", []), "Packages").items()
        }
        infrastructures: dict[str, object] = {
            name: self.infrastructure(value, f"Infrastructures.{name}")
            for name, value in d.mapping(top.get("Infrastructures", []), "Infrastructures").items()
        }
        marbles = {
            name: self.marble(value, f"Marbles.{name}")
            for name, value in d.mapping(top.get("Marbles", []), "Marbles").items()
        }
        secrets: dict[str, Secret] = {}
        for name, value in d.mapping(top.get("Secrets", []), "Secrets").items():
            secret = self.secret(value, f"Secrets.{name}", name)
            if secret is not None:
                secrets[name] = secret
        users = {
            name: self.user(value, f"Users.{name}")
            for name, value in d.mapping(top.get("Users", []), "Users").items()
        }
        roles = {
            name: self.role(value, f"Roles.{name}")
            for name, value in d.mapping(top.get("Roles", []), "Roles").items()
        }
        recovery_keys: dict[str, str] = {}
        for name, value in d.mapping(top.get("RecoveryKeys", []), "RecoveryKeys").items():
            pem = d.string([value], f"RecoveryKeys.{name}")
            recovery_keys[name] = pem
        tls = {
            name: self.tls_tag(value, f"TLS.{name}")
            for name, value in d.mapping(top.get("TLS", []), "TLS").items()
        }
        config = self.config(top.get("Config", []), "Config")
        manifest = Manifest(
            raw=self.raw,
            packages=packages,
            marbles=marbles,
            secrets=secrets,
            users=users,
            roles=roles,
            recovery_keys=recovery_keys,
            tls=tls,
            config=config,
            infrastructures=infrastructures,
        )
        return ParsedManifest(
            manifest=manifest,
            problems=list(d.problems),
            warnings=d.warnings + self.warnings,
            unknown_secret_types=self.unknown_secret_types,
            seal_mode_written=self.seal_mode_written,
        )

    # -- Packages ---------------------------------------------------------------------------

    def package(self, value: JValue, path: str) -> Package:
        d = self.d
        f = d.struct_fields([value], path, _PACKAGE_FIELDS)
        tdx: TdxPackage | None = None
        tdx_values = f.get("TDX", [])
        if any(v is not None for v in tdx_values):
            tdx = self.tdx(tdx_values, join(path, "TDX"))
        return Package(
            debug=d.boolean(f.get("Debug", []), join(path, "Debug")),
            unique_id=d.string(f.get("UniqueID", []), join(path, "UniqueID")),
            signer_id=d.string(f.get("SignerID", []), join(path, "SignerID")),
            product_id=d.uint_pointer(f.get("ProductID", []), join(path, "ProductID")),
            security_version=d.uint_pointer(f.get("SecurityVersion", []), join(path, "SecurityVersion")),
            accepted_tcb_statuses=d.strings(
                f.get("AcceptedTCBStatuses", []), join(path, "AcceptedTCBStatuses")
            ),
            accepted_advisories=d.strings(
                f.get("AcceptedAdvisories", []), join(path, "AcceptedAdvisories")
            ),
            tdx=tdx,
        )

    def tdx(self, values: Sequence[JValue], path: str) -> TdxPackage:
        d = self.d
        f = d.struct_fields(values, path, TDX_FIELDS)
        measured: dict[str, str | None] = {}
        for name in TDX_FIELDS:
            given = [v for v in f.get(name, []) if v is not None]
            text = d.string(given, join(path, name)) if given else None
            if text is not None and not (len(text) == TDX_MEASUREMENT_HEX and _HEX.fullmatch(text)):
                d.error(
                    join(path, name),
                    f"expected {TDX_MEASUREMENT_HEX} hex digits (48 bytes), got {len(text)} characters"
                    + ("" if _HEX.fullmatch(text) else " that are not all hex digits"),
                )
                text = None
            measured[name] = text.lower() if text is not None else None
        if measured["MRTD"] is None and not any(p.path == join(path, "MRTD") for p in d.problems):
            d.error(join(path, "MRTD"), "missing: a TDX package must pin MRTD (96 hex digits)")
        return TdxPackage(
            mrtd=measured["MRTD"],
            rtmr0=measured["RTMR0"],
            rtmr1=measured["RTMR1"],
            rtmr2=measured["RTMR2"],
            rtmr3=measured["RTMR3"],
            mrseam=measured["MRSEAM"],
        )

    def infrastructure(self, value: JValue, path: str) -> Infrastructure:
        d = self.d
        f = d.struct_fields([value], path, ("CPUSVN", "QESVN", "PCESVN", "RootCA"))
        return Infrastructure(
            cpusvn=d.byte_string(f.get("CPUSVN", []), join(path, "CPUSVN")),
            qesvn=d.uint_pointer(f.get("QESVN", []), join(path, "QESVN"), bits=16),
            pcesvn=d.uint_pointer(f.get("PCESVN", []), join(path, "PCESVN"), bits=16),
            root_ca=d.byte_string(f.get("RootCA", []), join(path, "RootCA")),
        )

    # -- Marbles ----------------------------------------------------------------------------

    def marble(self, value: JValue, path: str) -> Marble:
        d = self.d
        f = d.struct_fields([value], path, _MARBLE_FIELDS)
        params_path = join(path, "Parameters")
        p = d.struct_fields(f.get("Parameters", []), params_path, ("Files", "Env", "Argv"))
        files = {
            name: self.file_entry(v, f"{params_path}.Files.{name}")
            for name, v in d.mapping(p.get("Files", []), join(params_path, "Files")).items()
        }
        env = {
            name: self.file_entry(v, f"{params_path}.Env.{name}")
            for name, v in d.mapping(p.get("Env", []), join(params_path, "Env")).items()
        }
        return Marble(
            package=d.string(f.get("Package", []), join(path, "Package")),
            max_activations=d.uint(f.get("MaxActivations", []), join(path, "MaxActivations")),
            parameters=Parameters(
                files=files, env=env, argv=d.strings(p.get("Argv", []), join(params_path, "Argv"))
            ),
            tls=d.strings(f.get("TLS", []), join(path, "TLS")),
            disable_secret_binding=d.boolean(
                f.get("DisableSecretBinding", []), join(path, "DisableSecretBinding")
            ),
        )

    def file_entry(self, value: JValue, path: str) -> FileEntry:
        """A Files/Env entry: a string, or ``{Data, Encoding, NoTemplates}``; decoded here."""
        d = self.d
        if value is None:
            return FileEntry(data=b"")
        if isinstance(value, str):
            return FileEntry(data=(d.str_value(value, path) or "").encode("utf-8"))
        if not isinstance(value, JObject):
            hint = " (quote it: values are strings)" if isinstance(value, bool | JNumber) else ""
            d.type_error(path, 'a string or an object {"Data", "Encoding", "NoTemplates"}', value)
            if hint:
                d.problems[-1] = Problem(path, d.problems[-1].message + hint)
            return FileEntry(data=b"")
        f = d.fields(value.pairs, ("Data", "Encoding", "NoTemplates"), path)
        data = d.string(f.get("Data", []), join(path, "Data"))
        encoding_written = d.string(f.get("Encoding", []), join(path, "Encoding"))
        encoding = encoding_written.lower() or "string"
        no_templates = d.boolean(f.get("NoTemplates", []), join(path, "NoTemplates"))
        decoded = b""
        if encoding == "string":
            decoded = data.encode("utf-8")
        elif encoding == "base64":
            try:
                decoded = base64.b64decode(
                    data.replace("\r", "").replace("\n", "").encode("ascii"), validate=True
                )
            except (binascii.Error, ValueError, UnicodeEncodeError):
                d.error(
                    join(path, "Data"),
                    "not valid base64 (Encoding is base64): use standard base64 with padding",
                )
        elif encoding == "hex":
            try:
                decoded = binascii.unhexlify(data.encode("ascii"))
            except (binascii.Error, ValueError, UnicodeEncodeError):
                d.error(
                    join(path, "Data"), "not valid hex (Encoding is hex): use an even number of hex digits"
                )
        else:
            d.error(
                join(path, "Encoding"),
                f'unknown encoding "{_short(encoding_written)}": use "string", "base64" or "hex"',
            )
            encoding = "string"
        return FileEntry(data=decoded, encoding=encoding, no_templates=no_templates)

    # -- Secrets ------------------------------------------------------------------------------

    def secret(self, value: JValue, path: str, name: str) -> Secret | None:
        d = self.d
        f = d.struct_fields([value], path, _SECRET_FIELDS)
        type_written = d.string(f.get("Type", []), join(path, "Type"))
        size = d.uint(f.get("Size", []), join(path, "Size"))
        shared = d.boolean(f.get("Shared", []), join(path, "Shared"))
        user_defined = d.boolean(f.get("UserDefined", []), join(path, "UserDefined"))
        valid_for = d.uint(f.get("ValidFor", []), join(path, "ValidFor"))
        private = d.byte_string(f.get("Private", []), join(path, "Private"))
        public = d.byte_string(f.get("Public", []), join(path, "Public"))
        template, cert_der = self.certificate(f.get("Cert", []), join(path, "Cert"))
        try:
            secret_type = SecretType(type_written)
        except ValueError:
            self.unknown_secret_types[name] = type_written
            return None
        if not user_defined:
            for given, field_name in ((private, "Private"), (public, "Public"), (cert_der, "Cert")):
                if given:
                    self.warnings.append(
                        Problem(
                            join(path, field_name),
                            "ignored: the Coordinator generates this secret's value "
                            "(set UserDefined: true to provide it yourself)",
                        )
                    )
        return Secret(
            type=secret_type,
            size=size,
            shared=shared,
            user_defined=user_defined,
            valid_for=valid_for,
            cert_template=template,
            cert=cert_der,
            private=private or b"",
            public=public or b"",
        )

    def certificate(self, values: Sequence[JValue], path: str) -> tuple[CertTemplate | None, bytes | None]:
        """``Secret.Cert``: an object (a template) or a base64 DER string (a certificate)."""
        d = self.d
        objects: list[JValue] = []
        der: bytes | None = None
        for value in values:
            if value is None:
                continue
            if isinstance(value, str):
                objects, der = [], None
                decoded = d.bytes_value(value, path)
                if decoded is None:
                    continue  # MarbleRun swallows this silently; we refuse (see compat notes)
                try:
                    x509.load_der_x509_certificate(decoded)
                except ValueError:
                    d.error(
                        path,
                        "not a DER X.509 certificate in base64: give the certificate's DER, base64-encoded",
                    )
                    continue
                der = decoded
            elif isinstance(value, JObject):
                objects.append(value)
                der = None
            else:
                d.type_error(path, "an object (a certificate template) or a base64 DER string", value)
        if not objects:
            return None, der
        return self.cert_template(objects, path), None

    def cert_template(self, values: Sequence[JValue], path: str) -> CertTemplate:
        d = self.d
        f = d.struct_fields(values, path, _CERT_FIELDS, ignored=_GO_CERT_IGNORED)
        subject_path = join(path, "Subject")
        s = d.struct_fields(f.get("Subject", []), subject_path, _NAME_FIELDS, ignored=_GO_NAME_IGNORED)

        def names(field_name: str) -> tuple[str, ...]:
            return d.strings(s.get(field_name, []), join(subject_path, field_name))

        key_usage = d.integer(f.get("KeyUsage", []), join(path, "KeyUsage"))
        if not 0 <= key_usage <= MAX_KEY_USAGE:
            d.error(
                join(path, "KeyUsage"),
                f"expected a bitmask of Go x509.KeyUsage bits (0 to {MAX_KEY_USAGE})",
            )
            key_usage = 0
        ext_key_usage = d.ints(f.get("ExtKeyUsage", []), join(path, "ExtKeyUsage"))
        for index, usage in enumerate(ext_key_usage):
            if not 0 <= usage <= MAX_EXT_KEY_USAGE:
                d.error(
                    f"{path}.ExtKeyUsage[{index}]",
                    f"unknown extended key usage {usage}: "
                    f"use a Go x509.ExtKeyUsage value 0 to {MAX_EXT_KEY_USAGE}",
                )
        return CertTemplate(
            common_name=d.string(s.get("CommonName", []), join(subject_path, "CommonName")),
            organization=names("Organization"),
            organizational_unit=names("OrganizationalUnit"),
            country=names("Country"),
            province=names("Province"),
            locality=names("Locality"),
            street_address=names("StreetAddress"),
            postal_code=names("PostalCode"),
            serial_number=d.string(s.get("SerialNumber", []), join(subject_path, "SerialNumber")),
            dns_names=d.strings(f.get("DNSNames", []), join(path, "DNSNames")),
            ip_addresses=d.list_of(f.get("IPAddresses", []), join(path, "IPAddresses"), self.ip_address,
                                   "an array of IP address strings"),
            email_addresses=d.strings(f.get("EmailAddresses", []), join(path, "EmailAddresses")),
            uris=d.list_of(f.get("URIs", []), join(path, "URIs"), self.uri, "an array of URI strings"),
            key_usage=key_usage,
            ext_key_usage=tuple(u for u in ext_key_usage if 0 <= u <= MAX_EXT_KEY_USAGE),
            is_ca=d.boolean(f.get("IsCA", []), join(path, "IsCA")),
            max_path_len=d.integer(f.get("MaxPathLen", []), join(path, "MaxPathLen")),
            max_path_len_zero=d.boolean(f.get("MaxPathLenZero", []), join(path, "MaxPathLenZero")),
            not_after=self.time(f.get("NotAfter", []), join(path, "NotAfter")),
        )

    def ip_address(self, value: JValue, path: str) -> str | None:
        text = self.d.str_value(value, path)
        if text is None:
            return None
        try:
            if "%" in text:
                raise ValueError(text)
            ipaddress.ip_address(text)
        except ValueError:
            self.d.error(path, f'"{_short(text)}" is not an IP address: write e.g. "10.0.0.1" or "fd00::1"')
            return None
        return text

    def uri(self, value: JValue, path: str) -> str | None:
        """A URI: a string (marblekeep), or Go's ``url.URL`` object form (MarbleRun)."""
        d = self.d
        if isinstance(value, JObject):
            f = d.fields(value.pairs, ("Scheme", "Opaque", "Host", "Path", "RawQuery", "Fragment"))
            parts = {k: d.string(f.get(k, []), join(path, k)) for k in f}
            scheme, host = parts.get("Scheme", ""), parts.get("Host", "")
            rest = parts.get("Opaque", "") or parts.get("Path", "")
            text = f"{scheme}:" + (f"//{host}" if host else "") + rest
            if parts.get("RawQuery"):
                text += "?" + parts["RawQuery"]
            if parts.get("Fragment"):
                text += "#" + parts["Fragment"]
        else:
            converted = d.str_value(value, path)
            if converted is None:
                return None
            text = converted
        try:
            scheme_ok = bool(urllib.parse.urlsplit(text).scheme)
        except ValueError:
            scheme_ok = False
        if not scheme_ok or any(c.isspace() for c in text):
            d.error(path, f'"{_short(text)}" is not an absolute URI: write e.g. "spiffe://example.org/service"')
            return None
        return text

    def time(self, values: Sequence[JValue], path: str) -> dt.datetime | None:
        result: dt.datetime | None = None
        for value in values:
            if value is None:
                continue
            if not isinstance(value, str):
                self.d.type_error(path, "an RFC 3339 time string", value)
                continue
            match = _RFC3339.fullmatch(value)
            parsed: dt.datetime | None = None
            if match:
                year, month, day, hour, minute, second, frac, zone = match.groups()
                try:
                    tz = dt.UTC
                    if zone != "Z":
                        sign = 1 if zone[0] == "+" else -1
                        offset = dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
                        tz = dt.timezone(sign * offset)
                    parsed = dt.datetime(
                        int(year), int(month), int(day), int(hour), int(minute), int(second),
                        int((frac or "0")[:6].ljust(6, "0")), tzinfo=tz,
                    )
                except ValueError:
                    parsed = None
            if parsed is None:
                self.d.error(
                    path, f'"{_short(value)}" is not an RFC 3339 time: write e.g. "2030-01-31T00:00:00Z"'
                )
                continue
            result = parsed
        return result

    # -- Users, Roles, TLS, Config ------------------------------------------------------------

    def user(self, value: JValue, path: str) -> User:
        d = self.d
        f = d.struct_fields([value], path, ("Certificate", "Roles"))
        return User(
            certificate=d.string(f.get("Certificate", []), join(path, "Certificate")),
            roles=d.strings(f.get("Roles", []), join(path, "Roles")),
        )

    def role(self, value: JValue, path: str) -> Role:
        d = self.d
        f = d.struct_fields([value], path, ("ResourceType", "ResourceNames", "Actions"))
        return Role(
            resource_type=d.string(f.get("ResourceType", []), join(path, "ResourceType")),
            resource_names=d.strings(f.get("ResourceNames", []), join(path, "ResourceNames")),
            actions=d.strings(f.get("Actions", []), join(path, "Actions")),
        )

    def tls_tag(self, value: JValue, path: str) -> TLSTag:
        d = self.d
        f = d.struct_fields([value], path, ("Outgoing", "Incoming"))
        return TLSTag(
            outgoing=d.list_of(
                f.get("Outgoing", []), join(path, "Outgoing"), self.tls_entry, "an array of objects"
            ),
            incoming=d.list_of(
                f.get("Incoming", []), join(path, "Incoming"), self.tls_entry, "an array of objects"
            ),
        )

    def tls_entry(self, value: JValue, path: str) -> TLSTagEntry:
        d = self.d
        f = d.struct_fields([value], path, ("Port", "Addr", "Cert", "DisableClientAuth"))
        return TLSTagEntry(
            addr=d.string(f.get("Addr", []), join(path, "Addr")),
            port=d.string(f.get("Port", []), join(path, "Port")),
            cert=d.string(f.get("Cert", []), join(path, "Cert")),
            disable_client_auth=d.boolean(f.get("DisableClientAuth", []), join(path, "DisableClientAuth")),
        )

    def config(self, values: Sequence[JValue], path: str) -> Config:
        d = self.d
        f = d.struct_fields(values, path, _CONFIG_FIELDS)
        self.seal_mode_written = d.string(f.get("SealMode", []), join(path, "SealMode"))
        return Config(
            seal_mode=SEAL_MODES.get(self.seal_mode_written, SealMode.PRODUCT_KEY),
            feature_gates=tuple(
                FEATURE_GATES.get(gate.lower(), gate)
                for gate in d.strings(f.get("FeatureGates", []), join(path, "FeatureGates"))
            ),
            update_threshold=d.uint(f.get("UpdateThreshold", []), join(path, "UpdateThreshold")),
            recovery_threshold=d.uint(f.get("RecoveryThreshold", []), join(path, "RecoveryThreshold")),
            rotate_root_secret=d.boolean(f.get("RotateRootSecret", []), join(path, "RotateRootSecret")),
        )


_TOP_FIELDS = (
    "Packages", "Infrastructures", "Marbles", "Secrets", "Users", "Roles", "RecoveryKeys", "TLS", "Config",
)
_PACKAGE_FIELDS = (
    "Debug", "UniqueID", "SignerID", "ProductID", "SecurityVersion", "AcceptedTCBStatuses",
    "AcceptedAdvisories", "TDX",
)
_MARBLE_FIELDS = ("Package", "MaxActivations", "Parameters", "TLS", "DisableSecretBinding")
_SECRET_FIELDS = ("Type", "Size", "Shared", "UserDefined", "Cert", "ValidFor", "Private", "Public")
_CERT_FIELDS = (
    "Subject", "DNSNames", "IPAddresses", "EmailAddresses", "URIs", "KeyUsage", "ExtKeyUsage", "IsCA",
    "MaxPathLen", "MaxPathLenZero", "NotAfter",
)
_NAME_FIELDS = (
    "Country", "Organization", "OrganizationalUnit", "Locality", "Province", "StreetAddress", "PostalCode",
    "SerialNumber", "CommonName",
)
_GO_CERT_OTHER = (
    "Raw", "RawTBSCertificate", "RawSubjectPublicKeyInfo", "RawSubject", "RawIssuer", "Signature",
    "SignatureAlgorithm", "PublicKeyAlgorithm", "PublicKey", "Version", "SerialNumber", "Issuer", "NotBefore",
    "Extensions", "ExtraExtensions", "UnhandledCriticalExtensions", "UnknownExtKeyUsage",
    "BasicConstraintsValid", "SubjectKeyId", "AuthorityKeyId", "OCSPServer", "IssuingCertificateURL",
    "PermittedDNSDomainsCritical", "PermittedDNSDomains", "ExcludedDNSDomains", "PermittedIPRanges",
    "ExcludedIPRanges", "PermittedEmailAddresses", "ExcludedEmailAddresses", "PermittedURIDomains",
    "ExcludedURIDomains", "CRLDistributionPoints", "PolicyIdentifiers", "Policies", "InhibitAnyPolicy",
    "InhibitAnyPolicyZero", "InhibitPolicyMapping", "InhibitPolicyMappingZero", "RequireExplicitPolicy",
    "RequireExplicitPolicyZero", "PolicyMappings",
)
#: Go x509.Certificate fields a MarbleRun template may carry but marblekeep does not apply.
_GO_CERT_IGNORED = {
    name.lower(): f"{name} is a Go x509.Certificate field marblekeep does not apply: it is ignored"
    for name in _GO_CERT_OTHER
}
#: Keys users put in Cert.Subject that belong one level up, and pkix.Name fields not applied.
_GO_NAME_IGNORED = {
    **{
        name.lower(): f"{name} belongs in Cert, not in Cert.Subject: it is ignored here"
        for name in ("DNSNames", "IPAddresses", "EmailAddresses", "URIs", "NotAfter", "IsCA")
    },
    **{
        name.lower(): f"{name} is a Go pkix.Name field marblekeep does not apply: it is ignored"
        for name in ("Names", "ExtraNames")
    },
}
_CONFIG_FIELDS = ("SealMode", "FeatureGates", "UpdateThreshold", "RecoveryThreshold", "RotateRootSecret")


def parse_manifest_tree(raw: bytes, tree: JValue) -> ParsedManifest:
    """Build a best-effort :class:`Manifest` from a parsed JSON tree, collecting shape problems."""
    return _ManifestParser(raw).parse(tree)

