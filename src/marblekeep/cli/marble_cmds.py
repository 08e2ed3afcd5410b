"""``marblekeep marble run``: activate with the Coordinator, apply the Parameters, exec the workload."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

import click

from marblekeep.errors import MarbleKeepError
from marblekeep.marble.premain import (
    DEFAULT_ACTIVATION_TIMEOUT,
    DEFAULT_COORDINATOR_ADDR,
    DEFAULT_DNS_NAMES,
    DEFAULT_UUID_FILE,
    ENV_ACTIVATION_TIMEOUT,
    ENV_ATTESTATION_ROOT,
    ENV_COORDINATOR_ADDR,
    ENV_COORDINATOR_CA_FILE,
    ENV_DNS_NAMES,
    ENV_MARBLE_TYPE,
    ENV_TSM_REPORT_ROOT,
    ENV_UUID_FILE,
    activate,
    apply_parameters,
    exec_command,
    make_config,
    resolve_command,
)

__all__ = ["marble"]

EXIT_EXEC_NOT_FOUND = 127
EXIT_EXEC_FAILED = 126


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            },
            ensure_ascii=False,
        )


def _setup_logging() -> None:
    logger = logging.getLogger("marblekeep")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("EDG_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("marblekeep marble: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@click.group()
def marble() -> None:
    """Run a workload as a Marble of a marblekeep (or MarbleRun-style) deployment."""


@marble.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--coordinator-addr", metavar="HOST:PORT", envvar=ENV_COORDINATOR_ADDR, show_envvar=True,
    help=f"Marble API of the Coordinator, host:port [default: {DEFAULT_COORDINATOR_ADDR}].",
)
@click.option(
    "--type", "marble_type", metavar="NAME", envvar=ENV_MARBLE_TYPE, show_envvar=True,
    help="This Marble's name in the manifest's Marbles section (required).",
)
@click.option(
    "--dns-names", metavar="NAMES", envvar=ENV_DNS_NAMES, show_envvar=True,
    help=f"Comma-separated DNS names (or IPs) for this Marble's certificate [default: {DEFAULT_DNS_NAMES}].",
)
@click.option(
    "--uuid-file", metavar="PATH", envvar=ENV_UUID_FILE, show_envvar=True,
    help=f"File holding this Marble's UUID; created (mode 0600) on first start, reused afterwards. "
    f"The UUID selects the seal key: keep the file [default: ./{DEFAULT_UUID_FILE}].",
)
@click.option(
    "--activation-timeout", metavar="SECONDS", envvar=ENV_ACTIVATION_TIMEOUT, show_envvar=True,
    help="Total seconds to keep retrying while the Coordinator is unreachable or not yet accepting "
    f"Marbles [default: {DEFAULT_ACTIVATION_TIMEOUT:g}].",
)
@click.option(
    "--attestation-root", metavar="DIR", envvar=ENV_ATTESTATION_ROOT, show_envvar=True,
    help="Gramine's attestation filesystem; without it the Marble sends simulation evidence "
    "[default: /dev/attestation].",
)
@click.option(
    "--tsm-report-root", metavar="DIR", envvar=ENV_TSM_REPORT_ROOT, show_envvar=True,
    help="configfs-tsm report directory of a TDX guest, used when there is no Gramine attestation "
    "filesystem [default: /sys/kernel/config/tsm/report].",
)
@click.option(
    "--coordinator-ca-file", metavar="PEM", envvar=ENV_COORDINATOR_CA_FILE, show_envvar=True,
    help="PEM file to verify the Coordinator's TLS certificate with. Without it the Coordinator is not "
    "authenticated: the secrets stay sealed to this Marble, but an impostor could hand out wrong Parameters.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD [ARGS...]]")
def run(
    coordinator_addr: str | None,
    marble_type: str | None,
    dns_names: str | None,
    uuid_file: str | None,
    activation_timeout: str | None,
    attestation_root: str | None,
    tsm_report_root: str | None,
    coordinator_ca_file: str | None,
    command: Sequence[str],
) -> None:
    """Activate with the Coordinator, write Files, set Env, then exec COMMAND.

    If the manifest sets Argv for this Marble, it replaces the command line's ARGS: CMD runs with
    argv [CMD, Argv[1], Argv[2], ...]. Without CMD, Argv[0] is run (looked up in PATH) with argv Argv.
    Relative Files paths are relative to the current directory.

    \b
    Exit status: the command's own (this process becomes the command);
    1 if the Coordinator refused, or did not answer in time;
    2 on a usage or configuration error;
    126/127 if the command cannot be executed / is not found.
    """
    _setup_logging()
    try:
        config = make_config(
            marble_type=marble_type,
            coordinator_addr=coordinator_addr,
            dns_names=dns_names,
            uuid_file=uuid_file,
            activation_timeout=activation_timeout,
            attestation_root=attestation_root,
            coordinator_ca_file=coordinator_ca_file,
            tsm_report_root=tsm_report_root,
        )
        params = activate(config)
        program, argv = resolve_command(params, list(command))
        apply_parameters(params, attestation_root=config.attestation_root)
    except MarbleKeepError as exc:
        click.echo(f"Error: {exc.diagnostics()}", err=True)
        sys.exit(exc.exit_code)
    try:
        exec_command(program, argv)
    except FileNotFoundError:
        click.echo(f"Error: cannot run {program!r}: command not found", err=True)
        sys.exit(EXIT_EXEC_NOT_FOUND)
    except OSError as exc:
        click.echo(f"Error: cannot run {program!r}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_EXEC_FAILED)
