"""The ``marblekeep`` group: commands imported only when used (fast --help and --version), the
command table true to the commands, and shell completion (a real subprocess each)."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest

from marblekeep import __version__
from marblekeep.cli.main import COMMANDS, MANIFEST_COMMANDS, main, manifest

HEAVY = ("marblekeep.client", "marblekeep.service", "marblekeep.api", "aiohttp", "httpx", "cryptography")


def _modules_after(args: list[str]) -> set[str]:
    code = (
        "import sys\nfrom marblekeep.cli.main import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["manifest", "--help"]])
def test_help_and_version_import_no_command_module(args: list[str]) -> None:
    loaded = _modules_after(args)
    assert not {m for m in loaded if m.startswith(HEAVY)}, "a command module was imported"


def test_a_command_is_imported_when_used() -> None:
    assert "marblekeep.cli.client_cmds" in _modules_after(["status", "--help"])


@pytest.mark.parametrize(("table", "group"), [(COMMANDS, main), (MANIFEST_COMMANDS, manifest)])
def test_the_command_table_matches_the_commands(
    table: dict[str, tuple[str, str]], group: click.Group
) -> None:
    ctx = click.Context(group)
    for name, (_target, summary) in table.items():
        command = group.get_command(ctx, name)
        assert command is not None, name
        assert command.get_short_help_str(limit=1000) == summary, name


def test_help_lists_every_command_and_version_prints_it() -> None:
    script = [sys.executable, "-m", "marblekeep.cli.main"]
    help_text = subprocess.run([*script, "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"  {name} " in help_text
    version = subprocess.run([*script, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"marblekeep, version {__version__}"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_for_the_shell(shell: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "marblekeep.cli.main", "completion", shell],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "_MARBLEKEEP_COMPLETE" in out and f"{shell}_complete" in out


def test_completion_completes_commands_and_subcommands() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {
            **os.environ,
            "_MARBLEKEEP_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
        }
        script = "import sys\nfrom marblekeep.cli.main import main\nsys.argv[0] = 'marblekeep'\nmain()"
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
        )
        return [line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line]

    assert "manifest" in complete("marblekeep man", 1)
    assert {"set", "signature"} <= set(complete("marblekeep manifest s", 2))
    assert "--json" in complete("marblekeep status --js", 2)
