"""Public metadata of a sealed state: what the Coordinator must know before it has the DEK.

The sealed store keeps it in plaintext (``meta:public``) and authenticates it with the
sealed index once the DEK is known (:mod:`marblekeep.store.sealed`). It holds nothing
secret:

- ``RecoveryKeys``: the manifest's recovery *public* keys (PEM by name), so that recovery
  uploads no key signed are refused before the DEK is known;
- ``SealedInSimulation``: whether a Coordinator in simulation mode created or ever held the
  state (its keys had no TEE protection then). It is sticky: a state keeps the mark for good,
  also after a non-simulation Coordinator accepted it with the override.

Compact JSON with sorted keys. A state written before this record existed has none
(``None``); the Coordinator writes it the next time it opens such a state normally.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["PublicMetadata"]


@dataclass(frozen=True)
class PublicMetadata:
    recovery_keys: Mapping[str, str] = field(default_factory=dict)
    sealed_in_simulation: bool = False

    def encode(self) -> bytes:
        doc = {
            "SealedInSimulation": self.sealed_in_simulation,
            "RecoveryKeys": {str(k): str(v) for k, v in self.recovery_keys.items()},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, record: bytes | None) -> PublicMetadata | None:
        """The metadata, or ``None`` when the record is absent or unreadable."""
        if record is None:
            return None
        try:
            doc = json.loads(record)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict):
            return None
        keys = doc.get("RecoveryKeys")
        simulation = doc.get("SealedInSimulation")
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            return None
        if not isinstance(simulation, bool):
            return None
        return cls({str(k): v for k, v in keys.items()}, simulation)
