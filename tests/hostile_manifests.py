"""Hostile but valid manifests, shared by tests and bench/hostile.py.

``explode_manifest()`` is the "explode" manifest of issue 11 (finding 4): about 3.5 MB of valid JSON
whose one Marble has a Files entry that expands the PEM of a certificate ~140,000 times. Every
rule passes; only the size of what it renders is hostile (about 184 MB per activation with the
Coordinator's real certificates).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["EXPLODE_ACTION", "explode_manifest", "explode_manifest_doc"]

#: One template action that renders a PEM certificate (~1 KB with the real Marble root).
EXPLODE_ACTION = "{{pem .MarbleRun.RootCA.Cert}}"


def explode_manifest_doc(target_bytes: int = 3_500_000) -> dict[str, Any]:
    repeats = target_bytes // len(EXPLODE_ACTION)
    return {
        "Packages": {"pkg": {"UniqueID": "c2720445a45267813688ff73fa188aa060c1b661aefaf1650d42f690697b5ab3"}},
        "Marbles": {
            "small": {"Package": "pkg", "Parameters": {"Env": {"OK": "fine"}}},
            "explode": {
                "Package": "pkg",
                "Parameters": {"Files": {"/srv/explode.pem": EXPLODE_ACTION * repeats}},
            },
        },
    }


def explode_manifest(target_bytes: int = 3_500_000) -> bytes:
    """The explode manifest as JSON bytes (~``target_bytes``; 3.5 MB by default)."""
    return json.dumps(explode_manifest_doc(target_bytes)).encode()
