"""MarbleRun-compatible manifests: parse, validate, convert from YAML, dry-run templates.

Public API::

    load_manifest(raw: bytes) -> Manifest                  # raises ManifestError(problems=[...])
    validate_manifest(raw: bytes) -> ValidationResult      # never raises for bad input
    yaml_to_json(data: bytes) -> bytes                     # JSON unchanged; YAML as MarbleRun's CLI
    manifest_source_to_json(data, name) -> bytes           # .json strict, .yaml/.yml YAML, else sniffed
    manifest_fingerprint(raw: bytes) -> str                # hex SHA-256 of the raw bytes
    dry_run(manifest, secrets=None) -> list[Problem]       # template dry run (reference §2.5)

The value types live in :mod:`marblekeep.manifest.model`. Modules: ``gojson`` (Go
``encoding/json`` semantics), ``parse`` (shape), ``validate`` (rules), ``dryrun``,
``yaml_json``, ``load`` (the pipeline). See docs/manifest.md.
"""

from marblekeep.manifest.dryrun import dry_run
from marblekeep.manifest.load import ValidationResult, load_manifest, manifest_fingerprint, validate_manifest
from marblekeep.manifest.model import Manifest
from marblekeep.manifest.yaml_json import manifest_source_to_json, yaml_to_json

__all__ = [
    "Manifest",
    "ValidationResult",
    "dry_run",
    "load_manifest",
    "manifest_fingerprint",
    "manifest_source_to_json",
    "validate_manifest",
    "yaml_to_json",
]
