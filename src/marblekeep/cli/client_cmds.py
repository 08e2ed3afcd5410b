"""Client commands against a running Coordinator (ADDR = host:port of its Client API).

``marblekeep status ADDR``, ``marblekeep certificate root|intermediate|chain ADDR``,
``marblekeep manifest set|get|verify|log ...`` (registered on the ``manifest`` group by
cli/main.py). Trust: the first contact attests the Coordinator and pins its root certificate;
later contacts accept only that Coordinator (see :mod:`marblekeep.client.session` and
docs/cli.md). Exit status: 0 ok, 1 the operation failed or the Coordinator is not trusted,
2 usage or local configuration error. Errors print one ``Error: ...`` line, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import json
import os
import string
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from marblekeep.attestation.collateral import DirectoryCollateralSource, PccsCollateralSource
from marblekeep.attestation.dcap import Collateral
from marblekeep.cli.files import MANIFEST_FILE, read_manifest, save_recovery_data, write_output
from marblekeep.client import (
    DEFAULT_ACCEPTED_TCB_STATUSES,
    Connection,
    EraConfig,
    TrustSettings,
    connect,
    default_cert_path,
    manifest_json,
    parse_era_config,
    pin_path,
)
from marblekeep.core.governance import consolidate_manifest
from marblekeep.errors import ConfigError, CoordinatorError, MarbleKeepError
from marblekeep.manifest import validate_manifest

__all__ = ["certificate", "manifest_get", "manifest_log", "manifest_set", "manifest_verify", "status"]

F = TypeVar("F", bound=Callable[..., Any])

ERA_CONFIG_DEFAULT = Path("era-config.json")
_TRUST_PARAMS = (
    "coordinator_cert",
    "era_config",
    "insecure",
    "accepted_tcb_statuses",
    "collateral",
    "pccs_url",
    "nonce",
)


def _now() -> dt.datetime:
    """The CLI is the edge: the one place that reads the clock (tests replace this)."""
    return dt.datetime.now(dt.UTC)


def _random_nonce() -> bytes:
    return os.urandom(16)


def _warn(message: str) -> None:
    click.secho(f"WARNING: {message}", fg="red", bold=True, err=True)


def _fail(exc: MarbleKeepError) -> None:
    click.echo(f"Error: {exc.diagnostics()}", err=True)
    sys.exit(exc.exit_code)


def _handle_errors(func: F) -> F:
    """Our errors become one ``Error: ...`` line (plus any listed problems) and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MarbleKeepError as exc:
            _fail(exc)
        return None

    return cast(F, wrapper)


# ----------------------------------------------------------------------------------------- trust options


def _trust_options(func: F) -> F:
    """The options that decide whether a Coordinator is trusted (MarbleRun's global flags)."""
    options = [
        click.option(
            "--coordinator-cert",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="MARBLEKEEP_COORDINATOR_CERT",
            help="File of the pinned Coordinator root certificate, for any address (env "
            "MARBLEKEEP_COORDINATOR_CERT) [default: one pin per Coordinator address in "
            "$XDG_CONFIG_HOME/marblekeep/pins/ or ~/.config/marblekeep/pins/].",
        ),
        click.option(
            "--era-config",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="JSON with the Coordinator enclave's expected identity (UniqueID, or SignerID, ProductID, "
            "SecurityVersion; Debug) for verifying its quote on first contact [default: ./era-config.json "
            "if present].",
        ),
        click.option(
            "-i",
            "--insecure",
            is_flag=True,
            help="UNSAFE: trust the Coordinator without verifying its quote (needed for a simulation "
            "Coordinator), and re-pin a Coordinator whose root differs from the pinned one.",
        ),
        click.option(
            "--accepted-tcb-statuses",
            metavar="LIST",
            default=",".join(DEFAULT_ACCEPTED_TCB_STATUSES),
            show_default=True,
            help="Comma-separated TCB statuses accepted for the Coordinator's quote.",
        ),
        click.option(
            "--collateral",
            type=click.Path(exists=True, path_type=Path),
            help="Collateral for verifying the quote: a dcap-qvl JSON file, a bundle or a directory.",
        ),
        click.option(
            "--pccs-url",
            metavar="URL",
            help="Fetch the collateral from this PCCS (or https://api.trustedservices.intel.com).",
        ),
        click.option(
            "--nonce",
            metavar="TEXT",
            help="Nonce (its UTF-8 bytes) the Coordinator's quote must bind [default: 16 random bytes].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def user_cert_options(func: F) -> F:
    """``-c/--cert`` and ``-k/--key``: a manifest user's PEM certificate and key (user-authenticated
    commands); the callback receives ``cert`` and ``key`` (``Path | None``)."""
    func = click.option(
        "-k", "--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="User's PEM key."
    )(func)
    return click.option(
        "-c",
        "--cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="User's PEM certificate (as listed in the manifest's Users).",
    )(func)


def _collateral_fetcher(
    collateral: Path | None, pccs_url: str | None
) -> Callable[[bytes], Collateral] | None:
    if collateral is not None and pccs_url:
        raise click.UsageError("give at most one of --collateral and --pccs-url")
    if collateral is not None:
        directory = DirectoryCollateralSource(collateral)
        return lambda quote: asyncio.run(directory.fetch(quote))
    if pccs_url:
        pccs = PccsCollateralSource(pccs_url)
        return lambda quote: asyncio.run(pccs.fetch(quote))
    return None


def _era(path: Path | None) -> EraConfig | None:
    if path is None:
        if not ERA_CONFIG_DEFAULT.is_file():
            return None
        path = ERA_CONFIG_DEFAULT
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"era config {path}: cannot be read ({exc.strerror})") from None
    return parse_era_config(data, str(path))


