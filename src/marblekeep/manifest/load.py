"""The manifest's front door: bytes in, a valid :class:`Manifest` (or every problem) out.

``validate_manifest`` runs the whole pipeline and never raises for bad input:

1. strict JSON (UTF-8, no NaN, bounded nesting) into a tree that keeps key order and
   duplicates (:mod:`.gojson`);
2. the shape step with Go ``encoding/json`` semantics (:mod:`.parse`);
3. MarbleRun's rules and set-time checks (:mod:`.validate`);
4. the template dry run of every Marble's Files and Env (:mod:`.dryrun`).

``load_manifest`` is the same, raising :class:`~marblekeep.errors.ManifestError` with every
problem in ``problems``. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from marblekeep.errors import ManifestError, Problem
from marblekeep.manifest.dryrun import dry_run
from marblekeep.manifest.gojson import parse_json
from marblekeep.manifest.model import Manifest
from marblekeep.manifest.parse import parse_manifest_tree
from marblekeep.manifest.validate import check_manifest, suppressed

__all__ = ["ValidationResult", "load_manifest", "manifest_fingerprint", "validate_manifest"]


@dataclass(frozen=True)
class ValidationResult:
    """The verdict on a manifest: the manifest if valid, else ``None``; problems; warnings."""

    manifest: Manifest | None
    problems: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()

    @property
    def valid(self) -> bool:
        return self.manifest is not None


def validate_manifest(raw: bytes) -> ValidationResult:
    """Parse and check *raw* (JSON bytes); report every problem. Never raises for bad input."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError("validate_manifest takes the manifest's raw bytes")
    raw = bytes(raw)
    try:
        tree = parse_json(raw)
    except ManifestError as exc:
        return ValidationResult(manifest=None, problems=exc.problems or (Problem("", exc.message),))
    parsed = parse_manifest_tree(raw, tree)
    problems, warnings = check_manifest(parsed)
    failed = {p.path for p in parsed.problems}
    problems.extend(p for p in dry_run(parsed.manifest) if not suppressed(p.path, failed))
    if problems:
        return ValidationResult(manifest=None, problems=tuple(problems), warnings=tuple(warnings))
    return ValidationResult(manifest=parsed.manifest, warnings=tuple(warnings))


def load_manifest(raw: bytes) -> Manifest:
    """Parse and check *raw*; raise :class:`ManifestError` listing every problem when invalid."""
    result = validate_manifest(raw)
    if result.manifest is None:
        count = len(result.problems)
        first = result.problems[0] if result.problems else Problem("", "invalid")
        more = f" (and {count - 1} more)" if count > 1 else ""
        raise ManifestError(f"manifest is invalid: {first}{more}", problems=result.problems)
    return result.manifest


def manifest_fingerprint(raw: bytes) -> str:
    """Hex SHA-256 of the raw manifest bytes (what ``marblerun manifest signature`` prints)."""
    return hashlib.sha256(raw).hexdigest()
