"""Local files of the CLI commands: read an input, write an output (0600 when it holds secrets).

One place for what every command does with files, so that messages and file modes agree:
a file that cannot be read is a usage error naming it (exit 2); an output that cannot be
written is a :class:`~marblekeep.errors.ConfigError`; confirmations go to stderr so that
stdout carries only the data.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import click

from marblekeep.errors import ConfigError, ManifestError
from marblekeep.manifest.yaml_json import manifest_source_to_json

__all__ = [
    "MANIFEST_FILE",
    "read_file",
    "read_manifest",
    "save_recovery_data",
    "write_output",
    "write_private",
]

#: The click type of a manifest argument: an existing file, or ``-`` for standard input.
MANIFEST_FILE = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)


def read_file(path: Path) -> bytes:
    """The bytes of ``path`` (``-``: standard input); a :class:`click.FileError` (exit 2) naming it
    when it cannot be read."""
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.FileError(str(path), hint=exc.strerror or "cannot be read") from None


def read_manifest(path: Path) -> bytes:
    """The manifest JSON bytes of ``path`` (``-``: standard input): ``*.json`` strict JSON,
    ``*.yaml``/``*.yml`` YAML, anything else JSON when it starts with ``{``, else YAML (see
    :func:`marblekeep.manifest.manifest_source_to_json` and docs/manifest.md). Errors name the file."""
    name = str(path)
    data = read_file(path)
    try:
        return manifest_source_to_json(data, name)
    except ManifestError as exc:
        shown = "standard input" if name == "-" else name
        message = exc.message if exc.message.startswith(shown) else f"{shown}: {exc.message}"
        raise ManifestError(message, problems=exc.problems) from None


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, created with mode 0600 (secrets, recovery data). Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_output(data: bytes, output: Path | None, what: str, *, private: bool = False) -> None:
    """``data`` to stdout, or to ``output`` (mode 0600 if ``private``) with a note on stderr."""
    if output is None:
        click.echo(data, nl=False)
        return
    try:
        if private:
            write_private(output, data)
        else:
            output.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {what} to {output} ({exc.strerror})") from None
    click.echo(f"{what[0].upper()}{what[1:]} written to {output}", err=True)


def save_recovery_data(secrets: Mapping[str, str], path: Path | None, *, heading: str, saved: str) -> None:
    """Recovery secrets (name → base64) as ``{"RecoverySecrets": {...}}``: to ``path`` (0600), or
    printed after ``heading`` when no path is given. If the file cannot be written the data is
    printed anyway before the error, so that it is never lost. ``saved`` starts the confirmation."""
    text = json.dumps({"RecoverySecrets": dict(secrets)}, indent=2) + "\n"
    if path is None:
        click.echo(heading, err=True)
        click.echo(text, nl=False)
        return
    try:
        write_private(path, text.encode())
    except OSError as exc:
        click.echo(text, nl=False)
        raise ConfigError(
            f"cannot write the recovery data to {path} ({exc.strerror}); it is printed above: save it"
        ) from None
    click.echo(f"{saved} {path}", err=True)
