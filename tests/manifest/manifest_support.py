"""Helpers for the manifest tests: a minimal valid manifest, real certificates and keys."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from marblekeep.manifest import ValidationResult, validate_manifest

SIGNER = "ab" * 32

_BASE: dict[str, Any] = {
    "Packages": {"pkg": {"SignerID": SIGNER, "ProductID": 1, "SecurityVersion": 1}},
    "Marbles": {"m": {"Package": "pkg"}},
}


def base() -> dict[str, Any]:
    """A minimal valid manifest (as a dict), fresh for each call."""
    return copy.deepcopy(_BASE)


def dumps(manifest: Any) -> bytes:
    return json.dumps(manifest).encode("utf-8")


def check(manifest: Any) -> ValidationResult:
    return validate_manifest(manifest if isinstance(manifest, bytes) else dumps(manifest))


def paths(result: ValidationResult) -> list[str]:
    return [p.path for p in result.problems]


def problem_at(result: ValidationResult, path: str) -> str:
    """The message of the (first) problem at *path*; fails the test if there is none."""
    for problem in result.problems:
        if problem.path == path:
            return problem.message
    raise AssertionError(f"no problem at {path}; problems: {[str(p) for p in result.problems]}")


def warning_at(result: ValidationResult, path: str) -> str:
    for problem in result.warnings:
        if problem.path == path:
            return problem.message
    raise AssertionError(f"no warning at {path}; warnings: {[str(p) for p in result.warnings]}")


@functools.cache
def user_cert_pem(name: str) -> str:
    """A real self-signed ECDSA certificate, one per name (cached)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@functools.cache
def cert_der(name: str) -> bytes:
    return x509.load_pem_x509_certificate(user_cert_pem(name).encode()).public_bytes(
        serialization.Encoding.DER
    )


@functools.cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def rsa_public_pem(bits: int = 2048, pkcs1: bool = False) -> str:
    fmt = serialization.PublicFormat.PKCS1 if pkcs1 else serialization.PublicFormat.SubjectPublicKeyInfo
    return rsa_key(bits).public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


def ec_public_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
