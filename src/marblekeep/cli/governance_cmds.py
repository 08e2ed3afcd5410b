"""Governance commands: user-defined secrets, manifest updates, and the audit log.

``marblekeep secret get NAME... ADDR -c CERT -k KEY [-o FILE]``,
``marblekeep secret set FILE ADDR -c CERT -k KEY [--from-pem NAME]``,
``marblekeep manifest update apply|acknowledge FILE ADDR -c CERT -k KEY [-r FILE]``,
``marblekeep manifest update cancel ADDR -c CERT -k KEY``,
``marblekeep manifest update get ADDR [--missing] [-o FILE]``,
``marblekeep log get ADDR [-o FILE]`` and ``marblekeep log verify [ADDR] [--file FILE]``.

Connections, trust (attest on first contact, then the pinned root) and error handling are those of
the other client commands (:mod:`marblekeep.cli.client_cmds`). User-authenticated commands send
the manifest user's certificate and key (``-c/--cert``, ``-k/--key``) as the TLS client
certificate. Exit status: 0 ok, 1 refused or failed (for ``log verify``: the log is broken), 2 usage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from marblekeep.cli.client_cmds import (
    _handle_errors,
    _open,
    _read_manifest,
    _trust_options,
    client_cert_pair,
    echo_json,
    json_option,
    show_manifest_warnings,
    user_cert_options,
)
from marblekeep.cli.files import MANIFEST_FILE, read_file, save_recovery_data, write_output
from marblekeep.client import UpdateAnswer, clean_text, default_cert_path, load_pinned_root
from marblekeep.core.auditlog import LogHead, LogVerification, parse_head, verify_log
from marblekeep.crypto.pki import der_to_pem
from marblekeep.errors import ConfigError, NotFoundError, RequestError

__all__ = ["add_governance_commands", "log_group", "secret", "update"]


# ---------------------------------------------------------------------------------- helpers


def _save_recovery(answer: UpdateAnswer, path: Path | None) -> None:
    if not answer.recovery_secrets:
        return
    if path is None:
        click.secho(
            "WARNING: the new recovery data is printed to this terminal, where scrollback and logs may keep"
            " it; save it and clear it, or pass -r FILE (written with mode 0600)",
            fg="red",
            bold=True,
            err=True,
        )
    save_recovery_data(
        answer.recovery_secrets,
        path,
        heading="The update changed the recovery keys. New recovery data (keep it safe):",
        saved="New recovery data saved to",
    )


def _user(cert: Path | None, key: Path | None) -> tuple[Path, Path]:
    pair = client_cert_pair(cert, key)
    if pair is None:
        raise click.UsageError(
            "this command needs a manifest user's certificate and key: -c/--cert CERT -k/--key KEY"
        )
    return pair


# ---------------------------------------------------------------------------------- secrets


@click.group()
def secret() -> None:
    """Read and set user-defined secrets (needs a manifest user with ReadSecret / WriteSecret)."""


def _pem_or_none(label: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return der_to_pem(base64.b64decode(value, validate=True), label).decode()
    except (binascii.Error, ValueError):
        return None


def _format_secret(name: str, doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"{clean_text(name)}: (malformed answer)\n"
    kind = str(doc.get("Type", ""))
    lines = [f"{clean_text(name)}:", f"  Type:        {clean_text(kind)}"]
    if doc.get("Size"):
        lines.append(f"  Size:        {doc.get('Size')}")
    lines.append(f"  Shared:      {bool(doc.get('Shared'))}")
    lines.append(f"  UserDefined: {bool(doc.get('UserDefined'))}")
    private = doc.get("Private")
    if kind.startswith("cert-"):
        if doc.get("ValidFor"):
            lines.append(f"  ValidFor:    {doc.get('ValidFor')} days")
        for label, field_name, pem_label in (
            ("Cert", "Cert", "CERTIFICATE"),
            ("Public", "Public", "PUBLIC KEY"),
            ("Private", "Private", "PRIVATE KEY"),
        ):
            pem = _pem_or_none(pem_label, doc.get(field_name))
            lines.append(f"  {label}:" + ("\n" + pem.rstrip("\n") if pem else " (not set)"))
    elif not isinstance(private, str) or not private:
        lines.append("  Value:       (not set)")
    else:
        try:
            value = base64.b64decode(private, validate=True)
        except (binascii.Error, ValueError):
            lines.append("  Value:       (malformed answer)")
        else:
            if kind == "plain":
                try:
                    lines.append(f"  Value:       {clean_text(value.decode('utf-8'))}")
                except UnicodeDecodeError:
                    lines.append(f"  Value (hex): {value.hex()}")
            else:
                lines.append(f"  Value (hex): {value.hex()}")
    return "\n".join(lines) + "\n"


@secret.command("get")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.argument("addr", metavar="ADDR")
@user_cert_options
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the secrets as JSON (name → MarbleRun Secret object) to this file (mode 0600).",
)
@json_option
@_trust_options
@_handle_errors
def secret_get(
    names: tuple[str, ...],
    addr: str,
    cert: Path | None,
    key: Path | None,
    output: Path | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Print the user-defined or shared secrets NAME... (the read is recorded in the audit log).

    \b
    Example:
      marblekeep secret get api_key db_cert localhost:4433 -c alice.crt -k alice.key
      marblekeep secret get api_key localhost:4433 -c alice.crt -k alice.key -o secrets.json
    """
    with _open(addr, kwargs, _user(cert, key)) as conn:
        secrets = conn.client.read_secrets(names)
    if output is not None:
        write_output((json.dumps(secrets, indent=2) + "\n").encode(), output, "secrets", private=True)
        return
    if as_json:
        echo_json({"secrets": secrets})
        return
    for name in names:
        if name in secrets:
            click.echo(_format_secret(name, secrets[name]), nl=False)


