"""Trust on first contact, then pinning: how the CLI (or any SDK user) connects to a Coordinator.

:func:`connect` does, for one Coordinator address:

* **pinned root present** (``settings.cert_path`` exists): connect with TLS that accepts only a
  server certificate signed directly by that root, fetch the certificate chain and check that the
  Coordinator still reports the same root. A mismatch is refused, unless ``insecure`` — then the
  Coordinator is trusted again from scratch (below) and the pin is replaced, with a warning.
* **first contact**: fetch the quote without TLS authentication, with a fresh nonce, and verify it
  (:func:`marblekeep.client.attest.verify_coordinator_quote`: Intel signature and collateral, TCB
  status, report data = SHA-256(root DER ‖ nonce), the era config). Only then is the root saved
  (pinned). An empty quote (a simulation Coordinator) or ``insecure`` skips verification, only if
  ``insecure`` is set, and always with a warning. Without an era config or collateral a real quote
  cannot be verified: that is an error, never a silent pin.

I/O here: the pinned-root file and the network. Time (``now``), the nonce, the collateral source
and the warning sink are inputs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from marblekeep.attestation.dcap import Collateral
from marblekeep.client.api import CertQuote, CoordinatorClient, base_url
from marblekeep.client.attest import DEFAULT_ACCEPTED_TCB_STATUSES, EraConfig, verify_coordinator_quote
from marblekeep.client.pinning import (
    PIN_FILE_ENV,
    PINS_DIR_NAME,
    config_dir,
    load_pinned_root,
    save_pinned_root,
)
from marblekeep.errors import AttestationError

__all__ = ["Connection", "TrustSettings", "connect", "pin_name", "pin_path"]

CollateralFetcher = Callable[[bytes], Collateral]


def pin_name(addr: str) -> str:
    """The file name of ``addr``'s pin: the normalised ``host_port`` with every character other
    than letters, digits, ``.`` and ``-`` replaced by ``_`` (host names cannot hold ``_``)."""
    host, _, port = base_url(addr)[len("https://") :].rpartition(":")
    host = host.strip("[]").lower()
    safe = "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "_" for c in host)
    return f"{safe}_{port}.pem"


def pin_path(addr: str, env: Mapping[str, str], home: Path) -> Path:
    """Where the root of the Coordinator at ``addr`` is pinned: ``$MARBLEKEEP_COORDINATOR_CERT``
    if set (one file for every Coordinator), else ``<config>/marblekeep/pins/<host>_<port>.pem``."""
    explicit = env.get(PIN_FILE_ENV, "").strip()
    if explicit:
        return Path(explicit)
    return config_dir(env, home) / PINS_DIR_NAME / pin_name(addr)



@dataclass(frozen=True)
class TrustSettings:
    """How to decide whether to trust a Coordinator (the CLI's global options)."""

    cert_path: Path
    insecure: bool = False
    era: EraConfig | None = None
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_ACCEPTED_TCB_STATUSES
    collateral: CollateralFetcher | None = None
    nonce: bytes = b""
    client_cert: tuple[Path, Path] | None = None
    timeout: float = 30.0
    #: A single pin file of an earlier version: used (and copied to ``cert_path``) for a Coordinator
    #: that presents the root it holds; ignored for any other Coordinator.
    legacy_cert_path: Path | None = None


@dataclass(frozen=True)
class Connection:
    """An open client plus what :func:`connect` learnt. ``attested``: the quote was verified in this
    call; ``pinned``: the root was (re)pinned in this call."""

    client: CoordinatorClient
    cert_quote: CertQuote
    attested: bool
    pinned: bool

    @property
    def simulation(self) -> bool:
        return self.cert_quote.simulation or not self.cert_quote.quote


def _check_chain(cq: CertQuote, addr: str) -> None:
    if len(cq.chain) < 2:
        return
    try:
        cq.intermediate.verify_directly_issued_by(cq.root)
    except (ValueError, TypeError, InvalidSignature):
        raise AttestationError(
            f"the Coordinator at {addr} sent an intermediate certificate that its root did not sign"
        ) from None


def _attest(
    addr: str, cq: CertQuote, settings: TrustSettings, now: dt.datetime, warn: Callable[[str], None]
) -> bool:
    if not cq.quote:
        if not settings.insecure:
            raise AttestationError(
                f"the Coordinator at {addr} sent an empty quote: it runs in SIMULATION mode (no TEE), so"
                " nothing proves which code holds its keys. For development only, pass -i/--insecure to"
                " trust it anyway"
            )
        warn(
            f"INSECURE: the Coordinator at {addr} runs in SIMULATION mode (empty quote); trusting its root"
            f" certificate WITHOUT attestation because of --insecure, and pinning it in {settings.cert_path}."
        )
        return False
    if settings.insecure:
        warn(
            f"INSECURE: --insecure given: the quote of the Coordinator at {addr} is NOT verified;"
            f" trusting its root certificate as presented and pinning it in {settings.cert_path}."
        )
        return False
    if settings.era is None:
        raise AttestationError(
            f"cannot verify the quote of the Coordinator at {addr}: no era config. Give --era-config"
            " FILE (JSON with the Coordinator enclave's UniqueID, or SignerID, ProductID and"
            " SecurityVersion), or put era-config.json in the current directory"
        )
    if settings.collateral is None:
        raise AttestationError(
            f"cannot verify the quote of the Coordinator at {addr}: no collateral. Give --collateral FILE|DIR"
            " (dcap-qvl JSON) or --pccs-url URL (a PCCS, or https://api.trustedservices.intel.com)"
        )
    if settings.nonce and cq.nonce != settings.nonce:
        warn(
            f"the Coordinator at {addr} only has the legacy v1 quote endpoint, which takes no nonce:"
            " its quote may be an old one (no freshness)."
        )
    collateral = settings.collateral(cq.quote)
    verify_coordinator_quote(
        cq.quote, cq.root, cq.nonce, settings.era, settings.accepted_tcb_statuses, collateral, now
    )
    return True


def _pinned_client(
    addr: str, root: x509.Certificate, settings: TrustSettings, transport: httpx.BaseTransport | None
) -> CoordinatorClient:
    return CoordinatorClient(
        addr, root, client_cert=settings.client_cert, timeout=settings.timeout, transport=transport
    )


def _in_recovery(addr: str, settings: TrustSettings, transport: httpx.BaseTransport | None) -> bool:
    """Whether the (untrusted) Coordinator at ``addr`` says it is in recovery mode: only to word
    advice, never to decide trust."""
    try:
        with CoordinatorClient.unverified(addr, timeout=settings.timeout, transport=transport) as probe:
            return probe.status().code == 1
    except Exception:  # advice only: any failure means "don't know"
        return False


def _mismatch_advice(addr: str, settings: TrustSettings, transport: httpx.BaseTransport | None) -> str:
    if _in_recovery(addr, settings, transport):
        return (
            f"The pinned root is {settings.cert_path}. The Coordinator says it is in RECOVERY mode: it"
            " serves a temporary root until it is recovered, so keep your pin (do not remove or replace"
            " it). Recover it with `marblekeep recover upload ...`, which attests the Coordinator afresh"
            " (docs/operations.md, Recovery); afterwards it presents the pinned root again"
        )
    return (
        f"The pinned root is {settings.cert_path}. If this is not the Coordinator you pinned, do not"
        " trust it. If you set up a new Coordinator at this address on purpose, attest it anew with"
        " -i/--insecure (simulation) or --era-config, which replaces the pin, or use --coordinator-cert"
        " FILE for it"
    )


def _legacy_pin(
    addr: str, settings: TrustSettings, transport: httpx.BaseTransport | None, warn: Callable[[str], None]
) -> Connection | None:
    """Migrate the single pin file of an earlier version: if the Coordinator at ``addr`` presents
    the root it holds, that root becomes ``addr``'s pin; otherwise it pins another Coordinator and
    is ignored here (the Coordinator is then attested as on first contact)."""
    legacy = settings.legacy_cert_path
    if legacy is None or legacy == settings.cert_path:
        return None
    try:
        root = load_pinned_root(legacy)
    except AttestationError:
        return None
    if root is None:
        return None
    client = _pinned_client(addr, root, settings, transport)
    try:
        cq = client.quote()
        if cq.root != root:
            raise AttestationError("another root")
        _check_chain(cq, addr)
    except Exception:  # another Coordinator (or none): no migration, attest as new
        client.close()
        return None
    save_pinned_root(settings.cert_path, root)
    warn(
        f"moved the pin of the Coordinator at {addr} from the single pin file {legacy} (earlier"
        f" versions) to {settings.cert_path}; other Coordinators get their own pin files"
    )
    return Connection(client=client, cert_quote=cq, attested=False, pinned=True)


def connect(
    addr: str,
    settings: TrustSettings,
    *,
    now: dt.datetime,
    warn: Callable[[str], None],
    transport: httpx.BaseTransport | None = None,
) -> Connection:
    """Connect to the Coordinator at ``addr`` (see the module docstring). The caller closes
    ``connection.client``. Raises :class:`AttestationError` when it must not be trusted."""
    pinned = load_pinned_root(settings.cert_path)
    if pinned is None:
        migrated = _legacy_pin(addr, settings, transport, warn)
        if migrated is not None:
            return migrated
    if pinned is not None:
        client = _pinned_client(addr, pinned, settings, transport)
        try:
            cq = client.quote()
            if cq.root != pinned:
                raise AttestationError(
                    f"the Coordinator at {addr} reports a root certificate that differs from the pinned one"
                )
            _check_chain(cq, addr)
            return Connection(client=client, cert_quote=cq, attested=False, pinned=False)
        except AttestationError as exc:
            client.close()
            if not settings.insecure:
                raise AttestationError(
                    f"{exc.message}. {_mismatch_advice(addr, settings, transport)}"
                ) from None
            warn(
                f"INSECURE: the Coordinator at {addr} does not match the pinned root {settings.cert_path};"
                " --insecure given: trusting it anew and REPLACING the pinned root."
            )
        except BaseException:
            client.close()
            raise
    with CoordinatorClient.unverified(addr, timeout=settings.timeout, transport=transport) as probe:
        cq = probe.quote(settings.nonce or None)
    _check_chain(cq, addr)
    attested = _attest(addr, cq, settings, now, warn)
    save_pinned_root(settings.cert_path, cq.root)
    client = _pinned_client(addr, cq.root, settings, transport)
    return Connection(client=client, cert_quote=cq, attested=attested, pinned=True)
