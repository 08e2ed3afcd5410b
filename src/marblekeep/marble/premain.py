"""The Marble side of activation ("premain"): get the Parameters from the Coordinator and apply them.

Flow of :func:`activate` (docs/protocol.md has the wire details)::

    load or create the UUID file
    repeat until activated, refused, or the total timeout is spent:
        POST /marble/v1/challenge                  -> nonce
        fresh X25519 key pair; evidence over expected_report_data(request)
        POST /marble/v1/activate                   -> HPKE-sealed Parameters
        open them with the private key
    (connection errors, 409, 429, 502, 503, 504, and a 403 whose reason is the challenge nonce
     (unknown, expired or used): retry with capped exponential backoff and jitter;
     400/403 and everything else: fail at once with the Coordinator's reason)

Then :func:`apply_parameters` writes Files (parents 0700, files 0600) and sets Env, and
:func:`exec_command` replaces the process with the workload.

By default the Marble does not authenticate the Coordinator, like MarbleRun: the secrets are
sealed to a key that only the attested TEE holds, so an impostor learns nothing; what it *can* do
is hand out wrong Parameters. ``MARBLEKEEP_COORDINATOR_CA_FILE`` closes that gap.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import math
import os
import random
import re
import ssl
import stat
import sys
import time
import uuid as uuid_mod
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn
from uuid import UUID

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.errors import ActivationRefused, AttestationError, ConfigError, RequestError, StateError
from marblekeep.marble.evidence import (
    DEFAULT_ATTESTATION_ROOT,
    DEFAULT_TSM_REPORT_ROOT,
    EvidenceIssuer,
    detect_issuer,
)
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    ActivationRequest,
    MarbleParameters,
    encode_activation_request,
    expected_report_data,
    open_parameters,
    parse_challenge_response,
)

__all__ = [
    "ENV_ACTIVATION_TIMEOUT",
    "ENV_ATTESTATION_ROOT",
    "ENV_COORDINATOR_ADDR",
    "ENV_COORDINATOR_CA_FILE",
    "ENV_DNS_NAMES",
    "ENV_MARBLE_TYPE",
    "ENV_TSM_REPORT_ROOT",
    "ENV_UUID_FILE",
    "MarbleConfig",
    "activate",
    "apply_parameters",
    "config_from_env",
    "coordinator_url",
    "exec_command",
    "load_or_create_uuid",
    "make_config",
    "resolve_command",
]

log = logging.getLogger("marblekeep.marble")

ENV_COORDINATOR_ADDR = "EDG_MARBLE_COORDINATOR_ADDR"
ENV_MARBLE_TYPE = "EDG_MARBLE_TYPE"
ENV_DNS_NAMES = "EDG_MARBLE_DNS_NAMES"
ENV_UUID_FILE = "EDG_MARBLE_UUID_FILE"
ENV_ACTIVATION_TIMEOUT = "MARBLEKEEP_ACTIVATION_TIMEOUT"
ENV_ATTESTATION_ROOT = "MARBLEKEEP_ATTESTATION_ROOT"
ENV_COORDINATOR_CA_FILE = "MARBLEKEEP_COORDINATOR_CA_FILE"
ENV_TSM_REPORT_ROOT = "MARBLEKEEP_TSM_REPORT_ROOT"

DEFAULT_COORDINATOR_ADDR = "localhost:2001"
DEFAULT_DNS_NAMES = "localhost"
DEFAULT_UUID_FILE = "uuid"
DEFAULT_ACTIVATION_TIMEOUT = 120.0

BACKOFF_INITIAL = 0.25  # seconds before the first retry (before jitter)
BACKOFF_CAP = 8.0  # no single wait is longer than this
REQUEST_TIMEOUT_CAP = 30.0  # one HTTP request never waits longer than this

_RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})
#: The refusal label (``data.reason``) for a challenge nonce that is unknown, expired or used.
_CHALLENGE_REFUSED = "replay"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class MarbleConfig:
    """Where to activate and as what. Build it with :func:`make_config` or :func:`config_from_env`."""

    marble_type: str
    coordinator_addr: str = DEFAULT_COORDINATOR_ADDR
    dns_names: tuple[str, ...] = (DEFAULT_DNS_NAMES,)
    uuid_file: Path = Path(DEFAULT_UUID_FILE)
    activation_timeout: float = DEFAULT_ACTIVATION_TIMEOUT
    attestation_root: Path = DEFAULT_ATTESTATION_ROOT
    coordinator_ca_file: Path | None = None
    tsm_report_root: Path = DEFAULT_TSM_REPORT_ROOT


def make_config(
    *,
    marble_type: str | None,
    coordinator_addr: str | None = None,
    dns_names: str | None = None,
    uuid_file: str | None = None,
    activation_timeout: str | float | None = None,
    attestation_root: str | None = None,
    coordinator_ca_file: str | None = None,
    tsm_report_root: str | None = None,
) -> MarbleConfig:
    """Validate raw settings (strings as found in the environment or on the command line)."""
    if not marble_type:
        raise ConfigError(
            f"{ENV_MARBLE_TYPE} is not set: set it (or --type) to this Marble's name in the manifest's "
            "Marbles section"
        )
    addr = coordinator_addr or DEFAULT_COORDINATOR_ADDR
    coordinator_url(addr)  # validates
    names = tuple(n.strip() for n in (dns_names or DEFAULT_DNS_NAMES).split(",") if n.strip())
    timeout: float
    if activation_timeout is None or activation_timeout == "":
        timeout = DEFAULT_ACTIVATION_TIMEOUT
    else:
        try:
            timeout = float(activation_timeout)
        except ValueError:
            timeout = math.nan
        if not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(
                f"{ENV_ACTIVATION_TIMEOUT} must be a positive number of seconds, "
                f"got {str(activation_timeout)!r}"
            )
    return MarbleConfig(
        marble_type=marble_type,
        coordinator_addr=addr,
        dns_names=names,
        uuid_file=Path(uuid_file or DEFAULT_UUID_FILE),
        activation_timeout=timeout,
        attestation_root=Path(attestation_root) if attestation_root else DEFAULT_ATTESTATION_ROOT,
        coordinator_ca_file=Path(coordinator_ca_file) if coordinator_ca_file else None,
        tsm_report_root=Path(tsm_report_root) if tsm_report_root else DEFAULT_TSM_REPORT_ROOT,
    )


def config_from_env(environ: Mapping[str, str] | None = None) -> MarbleConfig:
    """The configuration from MarbleRun's ``EDG_MARBLE_*`` variables and marblekeep's ``MARBLEKEEP_*``."""
    env = os.environ if environ is None else environ
    return make_config(
        marble_type=env.get(ENV_MARBLE_TYPE),
        coordinator_addr=env.get(ENV_COORDINATOR_ADDR),
        dns_names=env.get(ENV_DNS_NAMES),
        uuid_file=env.get(ENV_UUID_FILE),
        activation_timeout=env.get(ENV_ACTIVATION_TIMEOUT),
        attestation_root=env.get(ENV_ATTESTATION_ROOT),
        coordinator_ca_file=env.get(ENV_COORDINATOR_CA_FILE),
        tsm_report_root=env.get(ENV_TSM_REPORT_ROOT),
    )


def _bad_addr(addr: str) -> str:
    return f"{ENV_COORDINATOR_ADDR} {addr!r} is not host:port (e.g. coordinator:2001)"


def coordinator_url(addr: str) -> str:
    """``host:port``, ``[v6]:port`` or ``https://host:port`` → the HTTPS base URL of the Marble API."""
    if addr.startswith("https://"):
        url = addr.rstrip("/")
    elif "://" in addr:
        raise ConfigError(f"{ENV_COORDINATOR_ADDR} {addr!r}: only https:// is supported (or give host:port)")
    else:
        url = f"https://{addr}"
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError):
        raise ConfigError(_bad_addr(addr)) from None
    if not parsed.host or parsed.path not in ("", "/") or parsed.query:
        raise ConfigError(_bad_addr(addr))
    if port is None and "://" not in addr:
        url = f"{url}:2001"
    return url