def _pem_upload(data: bytes, name: str) -> dict[str, Any]:
    """``{NAME: {Cert, Private}}`` from the first CERTIFICATE and the first *PRIVATE KEY* PEM block."""
    cert_der: bytes | None = None
    private_der: bytes | None = None
    text = data.decode("ascii", "replace")
    for block in text.split("-----BEGIN ")[1:]:
        label, _, rest = block.partition("-----")
        body, _, _ = rest.partition("-----END ")
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"--from-pem: the {label} block is not valid base64") from None
        if label == "CERTIFICATE" and cert_der is None:
            cert_der = der
        elif "PRIVATE" in label and private_der is None:
            if "ENCRYPTED" in label:
                raise RequestError("--from-pem: the private key is encrypted: decrypt it first")
            private_der = der
    if cert_der is None:
        raise RequestError("--from-pem: the file has no CERTIFICATE block")
    try:
        x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise RequestError("--from-pem: the CERTIFICATE block is not an X.509 certificate") from None
    if private_der is not None:
        try:
            serialization.load_der_private_key(private_der, password=None)
        except (ValueError, TypeError):
            raise RequestError(
                "--from-pem: the PRIVATE KEY block is not an unencrypted private key"
            ) from None
    entry: dict[str, Any] = {"Cert": base64.b64encode(cert_der).decode()}
    if private_der is not None:
        entry["Private"] = base64.b64encode(private_der).decode()
    return {name: entry}


@secret.command("set")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("addr", metavar="ADDR")
@user_cert_options
@click.option(
    "--from-pem",
    "from_pem",
    metavar="NAME",
    help="FILE is PEM: upload its first certificate and first private key as the secret NAME.",
)
@_trust_options
@_handle_errors
def secret_set(
    file: Path, addr: str, cert: Path | None, key: Path | None, from_pem: str | None, **kwargs: Any
) -> None:
    """Set user-defined secrets from FILE: JSON mapping names to {"Cert", "Private", "Key"}
    (base64), or with --from-pem NAME a PEM certificate and key. All or nothing.

    \b
    Example:
      marblekeep secret set secrets.json localhost:4433 -c alice.crt -k alice.key
      marblekeep secret set tls.pem localhost:4433 -c alice.crt -k alice.key --from-pem web_cert
    """
    data = read_file(file)
    if from_pem is not None:
        upload = _pem_upload(data, from_pem)
    else:
        try:
            upload = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(f"{file}: not valid JSON (use --from-pem NAME for a PEM file)") from None
        if not isinstance(upload, dict):
            raise RequestError(
                f"{file}: must be a JSON object mapping secret names to {{Cert, Private, Key}}"
            )
    with _open(addr, kwargs, _user(cert, key)) as conn:
        conn.client.write_secrets(upload)
    click.echo(f"Secret{'s' if len(upload) != 1 else ''} set: {', '.join(sorted(upload))}")


