"""Recovery commands: bring a Coordinator in Recovery mode back with the owners' recovery secrets.

Layout (MarbleRun's ``recover`` plus its air-gapped helpers, as one ``recover`` group)::

    marblekeep recover SECRET_FILE ADDR -k KEY.pem          # = recover upload (MarbleRun's form)
    marblekeep recover upload SECRET_FILE ADDR -k KEY.pem   # decrypt, sign, upload
    marblekeep recover public-key ADDR [-o FILE]            # the Coordinator's ephemeral RSA key
    marblekeep recover encrypt-secret SECRET_FILE --coordinator-pub-key FILE -o OUT [-k KEY.pem]
    marblekeep recover sign-secret SECRET_FILE -k KEY.pem -o SIG
    marblekeep recover with-signature SECRET_FILE ADDR -s SIG
    marblekeep recover-with-signature SECRET_FILE ADDR -s SIG   # MarbleRun's spelling of the above

``recover`` runs ``upload`` when its first argument is not one of its subcommands, so MarbleRun's
command line works unchanged; ``recover upload`` is the explicit form (needed only for a secret
file literally named like a subcommand).

SECRET_FILE is what the owner was given when the manifest was set, in any of these forms:

* the JSON that ``marblekeep manifest set -r FILE`` (or ``manifest update ... -r``) writes,
  ``{"RecoverySecrets": {"<name>": "<base64>"}}``: the entry ``--name`` (or, without it, the one
  entry that the private key decrypts);
* the encrypted secret (RSA-OAEP-SHA256 to the owner's key), raw or base64;
* the plaintext secret (16 or 32 bytes, or a 33-byte Shamir share), raw or base64, e.g. what
  ``openssl pkeyutl -decrypt -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256`` printed.

Trust: a Coordinator in Recovery serves a *temporary* root certificate, so it cannot match the
root pinned before (``--coordinator-cert``). These commands therefore attest the Coordinator
afresh (its quote over the temporary root, checked against ``--era-config``; ``--insecure`` for
a simulation Coordinator) and neither check nor replace the pin: the secret goes only to a
genuine Coordinator enclave. After the last upload the pinned root, if any, is used to confirm
that the Coordinator is back with the deployment's root certificate.

Secrets never appear in output or error messages. Exit status: 0 ok, 1 refused or failed,
2 usage or local input error.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import json
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from marblekeep.cli.client_cmds import (
    _TRUST_PARAMS,
    _handle_errors,
    _now,
    _settings,
    _trust_options,
    _warn,
)
from marblekeep.cli.files import write_output
from marblekeep.client import Connection, CoordinatorClient, clean_text, connect, load_pinned_root
from marblekeep.errors import ConfigError, CoordinatorError, MarbleKeepError, RecoveryError
from marblekeep.recovery import (
    decrypt_recovery_secret,
    encrypt_for_coordinator,
    load_private_key,
    sign_recovery_secret,
)

__all__ = [
    "PLAINTEXT_SECRET_SIZES",
    "add_recover_commands",
    "decode_secret_file",
    "decode_signature",
    "plaintext_secret",
    "recover",
    "recover_with_signature",
]

#: Lengths of a plaintext recovery secret: a legacy 16-byte or a 32-byte DEK/XOR share, a Shamir share.
PLAINTEXT_SECRET_SIZES = (16, 32, 33)
MAX_INPUT_BYTES = 1 << 20

F = TypeVar("F", bound=Callable[..., Any])

_B64_CHARS = frozenset(string.ascii_letters + string.digits + "+/=")


# ------------------------------------------------------------------------------ input decoding (pure)


def _base64_text(data: bytes) -> bytes | None:
    """``data`` decoded if it is standard base64 text (whitespace ignored), else None."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    compact = "".join(text.split())
    if not compact or len(compact) % 4 or not set(compact) <= _B64_CHARS:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _json_secrets(data: bytes, source: str) -> dict[str, bytes] | None:
    """The entries of a ``{"RecoverySecrets": {...}}`` document, or None if ``data`` is not one."""
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    entries = doc.get("RecoverySecrets", doc.get("recoverySecrets"))
    if not isinstance(entries, dict):
        raise ConfigError(
            f"{source}: a JSON file without a RecoverySecrets object; give the recovery data file that "
            "`marblekeep manifest set -r FILE` wrote, or the secret itself (raw or base64)"
        )
    found: dict[str, bytes] = {}
    for name, value in entries.items():
        decoded = _base64_text(value.encode("ascii", "replace")) if isinstance(value, str) else None
        if decoded is None:
            raise ConfigError(f"{source}: RecoverySecrets.{clean_text(str(name), 100)} is not base64 text")
        found[str(name)] = decoded
    if not found:
        raise ConfigError(f"{source}: RecoverySecrets is empty (the manifest had no RecoveryKeys)")
    return found


