"""Every public module imports on its own in a fresh interpreter; the layering has no cycle back up.

An import cycle can hide in a test run (whichever module the run imported first decides the
order) and still break a user's first ``import``. So each module is imported by itself, in a new
process, as a user's script would.
"""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import pytest

import marblekeep.templating

SRC = Path(__file__).resolve().parents[1] / "src"


def _public_modules() -> list[str]:
    names = []
    for path in sorted((SRC / "marblekeep").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        names.append(".".join(parts))
    return names


MODULES = _public_modules()


def test_the_module_list_is_complete() -> None:
    assert "marblekeep" in MODULES
    assert {"marblekeep.templating", "marblekeep.manifest.model", "marblekeep.cli.main"} <= set(MODULES)
    assert len(MODULES) > 60


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_in_a_fresh_interpreter(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(out.stdout.split())


def test_templating_sits_below_the_manifest_package() -> None:
    # templating owns the SecretValue protocol; the dry run (manifest.dryrun) sits above both.
    loaded = _loaded_after("marblekeep.templating")
    assert not {m for m in loaded if m.startswith("marblekeep.manifest")}
    assert "marblekeep.templating" in _loaded_after("marblekeep.manifest.dryrun")


def test_the_templating_docstring_example_runs() -> None:
    result = doctest.testmod(marblekeep.templating, raise_on_error=False)
    assert result.attempted >= 3
    assert result.failed == 0
