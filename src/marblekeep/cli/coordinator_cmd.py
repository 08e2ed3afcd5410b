"""``marblekeep coordinator``: run the Coordinator."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from marblekeep.api.limits import MAX_TIMEOUT, ConnectionLimits
from marblekeep.api.server import serve
from marblekeep.errors import MarbleKeepError
from marblekeep.logs import configure_logging
from marblekeep.service import CoordinatorConfig
from marblekeep.store.location import parse_store_url

log = logging.getLogger("marblekeep.coordinator")

SIMULATION_BANNER = (
    "SIMULATION MODE: no TEE; Marbles are not attested, the quote is empty and the state is sealed "
    "with a key file on disk. For development and tests only - never for real secrets."
)


def listen_addresses(client: str | None, mesh: str | None, simulation: bool) -> tuple[str, str]:
    """The listen addresses: as given (flag or environment), else all interfaces in a TEE and
    loopback in simulation, where nothing protects the secrets from whoever can connect. Announced."""
    host = "127.0.0.1" if simulation else ""
    chosen = (client or f"{host}:4433", mesh or f"{host}:2001")
    if simulation and (client is None or mesh is None):
        log.warning(
            "simulation: listening on loopback only (Client API %s, Marble API %s); to accept other hosts "
            "pass --client-addr 0.0.0.0:4433 --mesh-addr 0.0.0.0:2001 (or EDG_COORDINATOR_CLIENT_ADDR, "
            "EDG_COORDINATOR_MESH_ADDR)",
            *chosen,
        )
    return chosen


_DEFAULT_LIMITS = ConnectionLimits()
_SECONDS = click.FloatRange(min=0, min_open=True, max=MAX_TIMEOUT)


def _limit_options(f: Callable[..., None]) -> Callable[..., None]:
    """Connection limits of both TLS listeners (docs/operations.md, "Connection limits")."""
    timeouts = [
        ("--handshake-timeout", "MARBLEKEEP_HANDSHAKE_TIMEOUT", "handshake_timeout",
         "Seconds a client has to complete the TLS handshake"),
        ("--header-timeout", "MARBLEKEEP_HEADER_TIMEOUT", "header_timeout",
         "Seconds from a request's first byte until its head (request line and headers) is complete"),
        ("--body-timeout", "MARBLEKEEP_BODY_TIMEOUT", "body_timeout",
         "Seconds from a request's head until its whole body has arrived (else HTTP 408)"),
        ("--idle-timeout", "MARBLEKEEP_IDLE_TIMEOUT", "idle_timeout",
         "Seconds a connection may stay open without a complete request (keep-alive)"),
    ]  # fmt: skip
    f = click.option(
        "--max-connections",
        envvar="MARBLEKEEP_MAX_CONNECTIONS",
        type=click.IntRange(1, 1_000_000),
        default=_DEFAULT_LIMITS.max_connections,
        show_default=True,
        help="Open connections per listener; more are refused, with a log line "
        "(env MARBLEKEEP_MAX_CONNECTIONS).",
    )(f)
    for flag, env, attr, text in reversed(timeouts):
        f = click.option(
            flag,
            envvar=env,
            type=_SECONDS,
            default=getattr(_DEFAULT_LIMITS, attr),
            show_default=True,
            help=f"{text} (env {env}).",
        )(f)
    return f


def _store_tls_options(f: Callable[..., None]) -> Callable[..., None]:
    """The etcds:// client TLS files: --store-ca-file, --store-cert-file, --store-key-file."""
    files = [
        ("--store-ca-file", "MARBLEKEEP_STORE_CA_FILE",
         "etcds://: CA bundle (PEM) that signed etcd's certificate; default: the system's roots"),
        ("--store-cert-file", "MARBLEKEEP_STORE_CERT_FILE", "etcds://: client certificate (PEM) for etcd"),
        ("--store-key-file", "MARBLEKEEP_STORE_KEY_FILE",
         "etcds://: the client certificate's private key (PEM)"),
    ]  # fmt: skip
    for flag, env, text in reversed(files):
        f = click.option(
            flag,
            envvar=env,
            default=None,
            type=click.Path(dir_okay=False, path_type=Path),
            help=f"{text} (env {env}).",
        )(f)
    return f


def _tee_present(attestation_root: Path) -> bool:
    return (attestation_root / "attestation_type").exists()


