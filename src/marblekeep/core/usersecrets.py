"""Parse a user-defined secret upload (MarbleRun's ``ParseUserSecrets``).

The request body is a JSON object mapping secret names to ``{"Cert": ..., "Private": ..., "Key": ...}``
(field names case-insensitive, as Go's ``encoding/json`` matches them; unknown fields ignored).
``Cert`` is base64 DER; ``Private`` and ``Key`` are base64 (or, as Go accepts for ``[]byte``, a
JSON array of byte values). Every problem is reported at once in one :class:`SecretUploadError`.

Rules (reference §3.7):

- an empty map is refused ("no new secrets defined");
- every name must be a secret of the manifest, and that secret must be ``UserDefined``;
- ``symmetric-key``: the manifest Size must be a nonzero multiple of 8, ``Key`` must be exactly
  ``Size/8`` bytes; ``Cert`` and ``Private`` must not be set;
- ``cert-*``: ``Cert`` is required and must parse; ``Key`` must not be set; ``Public`` is computed from
  the certificate. marblekeep also checks (MarbleRun does not) that a given ``Private`` is an
  unencrypted DER private key whose public key is the certificate's;
- ``plain``: ``Key`` may be anything, even empty; ``Cert`` and ``Private`` must not be set.

Messages name the secret and the field, never a secret byte.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from marblekeep.errors import Problem, SecretUploadError
from marblekeep.manifest.model import Secret, SecretType
from marblekeep.manifest.validate import did_you_mean

__all__ = ["parse_user_secrets"]

_FIELDS = {"cert": "Cert", "private": "Private", "key": "Key"}


@dataclass(frozen=True)
class _Upload:
    cert: bytes | None = None
    private: bytes | None = None
    key: bytes | None = None


def _decode_bytes(value: object, path: str, problems: list[Problem]) -> bytes | None:
    """Go's ``[]byte`` JSON decoding: null → unset, base64 string, or an array of 0..255."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            # Go's StdEncoding skips \r and \n; padding is required; other characters are errors.
            return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            problems.append(Problem(path, "is not valid base64 (standard alphabet with padding)"))
            return None
    if isinstance(value, list):
        if all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value):
            return bytes(value)
        problems.append(Problem(path, "must be a base64 string (an array must hold only numbers 0..255)"))
        return None
    problems.append(Problem(path, "must be a base64 string"))
    return None


def _parse_entry(name: str, value: object, problems: list[Problem]) -> _Upload | None:
    if not isinstance(value, Mapping):
        problems.append(Problem(name, "must be an object with Cert, Private or Key"))
        return None
    found: dict[str, bytes | None] = {}
    before = len(problems)
    for raw_field, field_value in value.items():
        canonical = _FIELDS.get(str(raw_field).lower())
        if canonical is None:
            continue  # unknown fields are ignored, as Go does
        if canonical == "Cert" and isinstance(field_value, Mapping):
            problems.append(Problem(f"{name}.Cert", "must be a base64 DER string, not an object"))
            found[canonical] = None
            continue
        # A later duplicate (different case) overwrites an earlier one, as in Go.
        found[canonical] = _decode_bytes(field_value, f"{name}.{canonical}", problems)
    if len(problems) > before:
        return None  # a field could not be decoded: its format problem is the one to report
    return _Upload(cert=found.get("Cert"), private=found.get("Private"), key=found.get("Key"))