# ---------------------------------------------------------------------------------- updates


@click.group()
def update() -> None:
    """Update the manifest: raise package SecurityVersions, or replace the manifest with the
    acknowledgement of the users who hold UpdateManifest."""


def _print_missing(answer: UpdateAnswer) -> None:
    if answer.missing_acknowledgments > 0:
        names = ", ".join(clean_text(u) for u in answer.missing_users)
        click.echo(f"{answer.missing_acknowledgments} acknowledgement(s) missing; waiting for: {names}")


_recoverydata_option = click.option(
    "-r",
    "--recoverydata",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save new recovery secrets (if the update changes the recovery keys) to this file.",
)


@update.command("apply")
@click.argument("file", type=MANIFEST_FILE)
@click.argument("addr", metavar="ADDR")
@user_cert_options
@_recoverydata_option
@_trust_options
@_handle_errors
def update_apply(
    file: Path, addr: str, cert: Path | None, key: Path | None, recoverydata: Path | None, **kwargs: Any
) -> None:
    """Propose FILE as an update: a package update ({"Packages": {...}} raising SecurityVersion)
    applies at once; a full manifest applies once enough users acknowledged it (you count as one).

    \b
    Example:
      marblekeep manifest update apply svn-update.json localhost:4433 -c alice.crt -k alice.key
    """
    raw = _read_manifest(file)
    show_manifest_warnings(raw, file)
    with _open(addr, kwargs, _user(cert, key)) as conn:
        answer = conn.client.apply_update(raw)
    if answer.missing_acknowledgments > 0:
        click.echo("Update proposed.")
        _print_missing(answer)
    else:
        click.echo("Update applied. Restart running Marbles to pick up the change.")
    _save_recovery(answer, recoverydata)


@update.command("acknowledge")
@click.argument("file", type=MANIFEST_FILE)
@click.argument("addr", metavar="ADDR")
@user_cert_options
@_recoverydata_option
@_trust_options
@_handle_errors
def update_acknowledge(
    file: Path, addr: str, cert: Path | None, key: Path | None, recoverydata: Path | None, **kwargs: Any
) -> None:
    """Acknowledge the pending update; FILE must be byte-identical to it (after YAML→JSON).

    \b
    Example:
      marblekeep manifest update get localhost:4433 -o pending.json
      marblekeep manifest update acknowledge pending.json localhost:4433 -c bob.crt -k bob.key
    """
    raw = _read_manifest(file)
    show_manifest_warnings(raw, file)
    with _open(addr, kwargs, _user(cert, key)) as conn:
        answer = conn.client.acknowledge_update(raw)
    click.echo(clean_text(answer.message) if answer.message is not None else "Acknowledged.")
    _save_recovery(answer, recoverydata)


@update.command("cancel")
@click.argument("addr", metavar="ADDR")
@user_cert_options
@_trust_options
@_handle_errors
def update_cancel(addr: str, cert: Path | None, key: Path | None, **kwargs: Any) -> None:
    """Cancel the pending update (needs UpdateManifest).

    \b
    Example:
      marblekeep manifest update cancel localhost:4433 -c alice.crt -k alice.key
    """
    with _open(addr, kwargs, _user(cert, key)) as conn:
        answer = conn.client.cancel_update()
    click.echo(clean_text(answer.message) if answer.message is not None else "Update cancelled.")