def _tcb_statuses(ctx: click.Context, text: str, era: EraConfig | None) -> tuple[str, ...]:
    explicit = ctx.get_parameter_source("accepted_tcb_statuses") not in (
        click.core.ParameterSource.DEFAULT,
        None,
    )
    if not explicit and era is not None and era.accepted_tcb_statuses is not None:
        return era.accepted_tcb_statuses
    statuses = tuple(s.strip() for s in text.split(",") if s.strip())
    if not statuses:
        raise click.BadParameter(
            "give at least one status, e.g. UpToDate", param_hint="--accepted-tcb-statuses"
        )
    return statuses


def _settings(
    addr: str, kwargs: dict[str, Any], client_cert: tuple[Path, Path] | None = None
) -> TrustSettings:
    ctx = click.get_current_context()
    era = _era(kwargs["era_config"])
    explicit: Path | None = kwargs["coordinator_cert"]
    cert_path = explicit or pin_path(addr, os.environ, Path.home())
    nonce_text = kwargs["nonce"]
    return TrustSettings(
        cert_path=cert_path,
        legacy_cert_path=None if explicit else default_cert_path(os.environ, Path.home()),
        insecure=kwargs["insecure"],
        era=era,
        accepted_tcb_statuses=_tcb_statuses(ctx, kwargs["accepted_tcb_statuses"], era),
        collateral=_collateral_fetcher(kwargs["collateral"], kwargs["pccs_url"]),
        nonce=nonce_text.encode() if nonce_text else _random_nonce(),
        client_cert=client_cert,
    )


@contextmanager
def _open(
    addr: str, kwargs: dict[str, Any], client_cert: tuple[Path, Path] | None = None
) -> Iterator[Connection]:
    trust = {name: kwargs.pop(name) for name in _TRUST_PARAMS}
    warned: list[str] = []

    def warn(message: str) -> None:
        warned.append(message)
        _warn(message)

    conn = connect(addr, _settings(addr, trust, client_cert), now=_now(), warn=warn)
    try:
        if conn.attested:
            click.echo(f"Coordinator at {addr} attested; its root certificate is pinned.", err=True)
        if conn.simulation and not any("SIMULATION" in w for w in warned):  # say it once
            _warn(
                f"the Coordinator at {addr} runs in SIMULATION mode: no TEE, no attestation. Never give it"
                " real secrets."
            )
        yield conn
    finally:
        conn.client.close()


