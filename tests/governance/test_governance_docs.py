"""docs/governance.md stays true: its command lines use real commands and options, its log
messages are the ones the code writes, and its head statement is the one that is signed."""

from __future__ import annotations

import shlex
from pathlib import Path

from marblekeep.core import governance
from marblekeep.core.auditlog import head_statement
from testsupport import check_command_line

DOC = Path(__file__).resolve().parents[2] / "docs" / "governance.md"


def _command_lines() -> list[list[str]]:
    return [
        shlex.split(line[2:]) for line in DOC.read_text().splitlines() if line.startswith("$ marblekeep ")
    ]


def test_every_documented_command_line_is_a_real_command() -> None:
    lines = _command_lines()
    assert len(lines) >= 12
    for argv in lines:
        check_command_line(argv)


def test_documented_log_messages_are_the_ones_written() -> None:
    text = DOC.read_text()
    for name in dir(governance):
        if name.startswith("LOG_"):
            message = getattr(governance, name)
            assert f"`{message}`" in text, f"{name} ({message!r}) is not documented"


def test_documented_head_statement_is_the_signed_one() -> None:
    text = DOC.read_text()
    documented = "marblekeep update log head v1\nentries: 4\nlast: <hex SHA-256 of entry 4>\n"
    assert documented in text
    assert head_statement(4, "<hex SHA-256 of entry 4>").decode() == documented
