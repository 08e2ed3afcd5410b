"""``marblekeep attestation ...``: offline quote verification."""

from __future__ import annotations

import click


@click.group()
def attestation() -> None:
    """Verify SGX and TDX quotes offline and explain the verdict."""