def decode_secret_file(data: bytes, source: str, name: str | None = None) -> dict[str, bytes]:
    """The candidate secrets in a SECRET_FILE: ``{name: bytes}`` from recovery-data JSON (only
    ``name`` if given), else ``{"": bytes}`` for a raw or base64 secret. Encrypted or plaintext is
    decided later (:func:`plaintext_secret`)."""
    if not data.strip():
        raise ConfigError(f"{source}: the file is empty; give the recovery secret file")
    entries = _json_secrets(data, source)
    if entries is not None:
        if name is None:
            return entries
        if name not in entries:
            listed = ", ".join(clean_text(n, 100) for n in sorted(entries))
            raise ConfigError(f"{source}: no recovery secret named {name!r} (the file has: {listed})")
        return {name: entries[name]}
    if name is not None:
        raise ConfigError(
            f"{source}: --name applies only to a recovery data JSON file; this file is one secret"
        )
    if len(data) not in PLAINTEXT_SECRET_SIZES:
        decoded = _base64_text(data)
        if decoded is not None:
            return {"": decoded}
    return {"": data}


def _label(name: str, source: str) -> str:
    return f"{source} (RecoverySecrets.{clean_text(name, 100)})" if name else source


def plaintext_secret(candidates: Mapping[str, bytes], key: rsa.RSAPrivateKey | None, source: str) -> bytes:
    """The plaintext recovery secret: a candidate of 16, 32 or 33 bytes as it is, otherwise the
    candidate that ``key`` decrypts (RSA-OAEP-SHA256). Several JSON entries: the one that decrypts."""
    if len(candidates) == 1:
        ((name, value),) = candidates.items()
        if len(value) in PLAINTEXT_SECRET_SIZES:
            return value
        if key is None:
            raise ConfigError(
                f"{_label(name, source)} holds an encrypted recovery secret ({len(value)} bytes): give the "
                "recovery private key with -k/--key to decrypt it"
            )
        try:
            return decrypt_recovery_secret(value, key)
        except RecoveryError as exc:
            raise RecoveryError(f"{_label(name, source)}: {exc.message}") from None
    if key is None:
        raise ConfigError(
            f"{source} holds several recovery secrets ({', '.join(sorted(candidates))}): choose one with "
            "--name, or give your private key with -k/--key to pick the one it decrypts"
        )
    opened = {}
    for name, value in candidates.items():
        try:
            opened[name] = decrypt_recovery_secret(value, key)
        except RecoveryError:
            continue
    if len(opened) != 1:
        raise RecoveryError(
            f"{source}: {'none' if not opened else 'more than one'} of the recovery secrets "
            f"({', '.join(sorted(candidates))}) decrypts with this private key: give --name NAME, and the "
            "private key whose public half is listed under that name in the manifest's RecoveryKeys"
        )
    return next(iter(opened.values()))


