"""The pinned Coordinator root certificate: where it lives, and TLS that trusts only it.

After a Coordinator has been attested once, its root certificate is *pinned* (saved) and every
later connection must present a TLS server certificate that the pinned root signed **directly**.
The direct-signature rule matters: the root also certifies the intermediate CA, which signs every
Marble's TLS certificate and every ``cert-*`` secret; trusting the whole chain would let any Marble
(or anyone holding a certificate secret) impersonate the Coordinator to the CLI. The Coordinator's
own listener certificate is signed by the root itself (MarbleRun serves the root certificate
itself, which passes too). Host names are not checked: the pinned root, not a DNS name, is the
Coordinator's identity (like an SSH host key), so any address that reaches it works.

Where pins live (:func:`marblekeep.client.session.pin_path`): one file per Coordinator address, under
``$XDG_CONFIG_HOME/marblekeep/pins/`` (else ``~/.config/marblekeep/pins/``), named after the
normalised ``host_port`` (``localhost_4433.pem``, ``__1_4433.pem`` for ``[::1]:4433``), so a second
Coordinator is attested and pinned on its own. An explicit file (``--coordinator-cert`` or the
environment variable ``MARBLEKEEP_COORDINATOR_CERT``) pins one Coordinator for every address, as
MarbleRun's ``--coordinator-cert`` does. The single file of earlier versions
(``~/.config/marblekeep/coordinator-cert.pem``, :func:`default_cert_path`) is migrated: a
Coordinator that presents that root gets it as its own pin (see :mod:`marblekeep.client.session`).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from marblekeep.errors import AttestationError, ConfigError

__all__ = [
    "CERT_FILE_NAME",
    "CONFIG_DIR_NAME",
    "PINS_DIR_NAME",
    "PIN_FILE_ENV",
    "NotFromPinnedRoot",
    "PinnedRootContext",
    "config_dir",
    "default_cert_path",
    "load_pinned_root",
    "parse_chain",
    "pinned_context",
    "save_pinned_root",
]

CONFIG_DIR_NAME = "marblekeep"
CERT_FILE_NAME = "coordinator-cert.pem"
PINS_DIR_NAME = "pins"
#: The environment variable naming one pin file for every Coordinator (like --coordinator-cert).
PIN_FILE_ENV = "MARBLEKEEP_COORDINATOR_CERT"


def config_dir(env: Mapping[str, str], home: Path) -> Path:
    base = env.get("XDG_CONFIG_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else home / ".config"
    return root / CONFIG_DIR_NAME


def default_cert_path(env: Mapping[str, str], home: Path) -> Path:
    """The single pin file of earlier versions (migrated on use): ``$XDG_CONFIG_HOME/marblekeep/
    coordinator-cert.pem``, else ``~/.config/marblekeep/coordinator-cert.pem``."""
    return config_dir(env, home) / CERT_FILE_NAME


def parse_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM chain, in order; at least one."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise AttestationError(f"{what}: not a PEM certificate chain")
    return certs


def load_pinned_root(path: Path) -> x509.Certificate | None:
    """The pinned root at ``path`` (the last certificate of the file), or None if there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"pinned Coordinator certificate {path}: cannot be read ({exc.strerror})") from None
    try:
        return parse_chain(data, f"pinned Coordinator certificate {path}")[-1]
    except AttestationError:
        raise ConfigError(
            f"pinned Coordinator certificate {path} holds no PEM certificate: remove it to attest the"
            " Coordinator again, or point --coordinator-cert at the right file"
        ) from None


def save_pinned_root(path: Path, root: x509.Certificate) -> None:
    """Write ``root`` as PEM to ``path`` atomically (parent directories created with mode 0700)."""
    pem = root.public_bytes(serialization.Encoding.PEM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".coordinator-cert-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(
            f"cannot save the Coordinator certificate to {path} ({exc.strerror}): choose another file with"
            " --coordinator-cert"
        ) from None


class NotFromPinnedRoot(ssl.SSLCertVerificationError):
    """The TLS server certificate is not signed directly by the pinned root."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.verify_message = message
        self.verify_code = 0


def _check_peer(context: ssl.SSLContext, leaf_der: bytes | None) -> None:
    if not isinstance(context, PinnedRootContext):  # pragma: no cover - the classes are only set on it
        return
    if leaf_der is None:
        raise NotFromPinnedRoot("the server sent no certificate")
    if leaf_der == context.pinned_root_der:
        return
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        leaf.verify_directly_issued_by(context.pinned_root)
    except (ValueError, TypeError, InvalidSignature):
        raise NotFromPinnedRoot(
            "the server's TLS certificate is not signed directly by the pinned Coordinator root"
        ) from None


class _PinnedSSLSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_peer(self.context, self.getpeercert(binary_form=True))


class _PinnedSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer(self.context, self.getpeercert(binary_form=True))


class PinnedRootContext(ssl.SSLContext):
    """A client context that trusts exactly one Coordinator root and, after the handshake, requires
    the server's certificate to be signed directly by it (see the module docstring)."""

    pinned_root: x509.Certificate
    pinned_root_der: bytes

    def __new__(cls, root: x509.Certificate, *args: Any, **kwargs: Any) -> PinnedRootContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, root: x509.Certificate, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.pinned_root = root
        self.pinned_root_der = root.public_bytes(serialization.Encoding.DER)
        self.sslsocket_class = _PinnedSSLSocket
        self.sslobject_class = _PinnedSSLObject
        self.check_hostname = False
        self.verify_mode = ssl.CERT_REQUIRED
        self.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load_verify_locations(cadata=self.pinned_root_der)


def pinned_context(root: x509.Certificate, client_cert: tuple[Path, Path] | None = None) -> PinnedRootContext:
    """A :class:`PinnedRootContext` for ``root``; with ``(cert_file, key_file)`` it also presents
    that client certificate (user authentication)."""
    ctx = PinnedRootContext(root)
    if client_cert is not None:
        cert_file, key_file = client_cert
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except FileNotFoundError as exc:
            raise ConfigError(f"client certificate: {exc.filename} does not exist") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(
                    f"client certificate {cert_file} / key {key_file}: the key does not match the"
                    " certificate (it is another key pair's private key); give the key that belongs to"
                    " this certificate (-k/--key)"
                ) from None
            raise ConfigError(
                f"client certificate {cert_file} / key {key_file}: cannot be loaded; give a PEM certificate"
                " (-c/--cert) and its unencrypted PEM private key (-k/--key)"
            ) from None
        except OSError:
            raise ConfigError(
                f"client certificate {cert_file} / key {key_file}: cannot be loaded; give a PEM certificate"
                " (-c/--cert) and its unencrypted PEM private key (-k/--key)"
            ) from None
    return ctx