@update.command("get")
@click.argument("addr", metavar="ADDR")
@click.option("--missing", is_flag=True, help="Print only who still has to acknowledge.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@json_option
@_trust_options
@_handle_errors
def update_get(addr: str, missing: bool, output: Path | None, as_json: bool, **kwargs: Any) -> None:
    """Print the pending update manifest (byte for byte), or with --missing who still has to
    acknowledge it. Anyone may read it.

    \b
    Example:
      marblekeep manifest update get localhost:4433 -o pending.json
      marblekeep manifest update get localhost:4433 --missing
    """
    with _open(addr, kwargs) as conn:
        pending = conn.client.pending_update()
    if pending is None:
        raise NotFoundError(f"no pending update at the Coordinator at {addr}: nothing to acknowledge")
    if as_json:
        raw = pending.manifest
        doc = {
            "message": pending.message,
            "missingUsers": list(pending.missing_users),
            "fingerprint": hashlib.sha256(raw).hexdigest(),
            "manifest": base64.b64encode(raw).decode(),
        }
        write_output((json.dumps(doc, indent=2) + "\n").encode(), output, "pending update")
        return
    if missing:
        click.echo(clean_text(pending.message) if pending.message is not None else "")
        if pending.missing_users:
            click.echo("Missing: " + ", ".join(clean_text(u) for u in pending.missing_users))
        return
    write_output(pending.manifest, output, "pending update manifest")


# ---------------------------------------------------------------------------------- audit log


@click.group("log")
def log_group() -> None:
    """Export and verify the tamper-evident update log (docs/governance.md)."""


@log_group.command("get")
@click.argument("addr", metavar="ADDR")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@json_option
@_trust_options
@_handle_errors
def log_get(addr: str, output: Path | None, as_json: bool, **kwargs: Any) -> None:
    """Export the update log with its signed head as JSON (for `marblekeep log verify --file`).

    The output is always JSON; --json is accepted for symmetry with the other commands.

    \b
    Example:
      marblekeep log get localhost:4433 -o update-log.json
    """
    with _open(addr, kwargs) as conn:
        log = conn.client.update_log_with_head()
    doc = {"updateLog": list(log.lines), "updateLogHead": log.head}
    write_output((json.dumps(doc, indent=2) + "\n").encode(), output, "update log")


def _load_export(path: Path) -> tuple[list[str], LogHead | None]:
    """An exported log: ``log get`` JSON, the data or the whole JSend answer of GET /api/v2/update,
    or bare JSON lines (no head)."""
    data = read_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{path}: not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("data"), dict):
            doc = doc["data"]
        lines = doc.get("updateLog")
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise RequestError(f"{path}: updateLog must be a list of strings")
        head = parse_head(doc.get("updateLogHead"))
        if doc.get("updateLogHead") is not None and head is None:
            raise RequestError(f"{path}: updateLogHead is malformed")
        return list(lines), head
    return [line for line in text.split("\n") if line.strip()], None


def _root_from_file(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise click.FileError(str(path), hint=exc.strerror or "cannot be read") from None
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None


def _report(result: LogVerification) -> None:
    click.echo(result.describe())
    if not result.ok:
        raise SystemExit(1)


@log_group.command("verify")
@click.argument("addr", metavar="[ADDR]", required=False)
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify this exported log (from `marblekeep log get`) instead of the Coordinator's.",
)
@click.option(
    "--root-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The Coordinator's root certificate (PEM) to check the head signature with [default: from "
    "ADDR, else the pinned root].",
)
@_trust_options
@_handle_errors
def log_verify(addr: str | None, file: Path | None, root_cert: Path | None, **kwargs: Any) -> None:
    """Check the update log's hash chain and the root's signature over its head.

    Prints "ok: ..." (exit 0) or "BROKEN: entry N: ..." naming the first entry that is not as the
    Coordinator wrote it (exit 1): edited, removed, inserted or reordered entries are all found.

    \b
    Example:
      marblekeep log verify localhost:4433
      marblekeep log verify --file update-log.json --root-cert root.pem
    """
    if addr is None and file is None:
        raise click.UsageError("give the Coordinator's ADDR, or --file FILE (or both)")
    root = _root_from_file(root_cert) if root_cert is not None else None
    if file is not None:
        lines, head = _load_export(file)
        if root is None and addr is not None:
            with _open(addr, kwargs) as conn:
                root = conn.cert_quote.root
        if root is None:
            pinned_path = kwargs.get("coordinator_cert") or default_cert_path(os.environ, Path.home())
            root = load_pinned_root(pinned_path)  # without ADDR: --coordinator-cert, else the old single pin
        if root is None:
            raise ConfigError(
                "no root certificate to check the log's signature with: give --root-cert FILE or the "
                "Coordinator's ADDR"
            )
        _report(verify_log(lines, head, root))
        return
    assert addr is not None
    with _open(addr, kwargs) as conn:
        log = conn.client.update_log_with_head()
        root = root or conn.cert_quote.root
    _report(verify_log(list(log.lines), parse_head(log.head), root))


# ---------------------------------------------------------------------------------- registration


def add_governance_commands(main: click.Group, manifest: click.Group) -> None:
    """Register ``secret``, ``log`` and ``manifest update`` (called by cli/main.py)."""
    main.add_command(secret)
    main.add_command(log_group)
    manifest.add_command(update)
