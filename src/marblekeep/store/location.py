"""Where the Coordinator's state lives: ``--store URL`` (env ``MARBLEKEEP_STORE``), parsed and opened.

Accepted forms::

    (unset or empty)                      SQLite file state.db in the data directory (--seal-dir)
    sqlite://                             the same, said explicitly
    etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX]    etcd over plain gRPC (loopback or a private network)
    etcds://HOST[:PORT][,...][/PREFIX]              etcd over TLS: --store-ca-file (default: the system's
                                                   roots), --store-cert-file and --store-key-file for a
                                                   client certificate

``PORT`` defaults to 2379, ``HOST`` is a name, an IPv4 address or ``[IPv6]``. ``PREFIX`` is one
or more ``/``-separated segments of letters, digits, ``.``, ``_`` and ``-`` (default
``marblekeep``); the keys live under ``/PREFIX/``, so several deployments can share one cluster.

:func:`parse_store_url` never does I/O besides checking that the TLS files exist; a bad URL is a
:class:`~marblekeep.errors.ConfigError` naming the part and the fix. The URL is echoed in
messages with any ``user:password@`` part removed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from marblekeep.errors import ConfigError, StoreError
from marblekeep.store.base import Store
from marblekeep.store.etcd import DEFAULT_PREFIX, EtcdConfig, EtcdEndpoint, EtcdStore, EtcdTLS
from marblekeep.store.sqlite import SQLiteStore

__all__ = [
    "DEFAULT_ETCD_PORT",
    "EtcdLocation",
    "SQLiteLocation",
    "StoreLocation",
    "open_backend",
    "parse_store_url",
]

log = logging.getLogger("marblekeep.store")

DEFAULT_ETCD_PORT = 2379
_FORMS = (
    "use etcd://HOST:PORT[,HOST:PORT...][/PREFIX], etcds://... for TLS, or leave --store unset for "
    "SQLite in the data directory"
)
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class SQLiteLocation:
    """The default: ``state.db`` in the data directory."""

    def describe(self) -> str:
        return "SQLite in the data directory"


@dataclass(frozen=True)
class EtcdLocation:
    """An etcd cluster (``etcd://`` or ``etcds://``)."""

    config: EtcdConfig = field(repr=True)

    def describe(self) -> str:
        return self.config.describe()


StoreLocation = SQLiteLocation | EtcdLocation


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}{sep}{authority}{slash}{path}"


def _error(url: str, problem: str) -> ConfigError:
    return ConfigError(f"--store {_redact(url)!r}: {problem}")


def _host(url: str, text: str, position: int) -> str:
    if text.startswith("["):
        inner = text[1:-1] if text.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise _error(
                url, f"endpoint {position} has a malformed IPv6 address {text!r}; write it as [::1]:2379"
            ) from None
        return inner
    if not text:
        raise _error(url, f"endpoint {position} has no host; write HOST:PORT, e.g. 127.0.0.1:2379")
    try:
        ipaddress.IPv4Address(text)
        return text
    except ValueError:
        pass
    if len(text) > 253 or not all(_LABEL.match(label) for label in text.rstrip(".").split(".")):
        raise _error(
            url,
            f"endpoint {position} has an invalid host {text!r}: use a DNS name, an IPv4 address or [IPv6]",
        )
    return text


def _endpoint(url: str, text: str, position: int) -> EtcdEndpoint:
    if text.startswith("["):
        close = text.find("]")
        host_text, rest = (text[: close + 1], text[close + 1 :]) if close >= 0 else (text, "")
        if rest and not rest.startswith(":"):
            raise _error(
                url, f"endpoint {position} {text!r}: put the port after the bracket, e.g. [::1]:2379"
            )
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise _error(url, f"endpoint {position} {text!r}: put IPv6 addresses in brackets, e.g. [::1]:2379")
    else:
        host_text, colon, port_text_raw = text.partition(":")
        port_text = port_text_raw if colon else None
    host = _host(url, host_text, position)
    if port_text is None:
        return EtcdEndpoint(host, DEFAULT_ETCD_PORT)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _error(
            url,
            f"endpoint {position} {text!r} has an invalid port {port_text!r}; use a number from 1 to 65535",
        )
    return EtcdEndpoint(host, int(port_text))