def json_option(func: F) -> F:
    """``--json``: print one JSON document with the fields docs/cli.md lists (stable)."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (stable fields, see docs/cli.md)."
    )(func)


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def _cert_json(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serialNumber": format(cert.serial_number, "x"),
        "notBefore": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "notAfter": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def _read_manifest(path: Path) -> bytes:
    return read_manifest(path)


def show_manifest_warnings(raw: bytes, path: Path) -> None:
    """Print on stderr the warnings ``manifest validate`` prints for ``raw`` (unknown fields with a
    suggestion, missing package identities, ...): a typo such as ``MaxActivation`` silently drops
    a limit, so ``manifest set`` and ``update`` show them too. The Coordinator decides validity."""
    for problem in validate_manifest(raw).warnings:
        click.secho(f"warning: {path}: {problem}", fg="yellow", err=True)


# -------------------------------------------------------------------------------------------- commands


@click.command()
@click.argument("addr", metavar="ADDR")
@json_option
@_trust_options
@_handle_errors
def status(addr: str, as_json: bool, **kwargs: Any) -> None:
    """Print the Coordinator's state as CODE: MESSAGE.

    Codes: 1 recovery mode, 2 ready to accept a manifest, 3 running and accepting Marbles.

    \b
    Example:
      marblekeep status localhost:4433
      marblekeep status --insecure localhost:4433   # a simulation Coordinator
    """
    with _open(addr, kwargs) as conn:
        st = conn.client.status()
        if st.simulation and not conn.simulation:
            _warn(st.warning or f"the Coordinator at {addr} reports SIMULATION mode.")
        if as_json:
            echo_json(
                {"code": st.code, "message": st.message, "simulation": st.simulation or conn.simulation}
            )
            return
        click.echo(f"{st.code}: {st.message}")


@click.group()
def certificate() -> None:
    """Print or save the Coordinator's certificates (PEM).

    Clients that trust the root certificate can trust every Marble of the deployment.
    """


def _certificate_command(which: str, summary: str) -> click.Command:
    @click.argument("addr", metavar="ADDR")
    @click.option(
        "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the PEM to this file."
    )
    @json_option
    @_trust_options
    @_handle_errors
    def command(addr: str, output: Path | None, as_json: bool, **kwargs: Any) -> None:
        with _open(addr, kwargs) as conn:
            if as_json:
                certs = conn.cert_quote.certificates(which)
                doc = {"certificates": [_cert_json(c) for c in certs]}
                write_output((json.dumps(doc, indent=2) + "\n").encode(), output, f"{which} certificate")
                return
            write_output(conn.cert_quote.pem(which), output, f"{which} certificate")

    command.__doc__ = (
        f"{summary}\n\n"
        "Fails if the Coordinator's root differs from the pinned one (unless --insecure).\n\n"
        f"\b\nExample:\n  marblekeep certificate {which} localhost:4433 -o {which}.pem"
    )
    return click.command(which)(command)


certificate.add_command(_certificate_command("root", "Print the Coordinator's root CA certificate."))
certificate.add_command(
    _certificate_command(
        "intermediate", "Print the intermediate CA certificate (it signs Marble certificates)."
    )
)
certificate.add_command(
    _certificate_command("chain", "Print the certificate chain: the intermediate, then the root.")
)


@click.command("set")
@click.argument("file", type=MANIFEST_FILE)
@click.argument("addr", metavar="ADDR")
@click.option(
    "-r",
    "--recoverydata",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save the recovery secrets (JSON) to this file (mode 0600) instead of printing them.",
)
@_trust_options
@_handle_errors
def manifest_set(file: Path, addr: str, recoverydata: Path | None, **kwargs: Any) -> None:
    """Set FILE (JSON or YAML) as the Coordinator's manifest.

    Prints the manifest's fingerprint. If the manifest has RecoveryKeys, the encrypted recovery
    secrets are saved to --recoverydata FILE, or printed.

    \b
    Example:
      marblekeep manifest set manifest.json localhost:4433 -r recovery.json
    """
    raw = _read_manifest(file)
    show_manifest_warnings(raw, file)
    fingerprint = hashlib.sha256(raw).hexdigest()
    with _open(addr, kwargs) as conn:
        try:
            secrets = conn.client.set_manifest(raw)
        except CoordinatorError as exc:
            if exc.status in (409, 500) and conn.client.status().code == 3:
                raise CoordinatorError(
                    f"{exc.message}: the Coordinator at {addr} already runs a manifest (see `marblekeep"
                    " manifest get`); a manifest is set once, later changes are manifest updates",
                    status=exc.status,
                ) from None
            raise
        click.echo("Manifest set.")
        click.echo(f"Manifest fingerprint: {fingerprint}")
    if not secrets:
        if recoverydata is not None:
            click.echo("The manifest has no RecoveryKeys: no recovery data to save.", err=True)
        return
    if recoverydata is None:
        _warn(
            "the recovery data is printed to this terminal, where scrollback and logs may keep it; save it"
            " and clear it, or pass -r FILE next time (written with mode 0600)"
        )
    save_recovery_data(
        {name: base64.b64encode(value).decode() for name, value in secrets.items()},
        recoverydata,
        heading="Recovery data (keep it safe; it is needed to recover the Coordinator):",
        saved="Recovery data saved to",
    )


@click.command("get")
@click.argument("addr", metavar="ADDR")
@click.option(
    "-s",
    "--signature",
    "with_signature",
    is_flag=True,
    help='Print {"ManifestSignature": fingerprint, "ManifestSignatureRootECDSA": ..., "Manifest": ...}.',
)
@click.option(
    "-u",
    "--display-update",
    is_flag=True,
    help="Show the SecurityVersions raised by package updates since (from the update log).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@json_option
@_trust_options
@_handle_errors
def manifest_get(
    addr: str, with_signature: bool, display_update: bool, output: Path | None, as_json: bool, **kwargs: Any
) -> None:
    """Print the manifest the Coordinator runs, byte for byte as it was set.

    Its fingerprint and its signature by the Coordinator's root are checked first.

    \b
    Example:
      marblekeep manifest get localhost:4433 -o manifest.json
      marblekeep manifest get -s localhost:4433
    """
    with _open(addr, kwargs) as conn:
        info = conn.client.manifest()
        if info is None:
            raise CoordinatorError(
                f"the Coordinator at {addr} has no manifest yet: set one with `manifest set`"
            )
        info.check(conn.cert_quote.root)
        log_lines = conn.client.update_log() if display_update else []
    data = info.raw
    if display_update:  # the signature stays that of the raw manifest as set
        data = consolidate_manifest(info.raw, log_lines)
    if as_json:
        doc = {
            "fingerprint": info.fingerprint.lower(),
            "signatureRootECDSA": base64.b64encode(info.signature).decode(),
            "manifest": manifest_json(data),
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
    elif with_signature:
        doc = {
            "ManifestSignature": info.fingerprint.lower(),
            "ManifestSignatureRootECDSA": base64.b64encode(info.signature).decode(),
            "Manifest": manifest_json(data),
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
    write_output(data, output, "manifest")


def _expected_fingerprint(target: str) -> tuple[str, str]:
    path = Path(target)
    if path.is_file():
        return hashlib.sha256(_read_manifest(path)).hexdigest(), str(path)
    text = target.strip().lower()
    if len(text) == 64 and all(c in string.hexdigits for c in text):
        return text, "the given fingerprint"
    raise click.BadParameter(
        f"{target!r} is neither a manifest file nor a 64-digit hex SHA-256 fingerprint", param_hint="FILE|HEX"
    )


@click.command("verify")
@click.argument("target", metavar="FILE|HEX")
@click.argument("addr", metavar="ADDR")
@_trust_options
@_handle_errors
def manifest_verify(target: str, addr: str, **kwargs: Any) -> None:
    """Check that the Coordinator runs the manifest FILE (or the fingerprint HEX).

    Exit status 0 if it does, 1 if it runs another manifest or none.

    \b
    Example:
      marblekeep manifest verify manifest.json localhost:4433
      marblekeep manifest verify 4d3c...e1 localhost:4433
    """
    expected, source = _expected_fingerprint(target)
    with _open(addr, kwargs) as conn:
        info = conn.client.manifest()
        if info is None:
            raise CoordinatorError(f"the Coordinator at {addr} has no manifest yet")
        info.check(conn.cert_quote.root)
    actual = info.fingerprint.lower()
    if actual != expected:
        raise CoordinatorError(
            f"the Coordinator at {addr} runs another manifest: fingerprint {actual}, but {source}"
            f" has {expected}"
        )
    click.echo(f"OK: the Coordinator at {addr} runs this manifest (fingerprint {actual}).")


@click.command("log")
@click.argument("addr", metavar="ADDR")
@json_option
@_trust_options
@_handle_errors
def manifest_log(addr: str, as_json: bool, **kwargs: Any) -> None:
    """Print the Coordinator's manifest update log, one entry per line.

    \b
    Example:
      marblekeep manifest log localhost:4433
    """
    with _open(addr, kwargs) as conn:
        lines = conn.client.update_log()
    if as_json:
        echo_json({"entries": [_log_entry(line) for line in lines]})
        return
    for line in lines:
        click.echo(line)


def _log_entry(line: str) -> Any:
    """One update-log line as JSON (each line is a JSON object); a line that is not JSON stays text."""
    try:
        return json.loads(line)
    except ValueError:
        return line


# Kept for later user-authenticated commands: the pair as the SDK wants it.
def client_cert_pair(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    """``(cert, key)`` for the SDK, or None; both or neither must be given."""
    if (cert is None) != (key is None):
        raise click.UsageError("give both -c/--cert and -k/--key (a manifest user's certificate and key)")
    if cert is None or key is None:
        return None
    return cert, key
