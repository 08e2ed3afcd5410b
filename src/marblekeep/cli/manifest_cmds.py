"""``marblekeep manifest ...``: local manifest commands (validate, signature)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from marblekeep.cli.files import MANIFEST_FILE, read_manifest
from marblekeep.errors import ManifestError, Problem
from marblekeep.manifest import ValidationResult, manifest_fingerprint, validate_manifest


def _check_file(path: Path) -> ValidationResult:
    try:
        raw = read_manifest(path)
    except ManifestError as exc:
        return ValidationResult(manifest=None, problems=exc.problems or (Problem("", exc.message),))
    return validate_manifest(raw)


def _problem_json(problem: Problem) -> dict[str, str]:
    return {"path": problem.path, "message": problem.message}


@click.command()
@click.argument("files", nargs=-1, required=True, type=MANIFEST_FILE)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file and line.")
def validate(files: tuple[Path, ...], as_json: bool) -> None:
    """Check manifests (JSON or YAML; - reads standard input) as a Coordinator would when they are set.

    A .json file must be strict JSON; .yaml/.yml files are YAML; other names and standard input are
    JSON when they start with {, else YAML.

    Prints FILE: valid, or FILE: invalid and one line per problem. Exit status 0 when all
    files are valid, 1 otherwise.
    """
    all_valid = True
    for path in files:
        result = _check_file(path)
        all_valid = all_valid and result.valid
        if as_json:
            record = {
                "file": str(path),
                "valid": result.valid,
                "problems": [_problem_json(p) for p in result.problems],
                "warnings": [_problem_json(p) for p in result.warnings],
            }
            click.echo(json.dumps(record))
            continue
        click.echo(f"{path}: {'valid' if result.valid else 'invalid'}")
        for problem in result.problems:
            click.echo(f"  {problem}")
        for problem in result.warnings:
            click.echo(f"  warning: {problem}")
    if not all_valid:
        raise SystemExit(1)


@click.command()
@click.argument("file", type=MANIFEST_FILE)
def signature(file: Path) -> None:
    """Print the manifest's fingerprint: hex SHA-256 of its JSON bytes (YAML is converted first).

    This is the value the Coordinator reports for the manifest it runs.
    """
    try:
        raw = read_manifest(file)
    except ManifestError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        raise SystemExit(exc.exit_code) from None
    click.echo(manifest_fingerprint(raw))