def _prefix(url: str, path: str) -> str:
    path = path.strip("/")
    if not path:
        return DEFAULT_PREFIX
    for segment in path.split("/"):
        if not _SEGMENT.match(segment):
            raise _error(
                url,
                f"the key prefix /{path} has an invalid segment {segment!r}: use letters, digits, '.', '_' "
                "and '-', separated by single '/'",
            )
    return f"/{path}/"


def _tls_file(option: str, path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{option} {path}: no such file; give the path of a PEM file")
    return path


def parse_store_url(
    url: str | None,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    timeout: float = 5.0,
) -> StoreLocation:
    """Parse ``--store`` and its TLS options (see the module docstring); raises ``ConfigError``."""
    text = (url or "").strip()
    tls_given = any(p is not None for p in (ca_file, cert_file, key_file))
    if not text:
        if tls_given:
            raise ConfigError("--store-ca-file/--store-cert-file/--store-key-file need --store etcds://...")
        return SQLiteLocation()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _error(text, f"no scheme; {_FORMS}")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if rest:
            raise _error(
                text,
                "the SQLite store always lives in the data directory (--seal-dir); write sqlite:// or leave "
                "--store unset",
            )
        if tls_given:
            raise ConfigError("--store-ca-file/--store-cert-file/--store-key-file need --store etcds://...")
        return SQLiteLocation()
    if scheme not in ("etcd", "etcds"):
        raise _error(text, f"unknown scheme {scheme!r}; {_FORMS}")
    if "?" in rest or "#" in rest:
        raise _error(
            text,
            "query strings and fragments are not accepted; give TLS files with --store-ca-file, "
            "--store-cert-file and --store-key-file",
        )
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise _error(
            text,
            "user names and passwords in the URL are not supported (they would show in process lists); "
            "authenticate to etcd with a client certificate over etcds://",
        )
    if not authority:
        raise _error(text, f"no etcd endpoint; {_FORMS}")
    endpoints: list[EtcdEndpoint] = []
    for position, part in enumerate(authority.split(","), start=1):
        endpoint = _endpoint(text, part.strip(), position)
        if endpoint in endpoints:
            raise _error(text, f"endpoint {position} {part!r} is listed twice; name each member once")
        endpoints.append(endpoint)
    prefix = _prefix(text, path)
    tls: EtcdTLS | None = None
    if scheme == "etcds":
        if (cert_file is None) != (key_file is None):
            raise ConfigError(
                "--store-cert-file and --store-key-file go together: give both for a client certificate, "
                "or neither"
            )
        tls = EtcdTLS(
            _tls_file("--store-ca-file", ca_file),
            _tls_file("--store-cert-file", cert_file),
            _tls_file("--store-key-file", key_file),
        )
    elif tls_given:
        raise _error(
            text, "TLS files are given but the scheme is etcd:// (plain); use etcds:// to reach etcd over TLS"
        )
    return EtcdLocation(EtcdConfig(tuple(endpoints), prefix=prefix, tls=tls, timeout=timeout))


async def open_backend(
    location: StoreLocation, sqlite_path: Path, *, wait_for_etcd: float | None = None
) -> Store:
    """Open the backend ``location`` names (``sqlite_path``: the data directory's database file).

    An unreachable etcd is waited for (``wait_for_etcd`` seconds, ``None``: as long as it takes),
    logging a WARNING every 10 s, so replicas and etcd can be started in any order.
    """
    if isinstance(location, SQLiteLocation):
        return await SQLiteStore.open(sqlite_path)
    loop = asyncio.get_running_loop()
    start = loop.time()
    last_warning = -math.inf
    while True:
        try:
            return await EtcdStore.open(location.config)
        except StoreError as exc:
            if "unreachable" not in exc.message:
                raise
            now = loop.time()
            if wait_for_etcd is not None and now - start >= wait_for_etcd:
                raise
            if now - last_warning >= 10:
                log.warning("waiting for etcd before loading the state", extra={"reason": exc.message})
                last_warning = now
        await asyncio.sleep(0.5)
