"""The ``marblekeep`` command: one click group; each domain adds its commands from its own module."""

from __future__ import annotations

import click

from marblekeep import __version__
from marblekeep.cli.attestation_cmds import attestation
from marblekeep.cli.client_cmds import (
    certificate,
    manifest_get,
    manifest_log,
    manifest_set,
    manifest_verify,
    status,
)
from marblekeep.cli.coordinator_cmd import coordinator
from marblekeep.cli.governance_cmds import add_governance_commands
from marblekeep.cli.manifest_cmds import manifest
from marblekeep.cli.marble_cmds import marble
from marblekeep.cli.recover_cmds import add_recover_commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="marblekeep")
def main() -> None:
    """marblekeep: a MarbleRun-compatible Coordinator for confidential computing.

    The Coordinator attests each Marble (a service instance in an SGX enclave or TDX guest)
    and then hands it the keys, certificates and configuration that the manifest defines.
    """


main.add_command(coordinator)
main.add_command(manifest)
main.add_command(attestation)
main.add_command(marble)
main.add_command(status)
main.add_command(certificate)
manifest.add_command(manifest_set)
manifest.add_command(manifest_get)
manifest.add_command(manifest_verify)
manifest.add_command(manifest_log)
add_governance_commands(main, manifest)
add_recover_commands(main)
