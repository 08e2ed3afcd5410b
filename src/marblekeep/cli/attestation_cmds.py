"""``marblekeep attestation ...``: offline quote verification with explanations.

``marblekeep attestation verify QUOTE --collateral FILE [--at RFC3339]
[--manifest FILE --package NAME] [--json]`` verifies an SGX or TDX quote against collateral
(a dcap-qvl JSON file, a bundle, or a directory of them; or ``--pccs-url``), prints the
verdict, TCB status, advisories and measurements, and — with a package — every failed
policy check. Exit status: 0 verified (and accepted by the package, if one is given),
1 refused, 2 usage error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.collateral import (
    DirectoryCollateralSource,
    PccsCollateralSource,
    load_collateral_file,
)
from marblekeep.attestation.dcap import Collateral, collateral_key_of_quote, verify_quote
from marblekeep.attestation.evidence import parse_header, strip_oe_header
from marblekeep.attestation.explain import AttestationRefused, FailedCheck, rfc3339
from marblekeep.attestation.policy import check_package
from marblekeep.errors import AttestationError, CollateralError, ManifestError, MarbleKeepError
from marblekeep.manifest import load_manifest, manifest_source_to_json
from marblekeep.manifest.model import Package


@click.group()
def attestation() -> None:
    """Verify SGX and TDX quotes offline and explain the verdict."""


def _read_quote(path: Path) -> bytes:
    """A quote file: binary, or the same as hex or base64 text."""
    try:
        data = path.read_bytes() if str(path) != "-" else sys.stdin.buffer.read()
    except OSError as exc:
        raise click.UsageError(f"QUOTE {path}: {exc.strerror or 'cannot be read'}") from None
    text = data.strip()
    if text and all(chr(c) in string.hexdigits for c in text) and len(text) % 2 == 0:
        return bytes.fromhex(text.decode("ascii"))
    if text and all(chr(c) in string.ascii_letters + string.digits + "+/=_-\n\r" for c in text):
        try:
            return base64.b64decode(text.replace(b"-", b"+").replace(b"_", b"/"), validate=False)
        except (binascii.Error, ValueError):
            pass
    return data


def _parse_at(value: str | None) -> dt.datetime:
    if value is None:
        return dt.datetime.now(dt.UTC)  # the CLI is the edge: the only place that reads the clock
    try:
        moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an RFC 3339 time (e.g. 2025-06-25T00:00:00Z)", param_hint="--at"
        ) from None
    if moment.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} has no time zone; add Z for UTC (e.g. 2025-06-25T00:00:00Z)", param_hint="--at"
        )
    return moment.astimezone(dt.UTC)


def _load_package(manifest_path: Path, name: str) -> Package:
    try:
        data = manifest_path.read_bytes()
    except OSError as exc:
        raise click.UsageError(f"--manifest {manifest_path}: {exc.strerror or 'cannot be read'}") from None
    try:
        manifest = load_manifest(manifest_source_to_json(data, str(manifest_path)))
    except ManifestError as exc:
        raise click.UsageError(f"--manifest {manifest_path}: {exc.diagnostics()}") from None
    if name not in manifest.packages:
        known = ", ".join(sorted(manifest.packages)) or "none"
        raise click.UsageError(f"--package {name!r} is not in {manifest_path} (packages: {known})")
    return manifest.packages[name]


def _load_collateral_file(path: Path) -> list[Collateral]:
    try:
        return load_collateral_file(path)
    except CollateralError as exc:
        raise click.UsageError(f"--collateral: {exc.message}") from None


def _collateral_for(quote: bytes, collateral_path: Path | None, pccs_url: str | None) -> Collateral:
    if pccs_url:
        return asyncio.run(PccsCollateralSource(pccs_url).fetch(quote))
    assert collateral_path is not None
    key = collateral_key_of_quote(quote)
    if collateral_path.is_dir():
        return DirectoryCollateralSource(collateral_path).find(key)
    candidates = [c for c in _load_collateral_file(collateral_path) if c.key == key]
    if not candidates:
        raise CollateralError(
            f"collateral file {collateral_path} holds no collateral for this quote's platform {key}:"
            f" fetch the collateral for FMSPC {key.fmspc} (CA {key.ca})"
        )
    return max(candidates, key=lambda c: (c.not_before, c.not_after))


@dataclass
class _Report:
    at: dt.datetime
    package: str | None
    quote_kind: str = ""
    collateral: Collateral | None = None
    claims: TeeClaims | None = None
    error: MarbleKeepError | None = None
    failed: list[FailedCheck] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.claims is not None

    @property
    def accepted(self) -> bool:
        return self.verified and self.error is None

    @property
    def verdict(self) -> str:
        if not self.verified:
            return "not verified"
        if self.package is None:
            return "verified"
        return "accepted" if self.accepted else "refused"

    def measurements(self) -> dict[str, object]:
        c = self.claims
        if c is None:
            return {}
        if c.kind is TeeKind.TDX:
            values: dict[str, object] = {"MRTD": c.mrtd}
            values.update({f"RTMR{i}": r for i, r in enumerate(c.rtmrs)})
            values.update({"MRSEAM": c.mrseam, "debug": c.debug})
            return values
        return {
            "MRENCLAVE": c.mrenclave,
            "MRSIGNER": c.mrsigner,
            "ISVPRODID": c.isv_prod_id,
            "ISVSVN": c.isv_svn,
            "debug": c.debug,
        }

    def as_json(self) -> dict[str, object]:
        c = self.claims
        col = self.collateral
        return {
            "verdict": self.verdict,
            "verified": self.verified,
            "accepted": (self.accepted if self.package is not None else None),
            "package": self.package,
            "at": rfc3339(self.at),
            "quote": self.quote_kind,
            "tee": c.kind.value if c else None,
            "tcb_status": c.tcb_status if c else None,
            "advisory_ids": list(c.advisory_ids) if c else [],
            "measurements": self.measurements(),
            "report_data": c.report_data.hex() if c else None,
            "collateral": col.status(self.at) if col else None,
            "error": (
                {"code": self.error.code, "message": self.error.message} if self.error is not None else None
            ),
            "failed_checks": [f.as_dict() for f in self.failed],
        }

    def lines(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        verdict = self.verdict.upper()
        if self.package is not None:
            verdict += f" (package {self.package})"
        rows.append(("verdict", verdict))
        rows.append(("quote", self.quote_kind or "?"))
        rows.append(("verification time", rfc3339(self.at)))
        if self.collateral is not None:
            col = self.collateral
            rows.append(
                (
                    "collateral",
                    f"{col.key}, valid {rfc3339(col.not_before)} .. {rfc3339(col.not_after)}"
                    f" ({col.expires_first} expires first)",
                )
            )
        if self.claims is not None:
            c = self.claims
            rows.append(("TCB status", c.tcb_status))
            rows.append(("advisories", ", ".join(c.advisory_ids) or "none"))
            for name, value in self.measurements().items():
                rows.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
            rows.append(("report data", c.report_data.hex()))
        if self.failed:
            for check in self.failed:
                rows.append(("failed check", f"{check.field}: {check.message}"))
        elif self.error is not None:
            rows.append(("reason", self.error.message))
        return rows


def _print_human(report: _Report) -> None:
    rows = report.lines()
    if sys.stdout.isatty():
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        colour = {"ACCEPTED": "green", "VERIFIED": "green"}.get(report.verdict.upper(), "red")
        for label, value in rows:
            style = colour if label == "verdict" else ("red" if label in ("failed check", "reason") else "")
            table.add_row(label, f"[{style}]{value}[/{style}]" if style else value)
        Console().print(table)
        return
    for label, value in rows:
        click.echo(f"{label}: {value}")


@attestation.command()
@click.argument(
    "quote_file",
    metavar="QUOTE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, allow_dash=True),
)
@click.option(
    "--collateral",
    "collateral_path",
    type=click.Path(exists=True, path_type=Path),
    help="Collateral: a dcap-qvl JSON file, a bundle (JSON array) or a directory of them.",
)
@click.option("--pccs-url", help="Fetch the collateral from this PCCS / Intel PCS instead.")
@click.option(
    "--at", "at_text", metavar="RFC3339", help="Verification time (default: now), e.g. 2025-06-25T00:00:00Z."
)
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Manifest (JSON or YAML) holding the package to check the quote against.",
)
@click.option("--package", "package_name", metavar="NAME", help="Package of --manifest to apply.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify(
    quote_file: Path,
    collateral_path: Path | None,
    pccs_url: str | None,
    at_text: str | None,
    manifest_path: Path | None,
    package_name: str | None,
    as_json: bool,
) -> None:
    """Verify QUOTE (an SGX or TDX quote; binary, hex or base64; raw or with an OE header).

    Prints the verdict, TCB status, advisories and measurements. With --manifest and
    --package, also applies that package's policy and lists every failed check.
    Exit status: 0 verified (and accepted), 1 refused, 2 usage error.
    """
    if (collateral_path is None) == (pccs_url is None):
        raise click.UsageError("give exactly one of --collateral FILE and --pccs-url URL")
    if (manifest_path is None) != (package_name is None):
        raise click.UsageError("--manifest and --package go together: the package NAME of that manifest")
    at = _parse_at(at_text)
    package = _load_package(manifest_path, package_name) if manifest_path and package_name else None
    quote = _read_quote(quote_file)

    report = _Report(at=at, package=package_name)
    try:
        raw = strip_oe_header(quote)
        header = parse_header(raw)
        oe = " with an Open Enclave header" if len(raw) != len(quote) else ""
        report.quote_kind = f"{header.kind.value.upper()} quote v{header.version}{oe}, {len(raw)} bytes"
    except AttestationError as exc:
        report.error = exc
    if report.error is None:
        try:
            report.collateral = _collateral_for(quote, collateral_path, pccs_url)
        except AttestationError as exc:  # includes CollateralError
            report.error = exc
    if report.error is None and report.collateral is not None:
        try:
            report.claims = verify_quote(quote, report.collateral, at)
            if package is not None and package_name is not None:
                check_package(package_name, package, report.claims)
        except AttestationRefused as exc:
            report.error = exc
            report.failed = list(exc.checks)
        except AttestationError as exc:
            report.error = exc

    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_human(report)
    if not report.accepted:
        raise SystemExit(1)


@attestation.command("fetch-collateral")
@click.argument(
    "quote_file",
    metavar="QUOTE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, allow_dash=True),
)
@click.option("--pccs-url", required=True, help="PCCS or Intel PCS (https://api.trustedservices.intel.com).")
@click.option("--api-key", envvar="MARBLEKEEP_PCS_API_KEY", help="Intel PCS subscription key, if needed.")
@click.option("--insecure-tls", is_flag=True, help="Accept a PCCS with a self-signed TLS certificate.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=True, writable=True, path_type=Path),
    help="File to write, or a directory (file named <tee>-<FMSPC>-<ca>.json). Default: stdout.",
)
def fetch_collateral(
    quote_file: Path, pccs_url: str, api_key: str | None, insecure_tls: bool, output: Path | None
) -> None:
    """Fetch the collateral for QUOTE's platform, for air-gapped verification.

    Run it on a connected machine; copy the file into the Coordinator's collateral directory.
    Collateral is signed by Intel, so --insecure-tls does not weaken verification.
    """
    quote = _read_quote(quote_file)
    source = PccsCollateralSource(pccs_url, api_key=api_key, verify_tls=not insecure_tls)
    try:
        collateral = asyncio.run(source.fetch(quote))
    except MarbleKeepError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        raise SystemExit(1) from None
    summary = (
        f"{collateral.key}: valid {rfc3339(collateral.not_before)} .. {rfc3339(collateral.not_after)}"
        f" (TCB evaluation data number {collateral.tcb_evaluation_data_number})"
    )
    if output is None:
        click.echo(collateral.raw_json.decode("utf-8"))
        click.echo(summary, err=True)
        return
    target = output
    if output.is_dir():
        target = output / f"{collateral.tee.value}-{collateral.fmspc}-{collateral.ca}.json"
    try:
        target.write_bytes(collateral.raw_json)
    except OSError as exc:
        raise click.UsageError(f"--output {target}: {exc.strerror or 'cannot be written'}") from None
    click.echo(f"wrote {target}: {summary}", err=True)
