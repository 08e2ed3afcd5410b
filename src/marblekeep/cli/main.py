"""The ``marblekeep`` command: one click group whose commands are imported only when used.

``marblekeep --help`` and ``--version`` must answer at once (docs/cli.md; ``bench/cli_startup.py``
measures it), so this module imports nothing but click: each command lives in its domain's module
(``client_cmds``, ``governance_cmds``, ``recover_cmds``, ...) and :class:`LazyGroup` imports that
module the first time the command is looked up. The one-line help of every command is written in
:data:`COMMANDS` so that the command list needs no import; a test keeps it equal to the commands'
own help.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from marblekeep import __version__

__all__ = ["COMMANDS", "MANIFEST_COMMANDS", "LazyGroup", "main"]

# name -> (module:attribute, the command's one-line help: its first sentence, as click takes it)
COMMANDS: dict[str, tuple[str, str]] = {
    "attestation": (
        "marblekeep.cli.attestation_cmds:attestation",
        "Verify SGX and TDX quotes offline and explain the verdict.",
    ),
    "certificate": (
        "marblekeep.cli.client_cmds:certificate",
        "Print or save the Coordinator's certificates (PEM).",
    ),
    "completion": (
        "marblekeep.cli.completion_cmd:completion",
        "Print a shell completion script (bash, zsh or fish) for marblekeep.",
    ),
    "coordinator": (
        "marblekeep.cli.coordinator_cmd:coordinator",
        "Run the Coordinator: Client API (default :4433), Marble API (default :2001).",
    ),
    "log": (
        "marblekeep.cli.governance_cmds:log_group",
        "Export and verify the tamper-evident update log (docs/governance.md).",
    ),
    "manifest": (
        "marblekeep.cli.main:manifest",
        "Validate, sign, set and inspect manifests.",
    ),
    "marble": (
        "marblekeep.cli.marble_cmds:marble",
        "Run a workload as a Marble of a marblekeep (or MarbleRun-style) deployment.",
    ),
    "recover": (
        "marblekeep.cli.recover_cmds:recover",
        "Recover a Coordinator in recovery mode (status 1) with the owners' recovery secrets.",
    ),
    "recover-with-signature": (
        "marblekeep.cli.recover_cmds:recover_with_signature",
        "Upload a prepared secret and its signature (no private key needed here).",
    ),
    "secret": (
        "marblekeep.cli.governance_cmds:secret",
        "Read and set user-defined secrets (needs a manifest user with ReadSecret / WriteSecret).",
    ),
    "status": (
        "marblekeep.cli.client_cmds:status",
        "Print the Coordinator's state as CODE: MESSAGE.",
    ),
}

MANIFEST_COMMANDS: dict[str, tuple[str, str]] = {
    "get": (
        "marblekeep.cli.client_cmds:manifest_get",
        "Print the manifest the Coordinator runs, byte for byte as it was set.",
    ),
    "log": (
        "marblekeep.cli.client_cmds:manifest_log",
        "Print the Coordinator's manifest update log, one entry per line.",
    ),
    "set": (
        "marblekeep.cli.client_cmds:manifest_set",
        "Set FILE (JSON or YAML) as the Coordinator's manifest.",
    ),
    "signature": (
        "marblekeep.cli.manifest_cmds:signature",
        "Print the manifest's fingerprint: hex SHA-256 of its JSON bytes (YAML is converted first).",
    ),
    "update": (
        "marblekeep.cli.governance_cmds:update",
        "Update the manifest: raise package SecurityVersions, or replace the manifest with the"
        " acknowledgement of the users who hold UpdateManifest.",
    ),
    "validate": (
        "marblekeep.cli.manifest_cmds:validate",
        "Check manifests (JSON or YAML; - reads standard input) as a Coordinator would when they are set.",
    ),
    "verify": (
        "marblekeep.cli.client_cmds:manifest_verify",
        "Check that the Coordinator runs the manifest FILE (or the fingerprint HEX).",
    ),
}


class LazyGroup(click.Group):
    """A group whose subcommands are ``module:attribute`` strings, imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = self.lazy[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):  # pragma: no cover - a wrong table entry
            raise TypeError(f"{module_name}:{attribute} is not a click command")
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table, without importing the commands."""
        names = [n for n in self.list_commands(ctx) if n in self.lazy or not self.commands[n].hidden]
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [
            (
                name,
                click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)
                if name in self.lazy
                else self.commands[name].get_short_help_str(limit),
            )
            for name in names
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    "marblekeep",
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="marblekeep")
def _main() -> None:
    """marblekeep: a MarbleRun-compatible Coordinator for confidential computing.

    The Coordinator attests each Marble (a service instance in an SGX enclave or TDX guest)
    and then hands it the keys, certificates and configuration that the manifest defines.
    """


main: LazyGroup = _main


@click.group(cls=LazyGroup, lazy=MANIFEST_COMMANDS)
def _manifest() -> None:
    """Validate, sign, set and inspect manifests."""


manifest: LazyGroup = _manifest


if __name__ == "__main__":  # python -m marblekeep.cli.main
    main()
