"""The interop tests reuse the end-to-end harness (a real Coordinator subprocess) in tests/e2e."""

from __future__ import annotations

import sys
from pathlib import Path

_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)