@click.command()
@click.option(
    "--client-addr",
    envvar="EDG_COORDINATOR_CLIENT_ADDR",
    default=None,
    help="Client API listen address (env EDG_COORDINATOR_CLIENT_ADDR) [default: :4433, all interfaces; "
    "with --simulation 127.0.0.1:4433].",
)
@click.option(
    "--mesh-addr",
    envvar="EDG_COORDINATOR_MESH_ADDR",
    default=None,
    help="Marble API listen address (env EDG_COORDINATOR_MESH_ADDR) [default: :2001, all interfaces; "
    "with --simulation 127.0.0.1:2001].",
)
@click.option(
    "--prometheus-addr",
    envvar="EDG_COORDINATOR_PROMETHEUS_ADDR",
    default="",
    help="Serve Prometheus metrics at http://ADDR/metrics (env EDG_COORDINATOR_PROMETHEUS_ADDR; "
    "off when empty).",
)
@click.option(
    "--dns-names",
    envvar="EDG_COORDINATOR_DNS_NAMES",
    default="localhost",
    show_default=True,
    help="Comma-separated names/IPs for the Coordinator's certificates (env EDG_COORDINATOR_DNS_NAMES).",
)
@click.option(
    "--seal-dir",
    envvar="EDG_COORDINATOR_SEAL_DIR",
    default="marblekeep-data",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the sealed state lives (env EDG_COORDINATOR_SEAL_DIR).",
)
@click.option(
    "--store",
    "store_url",
    envvar="MARBLEKEEP_STORE",
    default="",
    metavar="URL",
    help="Where the sealed state lives (env MARBLEKEEP_STORE): unset = SQLite in --seal-dir; "
    "etcd://HOST:PORT[,HOST:PORT...][/PREFIX] = an etcd cluster shared by replicas; etcds://... = etcd "
    "over TLS. See docs/ha.md.",
)
@_store_tls_options
@click.option(
    "--handover-addr",
    envvar="MARBLEKEEP_HANDOVER_ADDR",
    default="",
    metavar="HOST:PORT",
    help="With --store etcd://: the address other replicas reach this one's Marble API at, registered "
    "in etcd for the attested key hand-over (env MARBLEKEEP_HANDOVER_ADDR) [default: --mesh-addr, an "
    "unspecified host replaced by this host's name]. See docs/ha.md.",
)
@click.option(
    "--handover-wait",
    envvar="MARBLEKEEP_HANDOVER_WAIT",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    metavar="SECONDS",
    help="With --store etcd://: how long a replica whose key has no entry waits for a running replica "
    "to hand the key over before it enters recovery (0: do not wait) (env MARBLEKEEP_HANDOVER_WAIT).",
)
@click.option(
    "--simulation",
    is_flag=True,
    envvar="MARBLEKEEP_SIMULATION",
    help="Run without a TEE (INSECURE: development and tests only).",
)
@click.option(
    "--attestation-root",
    default="/dev/attestation",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Gramine's attestation pseudo-filesystem (quotes and sealing keys).",
)
@click.option(
    "--allow-rollback",
    is_flag=True,
    help="Operator override: load a sealed state older than the newest this Coordinator sealed "
    "(restoring a backup). Logged.",
)
@click.option(
    "--unsafe-accept-simulation-state",
    is_flag=True,
    help="UNSAFE operator override: outside simulation, load a sealed state that a Coordinator in "
    "--simulation mode created or held. Its keys never had TEE protection; they would become "
    "production keys. Logged at WARNING on every start. Without it such a state is refused.",
)
@click.option(
    "--pccs-url",
    envvar="MARBLEKEEP_PCCS_URL",
    default="",
    help="Fetch attestation collateral from this PCCS / Intel PCS base URL (env MARBLEKEEP_PCCS_URL).",
)
@click.option(
    "--collateral-dir",
    envvar="MARBLEKEEP_COLLATERAL_DIR",
    default=None,
    type=click.Path(path_type=Path),
    help="Air-gapped: load attestation collateral (dcap-qvl JSON files) from this directory "
    "(env MARBLEKEEP_COLLATERAL_DIR).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="EDG_LOG_FORMAT",
    help="Log format (env EDG_LOG_FORMAT).",
)
@click.option(
    "--debug", is_flag=True, envvar="EDG_DEBUG_LOGGING", help="Debug logging (env EDG_DEBUG_LOGGING=1)."
)
@_limit_options
def coordinator(
    client_addr: str | None,
    mesh_addr: str | None,
    prometheus_addr: str,
    dns_names: str,
    seal_dir: Path,
    store_url: str,
    store_ca_file: Path | None,
    store_cert_file: Path | None,
    store_key_file: Path | None,
    handover_addr: str,
    handover_wait: float,
    simulation: bool,
    attestation_root: Path,
    allow_rollback: bool,
    unsafe_accept_simulation_state: bool,
    pccs_url: str,
    collateral_dir: Path | None,
    log_format: str,
    debug: bool,
    handshake_timeout: float,
    header_timeout: float,
    body_timeout: float,
    idle_timeout: float,
    max_connections: int,
) -> None:
    """Run the Coordinator: Client API (default :4433), Marble API (default :2001).

    Outside a TEE the Coordinator refuses to start unless --simulation is given. State is sealed
    in --seal-dir (or on etcd with --store etcd://...) and survives restarts. Stop it with SIGTERM
    or Ctrl-C.
    """
    configure_logging(log_format, logging.DEBUG if debug else logging.INFO)
    try:
        store = parse_store_url(
            store_url, ca_file=store_ca_file, cert_file=store_cert_file, key_file=store_key_file
        )
    except MarbleKeepError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    if not simulation and not _tee_present(attestation_root):
        click.echo(
            f"Error: no TEE found ({attestation_root}/attestation_type is missing). Run the Coordinator "
            "under Gramine-SGX, or pass --simulation for an INSECURE development instance.",
            err=True,
        )
        sys.exit(2)
    if simulation:
        log.warning(SIMULATION_BANNER)
    client_addr, mesh_addr = listen_addresses(client_addr, mesh_addr, simulation)
    names = tuple(n.strip() for n in dns_names.split(",") if n.strip()) or ("localhost",)
    config = CoordinatorConfig(
        client_addr=client_addr,
        mesh_addr=mesh_addr,
        prometheus_addr=prometheus_addr,
        dns_names=names,
        seal_dir=seal_dir,
        store=store,
        handover_addr=handover_addr,
        handover_wait=handover_wait,
        simulation=simulation,
        allow_rollback=allow_rollback,
        accept_simulation_state=unsafe_accept_simulation_state,
        attestation_root=attestation_root,
        log_format=log_format,
        pccs_url=pccs_url,
        collateral_dir=collateral_dir,
        connection_limits=ConnectionLimits(
            handshake_timeout=handshake_timeout,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        ),
    )
    try:
        asyncio.run(serve(config))
    except MarbleKeepError as exc:
        log.error(exc.diagnostics())
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass
