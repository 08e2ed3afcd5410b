"""Bounds on what one manifest may make the Coordinator do (docs/manifest.md, "Limits").

- :data:`MAX_PARAMETERS_BYTES`: what one Marble receives at activation, rendered: the sum over its
  ``Files`` and ``Env`` entries of the name's and the value's length in bytes, plus each ``Argv``
  string, plus the ``MARBLE_PREDEFINED_*`` and ``MARBLE_TTLS_CONFIG`` variables the Coordinator
  adds. 4 MiB, the most that MarbleRun's premains can receive at all (gRPC's default 4 MB limit on
  a received message). Checked by the dry run when a manifest is set or updated and when
  user-defined secrets are uploaded (with placeholder values of realistic size), and again at
  every activation with the real values.
- :data:`MAX_TEMPLATE_ACTIONS`: ``{{ … }}`` actions in all of a manifest's templates together, so
  that validating a manifest is bounded work whatever its templates render (one action costs
  about 0.1 ms to parse; real manifests have tens).
"""

from __future__ import annotations

__all__ = [
    "MAX_PARAMETERS_BYTES",
    "MAX_TEMPLATE_ACTIONS",
    "PREDEFINED_ENV_ALLOWANCE",
    "TTLS_ENTRY_ALLOWANCE",
]

MAX_PARAMETERS_BYTES = 4 * 1024 * 1024
MAX_TEMPLATE_ACTIONS = 20_000
#: What the dry run counts for the four MARBLE_PREDEFINED_* variables (names and PEM values: the
#: Marble root, the leaf and intermediate chain, the leaf key, the Coordinator root).
PREDEFINED_ENV_ALLOWANCE = 6 * 1024
#: What the dry run counts for each TLS tag entry in MARBLE_TTLS_CONFIG (certificates and a key, PEM).
TTLS_ENTRY_ALLOWANCE = 4 * 1024
