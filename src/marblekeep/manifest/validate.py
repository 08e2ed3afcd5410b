"""The manifest rules: MarbleRun's ``Check`` (reference §1.11, rules 1–28) and its set-time checks.

MarbleRun stops at the first failed rule; marblekeep reports *every* problem at once, each
located by a JSON path and carrying the fix. Rule numbers in comments refer to §1.11.

Scope, as in MarbleRun: the package rules 4 and 5 only look at packages a Marble uses, and a
``Debug`` package turns them into warnings. Set-time checks (secret sizes, ``plain`` must be
user-defined, recovery-key PEMs, user certificates) run here too, so that a manifest that
validates is one a Coordinator accepts. Nothing here does I/O.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from marblekeep.attestation.claims import TCB_STATUSES
from marblekeep.errors import Problem
from marblekeep.manifest.model import Manifest, Package, Secret, SecretType
from marblekeep.manifest.parse import FEATURE_GATES, SEAL_MODES, ParsedManifest

__all__ = ["KNOWN_TCB_STATUSES", "check_manifest", "did_you_mean", "suppressed"]

#: TCB statuses a verifier can report (Intel's names, as MarbleRun compares them).
KNOWN_TCB_STATUSES = TCB_STATUSES

ECDSA_SIZES = (224, 256, 384, 521)
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
#: HKDF-SHA256 can derive at most 255 * 32 bytes; per-Marble keys are derived with it.
SYMMETRIC_MAX_BITS = 255 * 32 * 8
RECOVERY_KEY_MIN_BITS = 2048

RESOURCE_TYPES = ("Packages", "Secrets", "Manifest")

_PEM_BEGIN = re.compile(r"-----BEGIN ([^\r\n-]*)-----")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` for the closest candidate, or ``""``."""
    pool = list(candidates)
    folded = [c for c in pool if c.lower() == word.lower()]
    best = folded or difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return f' (did you mean "{best[0]}"?)' if best else ""


def _no_such(kind: str, word: str, candidates: Iterable[str], where: str) -> str:
    pool = sorted(candidates)
    hint = did_you_mean(word, pool)
    if hint:
        return f'no {kind} "{word}"{hint}'
    if not pool:
        return f'no {kind} "{word}": {where} defines none'
    listed = ", ".join(f'"{c}"' for c in pool[:8]) + (", …" if len(pool) > 8 else "")
    return f'no {kind} "{word}" in {where} (defined: {listed})'


def _first_pem_block(text: str) -> tuple[str, str] | None:
    """(type, text of the block) of the first PEM block, as Go's ``pem.Decode`` would find it."""
    match = _PEM_BEGIN.search(text)
    if match is None:
        return None
    label = match.group(1)
    end_marker = f"-----END {label}-----"
    end = text.find(end_marker, match.end())
    if end < 0:
        return None
    return label, text[match.start() : end + len(end_marker)] + "\n"