def decode_signature(data: bytes, source: str) -> bytes:
    """A signature file: raw bytes, or base64 text of them."""
    if not data.strip():
        raise ConfigError(f"{source}: the signature file is empty")
    decoded = _base64_text(data)
    return decoded if decoded is not None else data


def load_coordinator_public_key(data: bytes, source: str) -> bytes:
    """The Coordinator's ephemeral key as PKIX DER, from PEM, DER or base64 DER."""
    key: object
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            der = _base64_text(data) or data
            key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: not a public key; save it with `marblekeep recover public-key ADDR -o FILE`"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{source}: the Coordinator's recovery public key must be an RSA key")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ------------------------------------------------------------------------------------------ local I/O


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path} ({exc.strerror})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_INPUT_BYTES} bytes; is this the {what}?")
    return data


def _private_key(path: Path, password_file: Path | None) -> rsa.RSAPrivateKey:
    pem = _read(path, "recovery private key")
    password: bytes | None = None
    if password_file is not None:
        password = _read(password_file, "password file").rstrip(b"\r\n")
    elif b"ENCRYPTED" in pem:
        password = click.prompt(f"Password for {path}", hide_input=True, err=True).encode()
    try:
        return load_private_key(pem, password)
    except RecoveryError as exc:
        raise RecoveryError(f"{path}: {exc.message}") from None


def _secret_from_file(secret_file: Path, name: str | None, key: rsa.RSAPrivateKey | None) -> bytes:
    source = str(secret_file)
    return plaintext_secret(
        decode_secret_file(_read(secret_file, "recovery secret file"), source, name), key, source
    )


# ---------------------------------------------------------------------------------- Coordinator calls


@contextmanager
def _attested(addr: str, kwargs: dict[str, Any]) -> Iterator[tuple[Connection, Path]]:
    """Attest the Coordinator afresh (see the module docstring); yields the connection and the
    path of the pinned root to compare with after recovery (not used for this connection)."""
    trust = {name: kwargs.pop(name) for name in _TRUST_PARAMS}
    settings = _settings(addr, trust)
    pin = settings.cert_path
    with tempfile.TemporaryDirectory(prefix="marblekeep-recover-") as tmp:
        fresh = dataclasses.replace(settings, cert_path=Path(tmp) / "recovery-root.pem")
        temporary = f", and pinning it in {fresh.cert_path}"

        protects = (
            "no TEE protects the recovery secret you send it. Never use a production recovery key with it."
        )
        warned: list[str] = []

        def warn(message: str) -> None:  # the temporary pin file is an implementation detail
            text = message.replace(temporary, " for this command only (nothing is pinned)")
            if "SIMULATION" in text:  # one warning about simulation, not two
                text = f"{text.rstrip('.')}; {protects}"
            warned.append(text)
            _warn(text)

        conn = connect(addr, fresh, now=_now(), warn=warn)
        try:
            if conn.attested:
                click.echo(
                    f"Coordinator at {addr} attested (its temporary recovery root is not pinned).", err=True
                )
            if conn.simulation and not any("SIMULATION" in w for w in warned):
                _warn(f"the Coordinator at {addr} runs in SIMULATION mode: {protects}")
            yield conn, pin
        finally:
            conn.client.close()


def _not_in_recovery_hint(client: CoordinatorClient, addr: str, exc: CoordinatorError) -> MarbleKeepError:
    try:
        st = client.status()
    except MarbleKeepError:
        return exc
    if st.code == 1:
        return exc
    return CoordinatorError(
        f"{exc.message}. The Coordinator at {addr} is not in recovery mode (status {st.code}: "
        f"{st.message}); recovery secrets are only accepted in status 1",
        status=exc.status,
    )


