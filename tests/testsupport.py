"""Helpers shared by tests in several directories (import as ``from testsupport import ...``).

Not a conftest: several test directories have their own ``conftest.py``, so importing names
*from* a conftest module is ambiguous. Put shared helpers here.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The project's shared folder (design notes and the originals of the vectors): ../shared beside the
#: checkout, or wherever MARBLEKEEP_SHARED_DIR points. No test needs it: the vectors the tests read are
#: copies kept in the repository, so a fresh clone runs every test.
SHARED_DIR = Path(os.environ.get("MARBLEKEEP_SHARED_DIR") or REPO_ROOT.parent / "shared")
#: The test vectors shipped in the repository (copies of ../shared/vectors).
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"
#: The DCAP quote vectors shipped in the repository (a copy of ../shared/vectors/dcap; SHA256SUMS
#: beside them records their digests).
DCAP_VECTORS_DIR = REPO_ROOT / "tests" / "vectors" / "dcap"


def self_signed_user_cert(
    common_name: str = "admin",
    *,
    now: dt.datetime | None = None,
    valid_before: dt.timedelta = dt.timedelta(minutes=5),
    valid_for: dt.timedelta = dt.timedelta(days=1),
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 certificate (PEM) and its key, as a manifest's Users entry takes it."""
    now = now or dt.datetime.now(dt.UTC)
    cert, key = self_signed_cert(common_name, not_before=now - valid_before, not_after=now + valid_for)
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key


def self_signed_cert(
    common_name: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    curve: ec.EllipticCurve | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA certificate (SHA-256; P-256 unless ``curve``) for ``CN=common_name``, and its
    key."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def stop_gracefully(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def check_command_line(argv: Sequence[str], *, exact_arguments: bool = False) -> None:
    """Assert that a documented ``marblekeep ...`` command line names a real command, uses only its
    options and gives it a plausible number of arguments (all of them when ``exact_arguments``)."""
    from marblekeep.cli.main import main  # noqa: PLC0415 (only the doc tests need the CLI)

    shown = " ".join(argv)
    command: click.Command = main
    words = list(argv[1:])
    while isinstance(command, click.Group) and words:
        sub = command.get_command(click.Context(command), words[0])  # the CLI imports commands lazily
        if sub is None:
            break
        words.pop(0)
        command = sub
    assert not isinstance(command, click.Group), f"{shown}: names no command"
    options = [p for p in command.params if isinstance(p, click.Option)]
    known = {opt for p in options for opt in (*p.opts, *p.secondary_opts)}
    takes_value = {opt for p in options if not p.is_flag for opt in p.opts}
    unknown = [w for w in words if w.startswith("-") and w not in known]
    assert not unknown, f"{shown}: unknown options {unknown}"
    positional = [
        w
        for i, w in enumerate(words)
        if not w.startswith("-") and (i == 0 or words[i - 1] not in takes_value)
    ]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if exact_arguments:
        assert len(positional) == len(arguments), f"{shown}: expected {len(arguments)} arguments"
        return
    required = sum(1 for p in arguments if p.required)
    variadic = any(p.nargs == -1 for p in arguments)
    assert len(positional) >= required, f"{shown}: needs {required} arguments"
    assert variadic or len(positional) <= len(arguments), f"{shown}: too many arguments"
