"""``marblekeep manifest ...``: local manifest commands (validate, signature)."""

from __future__ import annotations

import click


@click.group()
def manifest() -> None:
    """Validate, sign, set and inspect manifests."""