def _check_certificate(
    name: str, upload: _Upload, problems: list[Problem]
) -> tuple[bytes, bytes, bytes] | None:
    """``(cert_der, public_der, private)`` for a certificate secret, or ``None`` after problems."""
    ok = True
    if upload.key is not None:
        problems.append(Problem(f"{name}.Key", "must not be set for a certificate secret; use Cert/Private"))
        ok = False
    if not upload.cert:
        problems.append(Problem(f"{name}.Cert", "is required for a certificate secret (base64 DER)"))
        return None
    try:
        cert = x509.load_der_x509_certificate(upload.cert)
        public_key = cert.public_key()
        public_der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        problems.append(Problem(f"{name}.Cert", "is not a DER X.509 certificate"))
        return None
    private = upload.private or b""
    if private:
        try:
            key = serialization.load_der_private_key(private, password=None)
        except TypeError:
            problems.append(Problem(f"{name}.Private", "is an encrypted private key; upload it unencrypted"))
            return None
        except (ValueError, UnsupportedAlgorithm):
            problems.append(Problem(f"{name}.Private", "is not a DER private key (PKCS#8, PKCS#1 or SEC1)"))
            return None
        key_public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if key_public != public_der:
            problems.append(Problem(f"{name}.Private", "does not belong to the certificate in Cert"))
            return None
    if not ok:
        return None
    return upload.cert, public_der, private


def _check_entry(name: str, upload: _Upload, definition: Secret, problems: list[Problem]) -> Secret | None:
    if definition.type.is_certificate:
        checked = _check_certificate(name, upload, problems)
        if checked is None:
            return None
        cert, public, private = checked
        return dataclasses.replace(definition, cert=cert, public=public, private=private)

    ok = True
    kind = definition.type.value
    for field_name, field_value in (("Cert", upload.cert), ("Private", upload.private)):
        if field_value:
            problems.append(Problem(f"{name}.{field_name}", f"must not be set for a {kind} secret; use Key"))
            ok = False
    key = upload.key
    if definition.type is SecretType.SYMMETRIC_KEY:
        size = definition.size
        if size <= 0 or size % 8:
            problems.append(
                Problem(
                    f"{name}.Key",
                    f"cannot be set: the manifest gives this symmetric key Size {size}, which is not a "
                    "nonzero multiple of 8; fix Size in the manifest",
                )
            )
            return None
        if key is None:
            problems.append(Problem(f"{name}.Key", f"is required: a {size // 8}-byte key (Size {size} bits)"))
            return None
        if len(key) != size // 8:
            problems.append(
                Problem(
                    f"{name}.Key",
                    f"must be exactly {size // 8} bytes (Size {size} bits); the upload has {len(key)} bytes",
                )
            )
            return None
    value = key or b""
    if not ok:
        return None
    return dataclasses.replace(definition, cert=None, private=value, public=value)


def parse_user_secrets(body: object, stored: Mapping[str, Secret]) -> dict[str, Secret]:
    """The new values of the secrets in an upload ``body`` (parsed JSON), checked against ``stored``.

    ``stored`` maps names to the manifest's secrets (their definitions). Returns ``name -> Secret``
    with the definition fields from ``stored`` and the uploaded value. Raises
    :class:`SecretUploadError` listing every problem (``Problem.path`` is ``<name>`` or
    ``<name>.<Field>``).
    """
    if not isinstance(body, Mapping):
        raise SecretUploadError(
            "the secret upload must be a JSON object that maps secret names to {Cert, Private, Key}",
        )
    if not body:
        raise SecretUploadError("no new secrets defined", problems=[Problem("", "no new secrets defined")])
    problems: list[Problem] = []
    out: dict[str, Secret] = {}
    for raw_name, value in body.items():
        name = str(raw_name)
        upload = _parse_entry(name, value, problems)
        definition = stored.get(name)
        if definition is None:
            problems.append(
                Problem(
                    name,
                    "the original manifest does not contain this secret (names are case-sensitive)"
                    + did_you_mean(name, stored),
                )
            )
            continue
        if not definition.user_defined:
            problems.append(
                Problem(name, f"secret {name} is not writeable: only UserDefined secrets can be set")
            )
            continue
        if upload is None:
            continue
        secret = _check_entry(name, upload, definition, problems)
        if secret is not None:
            out[name] = secret
    if problems:
        count = len(problems)
        raise SecretUploadError(
            f"the secret upload has {count} problem{'s' if count != 1 else ''}: {problems[0]}",
            problems=problems,
        )
    return out