def _confirm_root(addr: str, pin: Path) -> None:
    try:
        pinned = load_pinned_root(pin)
    except MarbleKeepError:
        pinned = None
    if pinned is None:
        click.echo(
            f"Check that it runs your deployment: marblekeep manifest verify MANIFEST {addr}", err=True
        )
        return
    try:
        with CoordinatorClient(addr, pinned) as client:
            st = client.status()
    except MarbleKeepError as exc:
        _warn(
            f"the recovered Coordinator at {addr} does not present the root certificate pinned in {pin}"
            f" ({exc.message}); check which state was recovered before trusting it"
        )
        return
    click.echo(
        f"The Coordinator is back with the root certificate pinned in {pin} "
        f"(status {st.code}: {st.message}).",
        err=True,
    )


def _upload(addr: str, secret: bytes, signature: bytes, kwargs: dict[str, Any]) -> None:
    with _attested(addr, kwargs) as (conn, pin):
        try:
            answer = conn.client.recover(secret, signature)
        except CoordinatorError as exc:
            raise _not_in_recovery_hint(conn.client, addr, exc) from None
    click.echo(clean_text(answer.message))
    if answer.remaining == 0:
        _confirm_root(addr, pin)


# ------------------------------------------------------------------------------------------- commands


class _RecoverGroup(click.Group):
    """``recover ARGS`` runs ``recover upload ARGS`` unless ARGS starts with a subcommand or help."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["upload", *args]
        return super().parse_args(ctx, args)


_name_option = click.option(
    "--name",
    metavar="NAME",
    help="Which entry of a recovery data JSON file (RecoverySecrets.NAME) to use [default: the only "
    "one, or the one the private key decrypts].",
)
_password_option = click.option(
    "--key-password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the password of an encrypted private key [default: ask if it is encrypted].",
)


def _key_option(required: bool) -> Callable[[F], F]:
    return click.option(
        "-k",
        "--key",
        required=required,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="The recovery private key (PEM, RSA) whose public half is in the manifest's RecoveryKeys.",
    )


@click.group(cls=_RecoverGroup)
def recover() -> None:
    """Recover a Coordinator in recovery mode (status 1) with the owners' recovery secrets.

    `marblekeep recover SECRET_FILE ADDR -k KEY.pem` is `recover upload` (MarbleRun's form).
    For air-gapped owners: `public-key` (online), `encrypt-secret` and `sign-secret` (offline),
    then `with-signature` (online). SECRET_FILE: the recovery data JSON that `manifest set -r`
    wrote, or one secret, encrypted or decrypted, raw or base64.

    \b
    Example:
      marblekeep recover recovery.json localhost:4433 -k owner-key.pem
    """


@recover.command("upload")
@click.argument("secret_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("addr", metavar="ADDR")
@_key_option(required=True)
@_password_option
@_name_option
@_trust_options
@_handle_errors
def upload(
    secret_file: Path, addr: str, key: Path, key_password_file: Path | None, name: str | None, **kwargs: Any
) -> None:
    """Decrypt SECRET_FILE with your key, sign it and upload it to the Coordinator at ADDR.

    Prints how many secrets are still missing, or that recovery succeeded. Every owner uploads
    their own secret to the same Coordinator process.

    \b
    Example:
      marblekeep recover upload recovery.json localhost:4433 -k owner-key.pem
      marblekeep recover upload recovery.json localhost:4433 -k owner-key.pem --insecure  # simulation
    """
    private = _private_key(key, key_password_file)
    secret = _secret_from_file(secret_file, name, private)
    _upload(addr, secret, sign_recovery_secret(secret, private), kwargs)


@recover.command("with-signature")
@click.argument("secret_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("addr", metavar="ADDR")
@click.option(
    "-s",
    "--signature",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The signature made by `recover sign-secret` (raw or base64).",
)
@_trust_options
@_handle_errors
def with_signature(secret_file: Path, addr: str, signature: Path, **kwargs: Any) -> None:
    """Upload a prepared secret and its signature (no private key needed here).

    SECRET_FILE is the output of `recover encrypt-secret` (encrypted for this Coordinator's
    ephemeral key) or a plaintext secret; raw or base64.

    \b
    Example:
      marblekeep recover with-signature secret.enc localhost:4433 -s secret.sig
    """
    data = _read(secret_file, "recovery secret file")
    secret = decode_secret_file(data, str(secret_file))
    if set(secret) != {""}:
        raise ConfigError(
            f"{secret_file} is recovery data JSON (secrets encrypted to the owners' keys): prepare the "
            "upload with `recover encrypt-secret` and `recover sign-secret`, or use `recover upload`"
        )
    sig = decode_signature(_read(signature, "signature file"), str(signature))
    _upload(addr, secret[""], sig, kwargs)


@recover.command("public-key")
@click.argument("addr", metavar="ADDR")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the PEM to this file."
)
@_trust_options
@_handle_errors
def public_key(addr: str, output: Path | None, **kwargs: Any) -> None:
    """Save the Coordinator's ephemeral RSA key for encrypted uploads (`encrypt-secret`).

    The key lives only in the running Coordinator process: encrypt for it and upload before
    the Coordinator restarts.

    \b
    Example:
      marblekeep recover public-key localhost:4433 -o coordinator-recovery-pub.pem
    """
    with _attested(addr, kwargs) as (conn, _pin):
        try:
            der = conn.client.recovery_public_key()
        except CoordinatorError as exc:
            raise _not_in_recovery_hint(conn.client, addr, exc) from None
    key = serialization.load_der_public_key(der)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_output(pem, output, "the Coordinator's recovery public key")


@recover.command("encrypt-secret")
@click.argument("secret_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--coordinator-pub-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The Coordinator's ephemeral key, saved by `recover public-key` (PEM or DER).",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@_key_option(required=False)
@_password_option
@_name_option
@_handle_errors
def encrypt_secret(
    secret_file: Path,
    coordinator_pub_key: Path,
    output: Path,
    key: Path | None,
    key_password_file: Path | None,
    name: str | None,
) -> None:
    """Encrypt your recovery secret for the Coordinator's ephemeral key (offline).

    An encrypted SECRET_FILE (as returned at manifest set) is first decrypted with -k/--key;
    a plaintext one is used as it is. Writes raw RSA-OAEP-SHA256 ciphertext.

    \b
    Example:
      marblekeep recover encrypt-secret recovery.json -k owner-key.pem \\
          --coordinator-pub-key coordinator-recovery-pub.pem -o secret.enc
    """
    der = load_coordinator_public_key(_read(coordinator_pub_key, "public key file"), str(coordinator_pub_key))
    private = _private_key(key, key_password_file) if key is not None else None
    secret = _secret_from_file(secret_file, name, private)
    write_output(encrypt_for_coordinator(secret, der), output, "the encrypted recovery secret", private=True)


@recover.command("sign-secret")
@click.argument("secret_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_key_option(required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@_password_option
@_name_option
@_handle_errors
def sign_secret(
    secret_file: Path, key: Path, output: Path, key_password_file: Path | None, name: str | None
) -> None:
    """Sign your plaintext recovery secret (RSA PKCS#1 v1.5, SHA-256) for the upload (offline).

    An encrypted SECRET_FILE is decrypted with the same key first. Writes the raw signature.

    \b
    Example:
      marblekeep recover sign-secret recovery.json -k owner-key.pem -o secret.sig
    """
    private = _private_key(key, key_password_file)
    secret = _secret_from_file(secret_file, name, private)
    write_output(sign_recovery_secret(secret, private), output, "the signature", private=True)


recover_with_signature = click.Command(
    "recover-with-signature",
    params=with_signature.params,
    callback=with_signature.callback,
    help=inspect.cleandoc(with_signature.help or "")
    + "\n\nSame as `marblekeep recover with-signature` (MarbleRun's name).",
)


def add_recover_commands(main: click.Group) -> None:
    """Register ``recover`` (with its subcommands) and ``recover-with-signature`` on ``main``."""
    main.add_command(recover)
    main.add_command(recover_with_signature)
