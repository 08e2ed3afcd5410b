"""Runs tests/store/conformance.py against every backend listed there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "marblekeep_tests_store_conformance", Path(__file__).with_name("conformance.py")
)
assert _spec is not None and _spec.loader is not None
_conformance = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _conformance
_spec.loader.exec_module(_conformance)

backend = _conformance.backend
globals().update({n: getattr(_conformance, n) for n in dir(_conformance) if n.startswith("test_")})