# --------------------------------------------------------------------------- UUID file


def _parse_uuid_file(data: bytes, path: Path) -> UUID:
    try:
        return UUID(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(
            f"the UUID file {path} ({ENV_UUID_FILE}) does not hold a UUID; fix or delete it. Deleting it "
            "gives this Marble a new identity: a new UUID and so a new seal key (its sealed data is lost)"
        ) from None


def _make_parents(directory: Path) -> None:
    """``mkdir -p`` where every directory created gets mode 0700 (os.makedirs only sets the leaf's mode)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


def load_or_create_uuid(path: Path, new_uuid: Callable[[], UUID] = uuid_mod.uuid4) -> UUID:
    """The Marble's UUID from ``path``; on first start, a random v4 UUID written there atomically (0600)."""
    try:
        with path.open("rb") as fh:
            return _parse_uuid_file(fh.read(1024), path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        why = exc.strerror or exc
        raise ConfigError(f"cannot read the UUID file {path} ({ENV_UUID_FILE}): {why}") from None

    value = new_uuid()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    try:
        _make_parents(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, str(value).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent first start keeps one UUID
        except FileExistsError:
            with path.open("rb") as fh:
                return _parse_uuid_file(fh.read(1024), path)
        except OSError:
            os.replace(tmp, path)  # filesystems without hard links: atomic, last writer wins
    except OSError as exc:
        raise ConfigError(
            f"cannot create the UUID file {path} ({ENV_UUID_FILE}): {exc.strerror or exc}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.info("created a new Marble UUID %s in %s", value, path)
    return value


# --------------------------------------------------------------------------- activation


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _clean(text: str, limit: int = 300) -> str:
    text = _CONTROL_RE.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit] + "…"


def _reason(response: httpx.Response) -> str:
    """The Coordinator's message from a JSend fail/error body, else a short text of the body."""
    message = ""
    try:
        doc = response.json()
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        data = doc.get("data")
        if isinstance(doc.get("message"), str):
            message = doc["message"]
        elif isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
        elif isinstance(data, str):
            message = data
    elif doc is None:
        message = response.text[:300] if response.content else ""
    message = _clean(message)
    return f"HTTP {response.status_code}: {message}" if message else f"HTTP {response.status_code}"


def _refusal_reason(response: httpx.Response) -> str:
    """The ``data.reason`` label of a JSend fail from the Marble API ("" when there is none)."""
    try:
        doc = response.json()
    except (ValueError, UnicodeDecodeError):
        return ""
    data = doc.get("data") if isinstance(doc, dict) else None
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else ""


def _is_cert_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _post(
    client: httpx.Client, path: str, body: bytes, timeout: float, config: MarbleConfig
) -> httpx.Response:
    try:
        response = client.post(
            path, content=body, headers={"Content-Type": "application/json"}, timeout=timeout
        )
    except httpx.TransportError as exc:
        if _is_cert_failure(exc):
            raise AttestationError(
                f"the Coordinator at {config.coordinator_addr} presented a certificate that does not verify "
                f"against {ENV_COORDINATOR_CA_FILE}={config.coordinator_ca_file}: {_clean(str(exc))}"
            ) from None
        raise _Retry(f"{type(exc).__name__}: {_clean(str(exc)) or 'no answer'}") from None
    if response.status_code == 200:
        return response
    reason = _reason(response)
    if response.status_code in _RETRY_STATUSES:
        raise _Retry(reason)
    if response.status_code == 403 and _refusal_reason(response) == _CHALLENGE_REFUSED:
        # The challenge was unknown (the Coordinator restarted), expired or used by someone else:
        # a new challenge, key pair and evidence fix it.
        raise _Retry(reason)
    if response.status_code in (404, 405):
        raise ConfigError(
            f"no marblekeep Marble API at {client.base_url} ({reason}): check {ENV_COORDINATOR_ADDR}; the "
            "Marble API listens on port 2001 by default (4433 is the Client API)"
        )
    if response.status_code in (400, 403):
        raise ActivationRefused(f"the Coordinator refused to activate this Marble: {reason}")
    raise ActivationRefused(f"the Coordinator failed to activate this Marble: {reason}")


def _one_attempt(
    client: httpx.Client, config: MarbleConfig, marble_uuid: UUID, issuer: EvidenceIssuer, timeout: float
) -> MarbleParameters:
    response = _post(client, CHALLENGE_PATH, b"{}", timeout, config)
    try:
        nonce = parse_challenge_response(response.content)
    except RequestError as exc:
        raise StateError(
            f"the Coordinator at {config.coordinator_addr} sent a malformed challenge ({exc.message}); "
            f"is {ENV_COORDINATOR_ADDR} a marblekeep Marble API?"
        ) from None

    private_key = X25519PrivateKey.generate()
    request = ActivationRequest(
        marble_type=config.marble_type,
        uuid=marble_uuid,
        dns_names=config.dns_names,
        hpke_public_key=private_key.public_key().public_bytes_raw(),
        nonce=nonce,
        evidence_type=issuer.evidence_type,
        evidence=b"",
    )
    request = replace(request, evidence=issuer.issue(expected_report_data(request)))

    response = _post(client, ACTIVATE_PATH, encode_activation_request(request), timeout, config)
    try:
        doc = response.json()
        sealed = base64.b64decode(doc["data"]["sealedParameters"], validate=True)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, binascii.Error):
        raise StateError(
            f"the Coordinator at {config.coordinator_addr} answered the activation without "
            "'data.sealedParameters' (standard base64); is it a marblekeep Coordinator?"
        ) from None
    return open_parameters(sealed, private_key, request)


def _tls_verify(config: MarbleConfig) -> ssl.SSLContext | bool:
    if config.coordinator_ca_file is None:
        log.info(
            "not authenticating the Coordinator (set %s to do so); the Parameters are sealed to this "
            "Marble's attested key either way",
            ENV_COORDINATOR_CA_FILE,
        )
        return False
    try:
        return ssl.create_default_context(cafile=str(config.coordinator_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{ENV_COORDINATOR_CA_FILE} {config.coordinator_ca_file}: cannot load it as PEM certificates "
            f"({_clean(str(exc))})"
        ) from None


def activate(
    config: MarbleConfig,
    *,
    issuer: EvidenceIssuer | None = None,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
) -> MarbleParameters:
    """Activate with the Coordinator and return the opened Parameters (nothing is applied yet).

    Raises :class:`ActivationRefused` (the Coordinator said no), :class:`StateError` (no
    successful answer within ``activation_timeout``), :class:`ConfigError`,
    :class:`AttestationError` or :class:`SealError`.
    """
    marble_uuid = load_or_create_uuid(config.uuid_file)
    if issuer is None:
        issuer = detect_issuer(config.attestation_root, config.tsm_report_root)
    base_url = coordinator_url(config.coordinator_addr)
    deadline = clock() + config.activation_timeout
    log.info(
        "activating as Marble type %r, UUID %s, with the Coordinator at %s (evidence: %s)",
        config.marble_type, marble_uuid, base_url, issuer.evidence_type,
    )
    attempt = 0
    verify = _tls_verify(config)
    with httpx.Client(base_url=base_url, verify=verify, transport=transport, trust_env=False) as client:
        while True:
            attempt += 1
            remaining = deadline - clock()
            try:
                params = _one_attempt(
                    client, config, marble_uuid, issuer, max(0.5, min(REQUEST_TIMEOUT_CAP, remaining))
                )
            except _Retry as retry:
                reason = retry.reason
            else:
                log.info("activated after %d attempt(s)", attempt)
                return params
            remaining = deadline - clock()
            if remaining <= 0:
                raise StateError(
                    f"the Coordinator at {base_url} did not activate this Marble within "
                    f"{config.activation_timeout:g} s ({attempt} attempts; last: {reason}); check that it "
                    f"runs and has a manifest, or raise {ENV_ACTIVATION_TIMEOUT}"
                )
            delay = min(BACKOFF_CAP, BACKOFF_INITIAL * 2 ** min(attempt - 1, 30))
            delay = min(remaining, delay * (0.5 + 0.5 * jitter()))
            log.info("Coordinator not ready (%s); retry %d in %.2f s", reason, attempt, delay)
            sleep(delay)


# --------------------------------------------------------------------------- applying


def _write_file(target: Path, data: bytes, name: str) -> None:
    try:
        _make_parents(target.parent)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the manifest's Files entry {name!r} to {target}: {exc.strerror or exc}"
        ) from None


def apply_parameters(
    params: MarbleParameters,
    *,
    base_dir: Path | None = None,
    environ: MutableMapping[bytes, bytes] | None = None,
    attestation_root: Path = DEFAULT_ATTESTATION_ROOT,
) -> None:
    """Write Files and set Env in this process. Argv is applied by :func:`exec_command`.

    Relative paths are relative to ``base_dir`` (default: the current directory). Files under
    ``attestation_root`` (Gramine's ``keys/*``) are written first, as MarbleRun's premain does.
    Missing parent directories are created with mode 0700; files get mode 0600.
    """
    base = Path.cwd() if base_dir is None else base_dir
    root = os.path.join(os.fspath(attestation_root), "")
    ordered = sorted(params.files.items(), key=lambda item: not item[0].startswith(root))
    for name, data in ordered:
        target = Path(name) if os.path.isabs(name) else base / name
        _write_file(target, data, name)
    env = os.environb if environ is None else environ
    for key, value in params.env.items():
        env[os.fsencode(key)] = value
    log.info("applied %d file(s) and %d environment variable(s)", len(params.files), len(params.env))


def resolve_command(params: MarbleParameters, command: Sequence[str]) -> tuple[str, list[str]]:
    """What to exec: ``(program, argv)``.

    - no manifest Argv: ``command`` as given;
    - manifest Argv and a command: run ``command[0]`` with argv ``[command[0], *Argv[1:]]``
      (the manifest's arguments replace the command line's; Argv[0] is only a name);
    - manifest Argv and no command: run ``Argv[0]`` (looked up in PATH) with argv ``Argv``.
    """
    if params.argv:
        if command:
            if len(command) > 1:
                log.info(
                    "the manifest's Argv replaces the %d command-line argument(s) after %r",
                    len(command) - 1, command[0],
                )
            return command[0], [command[0], *params.argv[1:]]
        return params.argv[0], list(params.argv)
    if command:
        return command[0], list(command)
    raise ConfigError(
        "nothing to run: give the command after '--' or set Argv for this Marble in the manifest"
    )


def exec_command(program: str, argv: Sequence[str]) -> NoReturn:
    """Replace this process with ``program`` (PATH lookup) and the current environment."""
    for handler in logging.getLogger().handlers + logging.getLogger("marblekeep").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(program, list(argv), os.environ)  # noqa: S606 - replacing the process is the point
