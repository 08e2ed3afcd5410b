"""docs/governance.md stays true: its command lines use real commands and options, its log
messages are the ones the code writes, and its head statement is the one that is signed."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from marblekeep.cli.main import main
from marblekeep.core import governance
from marblekeep.core.auditlog import head_statement

DOC = Path(__file__).resolve().parents[2] / "docs" / "governance.md"


def _command_lines() -> list[list[str]]:
    return [
        shlex.split(line[2:]) for line in DOC.read_text().splitlines() if line.startswith("$ marblekeep ")
    ]


def test_every_documented_command_line_is_a_real_command() -> None:
    lines = _command_lines()
    assert len(lines) >= 12
    for argv in lines:
        command: click.Command = main
        words = argv[1:]
        while isinstance(command, click.Group) and words and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        assert not isinstance(command, click.Group), f"{argv}: names no command"
        options = [p for p in command.params if isinstance(p, click.Option)]
        known = {opt for p in options for opt in (*p.opts, *p.secondary_opts)}
        takes_value = {opt for p in options if not p.is_flag for opt in p.opts}
        unknown = [w for w in words if w.startswith("-") and w not in known]
        assert not unknown, f"{' '.join(argv)}: unknown options {unknown}"
        positional = [
            w
            for i, w in enumerate(words)
            if not w.startswith("-") and (i == 0 or words[i - 1] not in takes_value)
        ]
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        required = sum(1 for p in arguments if p.required)
        variadic = any(p.nargs == -1 for p in arguments)
        assert len(positional) >= required, f"{' '.join(argv)}: needs {required} arguments"
        assert variadic or len(positional) <= len(arguments), f"{' '.join(argv)}: too many arguments"


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
