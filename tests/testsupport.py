"""Helpers shared by tests in several directories (import as ``from testsupport import ...``).

Not a conftest: several test directories have their own ``conftest.py``, so importing names
*from* a conftest module is ambiguous. Put shared helpers here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
VECTORS_DIR = SHARED_DIR / "vectors"


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the calling test when it is not there."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need ../shared (the vectors) beside the checkout")
    return path