class _Checker:
    def __init__(self, parsed: ParsedManifest) -> None:
        self.parsed = parsed
        self.m: Manifest = parsed.manifest
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.secret_names = set(self.m.secrets) | set(parsed.unknown_secret_types)

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(path, message))

    def run(self) -> None:
        self.packages_and_marbles()
        self.tls()
        self.users()
        self.roles()
        self.secrets()
        self.config()
        self.recovery_keys()

    # -- rules 1-5 and the TDX extension ---------------------------------------------------------

    def packages_and_marbles(self) -> None:
        m = self.m
        if not m.packages:  # rule 1
            self.error("Packages", "no allowed packages defined: add at least one package")
        if not m.marbles:  # rule 2
            self.error("Marbles", "no allowed marbles defined: add at least one Marble")
        used: dict[str, str] = {}
        for marble_name, marble in m.marbles.items():
            path = f"Marbles.{marble_name}.Package"
            if marble.package in m.packages:
                used.setdefault(marble.package, marble_name)
            elif marble.package == "":  # rule 3
                names = ", ".join(f'"{p}"' for p in sorted(m.packages)[:8])
                hint = f" ({names})" if names else ""
                self.error(path, "missing: name the package this Marble runs" + hint)
            else:  # rule 3
                self.error(path, _no_such("package", marble.package, m.packages, "Packages"))
        for name, package in m.packages.items():
            path = f"Packages.{name}"
            self.tcb_statuses(package, path)
            if package.tdx is not None:
                self.tdx_package(package, path)
            elif name in used:
                self.sgx_package(package, path)

    def sgx_package(self, package: Package, path: str) -> None:
        report = self.warn if package.debug else self.error
        suffix = " (allowed because Debug is true; never use a Debug package in production)"
        others = [
            field
            for field, given in (
                ("SignerID", package.signer_id != ""),
                ("ProductID", package.product_id is not None),
                ("SecurityVersion", package.security_version is not None),
            )
            if given
        ]
        if package.unique_id and others:  # rule 4
            report(
                path,
                f"specifies both UniqueID and {'/'.join(others)}: pin either UniqueID alone "
                "or SignerID, ProductID and SecurityVersion together"
                + (suffix if package.debug else ""),
            )
        if not package.unique_id:  # rule 5 (MarbleRun reports the first; we report each)
            for field, missing in (
                ("SignerID", package.signer_id == ""),
                ("ProductID", package.product_id is None),
                ("SecurityVersion", package.security_version is None),
            ):
                if missing:
                    report(
                        f"{path}.{field}",
                        "missing: without a UniqueID the package must set SignerID, ProductID and "
                        "SecurityVersion (or set UniqueID instead)" + (suffix if package.debug else ""),
                    )

    def tdx_package(self, package: Package, path: str) -> None:
        for field, given in (
            ("UniqueID", package.unique_id != ""),
            ("SignerID", package.signer_id != ""),
            ("ProductID", package.product_id is not None),
            ("SecurityVersion", package.security_version is not None),
        ):
            if given:
                self.error(
                    f"{path}.{field}",
                    "not allowed in a TDX package (these are SGX enclave identities): "
                    "remove it, or remove TDX to describe an SGX enclave",
                )

    def tcb_statuses(self, package: Package, path: str) -> None:
        for index, status in enumerate(package.accepted_tcb_statuses):
            if status not in KNOWN_TCB_STATUSES:
                self.warn(
                    f"{path}.AcceptedTCBStatuses[{index}]",
                    f'unknown TCB status "{status}" never matches a quote'
                    + did_you_mean(status, KNOWN_TCB_STATUSES),
                )

    # -- rules 6-11 --------------------------------------------------------------------------------

    def tls(self) -> None:
        m = self.m
        for marble_name, marble in m.marbles.items():
            for index, tag in enumerate(marble.tls):
                if tag not in m.tls:  # rule 6
                    self.error(f"Marbles.{marble_name}.TLS[{index}]", _no_such("TLS tag", tag, m.tls, "TLS"))
        for tag_name, tls_tag in m.tls.items():
            for index, entry in enumerate(tls_tag.incoming):
                path = f"TLS.{tag_name}.Incoming[{index}]"
                if not entry.port:  # rule 7
                    self.error(f"{path}.Port", "missing: set the port this Marble listens on, as a string")
                if entry.cert:
                    if entry.cert not in self.secret_names:  # rule 8
                        self.error(
                            f"{path}.Cert", _no_such("secret", entry.cert, self.secret_names, "Secrets")
                        )
                    elif entry.cert in m.secrets and not m.secrets[entry.cert].type.is_certificate:
                        self.warn(
                            f"{path}.Cert",
                            f'secret "{entry.cert}" is a {m.secrets[entry.cert].type.value}, '
                            "not a certificate: TTLS needs a cert-* secret",
                        )
                    if not entry.disable_client_auth:  # rule 9
                        self.error(
                            f"{path}.DisableClientAuth",
                            "Cert is set, so client authentication must be disabled: "
                            "set DisableClientAuth to true",
                        )
                elif entry.disable_client_auth:  # rule 10
                    self.error(
                        f"{path}.DisableClientAuth",
                        "client authentication can only be disabled together with a custom Cert: "
                        "set Cert to a certificate secret, or remove DisableClientAuth",
                    )
            for index, entry in enumerate(tls_tag.outgoing):  # rule 11
                path = f"TLS.{tag_name}.Outgoing[{index}]"
                if not entry.addr:
                    self.error(f"{path}.Addr", "missing: set the address this Marble connects to")
                if not entry.port:
                    self.error(f"{path}.Port", "missing: set the port this Marble connects to, as a string")

    # -- rules 12-14 and the certificate check of GenerateUsers -------------------------------------

    def users(self) -> None:
        m = self.m
        # Rule 14 compares what authenticates a user: the certificate's DER (the first PEM block),
        # not its PEM text, so a copy with other line endings or other text around it is the same.
        seen: dict[bytes | str, str] = {}
        for user_name, user in m.users.items():
            path = f"Users.{user_name}"
            if not user.certificate:  # rule 12
                self.error(f"{path}.Certificate", "missing: paste the user's X.509 certificate (PEM)")
            else:
                der = self.user_certificate(user.certificate, f"{path}.Certificate")
                identity: bytes | str = der if der is not None else user.certificate
                if identity in seen:  # rule 14
                    self.error(
                        f"{path}.Certificate",
                        f'same certificate as user "{seen[identity]}": '
                        "each user needs a certificate of their own",
                    )
                seen.setdefault(identity, user_name)
            for index, role in enumerate(user.roles):  # rule 13
                if role not in m.roles:
                    self.error(f"{path}.Roles[{index}]", _no_such("role", role, m.roles, "Roles"))

    def user_certificate(self, pem: str, path: str) -> bytes | None:
        """The DER of the user's certificate (its first PEM block), or None after reporting why not."""
        block = _first_pem_block(pem)
        if block is None:
            self.error(path, "not a PEM certificate: paste a -----BEGIN CERTIFICATE----- block")
            return None
        try:
            cert = x509.load_pem_x509_certificate(block[1].encode("utf-8"))
        except (ValueError, UnicodeEncodeError):
            self.error(
                path, "the first PEM block is not a valid X.509 certificate: paste the user's certificate"
            )
            return None
        return cert.public_bytes(serialization.Encoding.DER)

    # -- rules 15-20 -------------------------------------------------------------------------------

    def roles(self) -> None:
        m = self.m
        for role_name, role in m.roles.items():
            path = f"Roles.{role_name}"
            actions = [a.lower() for a in role.actions]
            if role.resource_type == "Packages":  # rule 15
                for index, name in enumerate(role.resource_names):
                    if name not in m.packages:
                        self.error(
                            f"{path}.ResourceNames[{index}]",
                            _no_such("package", name, m.packages, "Packages"),
                        )
                self.actions(path, role.actions, ("UpdateSecurityVersion",), "Packages")
            elif role.resource_type == "Secrets":  # rules 16-18
                self.actions(path, role.actions, ("ReadSecret", "WriteSecret"), "Secrets")
                for index, name in enumerate(role.resource_names):
                    name_path = f"{path}.ResourceNames[{index}]"
                    if name not in self.secret_names:
                        self.error(name_path, _no_such("secret", name, self.secret_names, "Secrets"))
                        continue
                    secret = m.secrets.get(name)
                    if secret is None:
                        continue  # unknown type: reported at Secrets.<name>.Type
                    if "writesecret" in actions and not secret.user_defined:  # rule 17
                        self.error(
                            name_path,
                            f'grants WriteSecret on "{name}", which is not user-defined: '
                            f"set UserDefined: true on Secrets.{name} or drop WriteSecret from this role",
                        )
                    if "readsecret" in actions and not (secret.shared or secret.user_defined):  # rule 18
                        self.error(
                            name_path,
                            f'grants ReadSecret on "{name}", a per-Marble secret that has no single value: '
                            f"set Shared: true on Secrets.{name} or drop it from this role",
                        )
            elif role.resource_type == "Manifest":  # rule 19
                if role.resource_names:
                    self.error(
                        f"{path}.ResourceNames",
                        "resource names are not allowed for ResourceType Manifest: remove ResourceNames",
                    )
                self.actions(path, role.actions, ("UpdateManifest",), "Manifest")
            else:  # rule 20
                self.error(
                    f"{path}.ResourceType",
                    f'unknown resource type "{role.resource_type}"'
                    + (did_you_mean(role.resource_type, RESOURCE_TYPES) or "")
                    + ': use "Packages", "Secrets" or "Manifest" (case-sensitive)',
                )

    def actions(
        self, path: str, actions: Iterable[str], allowed: tuple[str, ...], resource_type: str
    ) -> None:
        allowed_folded = {a.lower() for a in allowed}
        for index, action in enumerate(actions):
            if action.lower() not in allowed_folded:
                choices = " or ".join(f'"{a}"' for a in allowed)
                self.error(
                    f"{path}.Actions[{index}]",
                    f'unknown action "{action}" for ResourceType {resource_type}: use {choices}',
                )

    # -- rules 21-22 and secret generation checks --------------------------------------------------

    def secrets(self) -> None:
        for name, written in self.parsed.unknown_secret_types.items():  # rule 21
            types = [t.value for t in SecretType]
            self.error(
                f"Secrets.{name}.Type",
                (f'unknown type "{written}"' if written else "missing")
                + (did_you_mean(written, types) if written else "")
                + ": use one of " + ", ".join(f'"{t}"' for t in types),
            )
        for name, secret in self.m.secrets.items():
            self.secret(name, secret, f"Secrets.{name}")

    def secret(self, name: str, secret: Secret, path: str) -> None:
        if (
            secret.type.is_certificate
            and secret.cert_template is not None
            and secret.cert_template.not_after is not None
            and secret.valid_for != 0
        ):  # rule 22
            self.error(
                f"{path}.ValidFor",
                "ambiguous certificate validity: Cert.NotAfter and ValidFor are both set; keep one",
            )
        size_path = f"{path}.Size"
        if secret.type is SecretType.PLAIN:
            if not secret.user_defined:
                self.error(
                    f"{path}.UserDefined",
                    "plain secrets are never generated: set UserDefined: true and upload the value",
                )
            return
        if secret.type is SecretType.SYMMETRIC_KEY:
            bad_size = secret.size == 0 or secret.size % 8 != 0
            if secret.user_defined:
                if bad_size:  # MarbleRun accepts this; uploads then always fail
                    self.warn(
                        size_path,
                        "a user-defined symmetric-key needs Size (bits, a nonzero multiple of 8) "
                        "or every upload of it is refused",
                    )
            elif bad_size:
                self.error(
                    size_path,
                    f"a symmetric-key needs a Size in bits that is a nonzero multiple of 8 "
                    f"(e.g. 128 or 256), got {secret.size}",
                )
            elif secret.size > SYMMETRIC_MAX_BITS:
                self.error(size_path, f"at most {SYMMETRIC_MAX_BITS} bits (8160 bytes), got {secret.size}")
            return
        if secret.user_defined:
            return  # never generated: MarbleRun does not check the size
        if secret.type is SecretType.CERT_ECDSA and secret.size not in ECDSA_SIZES:
            self.error(
                size_path,
                f"cert-ecdsa needs Size 224, 256, 384 or 521 (the curve), got {secret.size}",
            )
        elif secret.type is SecretType.CERT_ED25519 and secret.size != 0:
            self.error(size_path, f"cert-ed25519 has a fixed key size: remove Size (got {secret.size})")
        elif secret.type is SecretType.CERT_RSA and not RSA_MIN_BITS <= secret.size <= RSA_MAX_BITS:
            self.error(
                size_path,
                f"cert-rsa needs Size between {RSA_MIN_BITS} and {RSA_MAX_BITS} bits (e.g. 3072), "
                f"got {secret.size}",
            )

    # -- rules 23-28 -------------------------------------------------------------------------------

    def config(self) -> None:
        m = self.m
        config = m.config
        if config.update_threshold:  # rule 23
            updaters = sum(1 for user in m.users.values() if self.can_update_manifest(user.roles))
            if updaters < config.update_threshold:
                self.error(
                    "Config.UpdateThreshold",
                    f"not enough users with manifest update permission ({updaters}) to meet the threshold "
                    f"of {config.update_threshold}: lower UpdateThreshold or give more users a role with "
                    "ResourceType Manifest and action UpdateManifest",
                )
        written = self.parsed.seal_mode_written
        if written not in SEAL_MODES:  # rule 24
            self.error(
                "Config.SealMode",
                f'unknown seal mode "{written}"'
                + did_you_mean(written, [s for s in SEAL_MODES if s])
                + ': use "ProductKey" (the default), "UniqueKey" or "Disabled" (case-sensitive)',
            )
        for index, gate in enumerate(config.feature_gates):
            path = f"Config.FeatureGates[{index}]"
            if gate == "AzureHSMSealing":  # rule 26
                self.error(
                    path,
                    "AzureHSMSealing is not supported by marblekeep: remove it "
                    "(the state is sealed with the platform's sealing key)",
                )
            elif gate.lower() not in FEATURE_GATES:  # rule 25
                self.error(
                    path,
                    f'unknown feature gate "{gate}"'
                    + did_you_mean(gate, ["SignQuoteEndpoint", "MonotonicCounter"])
                    + ': use "SignQuoteEndpoint" or "MonotonicCounter"',
                )
        keys = len(m.recovery_keys)
        if config.recovery_threshold == 1:  # rule 28
            self.error(
                "Config.RecoveryThreshold",
                "invalid recovery threshold 1: if set, the threshold must be at least 2 (0 means all keys)",
            )
        elif keys < config.recovery_threshold:  # rule 27
            self.error(
                "Config.RecoveryThreshold",
                f"not enough recovery keys ({keys}) for a threshold of {config.recovery_threshold}: "
                "add RecoveryKeys or lower RecoveryThreshold",
            )

    def can_update_manifest(self, role_names: Iterable[str]) -> bool:
        roles = self.m.roles
        return any(
            name in roles
            and roles[name].resource_type == "Manifest"
            and any(a.lower() == "updatemanifest" for a in roles[name].actions)
            for name in role_names
        )

    def recovery_keys(self) -> None:
        for name, pem in self.m.recovery_keys.items():
            path = f"RecoveryKeys.{name}"
            block = _first_pem_block(pem)
            if block is None or block[0] != "PUBLIC KEY":
                found = f" (found a {block[0]} block)" if block else ""
                self.error(
                    path,
                    f"given PEM data is not a public key{found}: "
                    "give an RSA public key as a -----BEGIN PUBLIC KEY----- (PKIX) block",
                )
                continue
            try:
                key = load_pem_public_key(block[1].encode("utf-8"))
            except (ValueError, UnicodeEncodeError):
                self.error(path, "the PUBLIC KEY block does not decode: give a PKIX RSA public key")
                continue
            except UnsupportedAlgorithm:
                self.error(path, "the PUBLIC KEY block holds an unsupported key: give an RSA public key")
                continue
            if not isinstance(key, rsa.RSAPublicKey):
                self.error(path, "not an RSA key: recovery keys must be RSA public keys (e.g. 3072 bits)")
            elif key.key_size < RECOVERY_KEY_MIN_BITS:
                self.error(
                    path,
                    f"RSA key of {key.key_size} bits is too small: use at least {RECOVERY_KEY_MIN_BITS} bits",
                )


def suppressed(path: str, failed: Iterable[str]) -> bool:
    """True when *path* lies at or under a path whose value already failed to parse."""
    return any(
        path == f or path.startswith((f + ".", f + "["))
        for f in failed
        if f
    )


def check_manifest(parsed: ParsedManifest) -> tuple[list[Problem], list[Problem]]:
    """Run every rule on a parsed manifest: (problems, warnings), shape problems first."""
    checker = _Checker(parsed)
    checker.run()
    failed = {p.path for p in parsed.problems}
    problems = list(parsed.problems)
    problems.extend(p for p in checker.problems if not suppressed(p.path, failed))
    warnings = list(parsed.warnings) + checker.warnings
    return problems, warnings

