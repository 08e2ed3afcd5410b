"""Collateral: where it comes from (PCCS / Intel PCS, or a directory) and the cache in front.

* :class:`PccsCollateralSource` fetches from a PCCS or Intel's PCS (API v4) over HTTP(S).
* :class:`DirectoryCollateralSource` reads collateral files (dcap-qvl's JSON format) from a
  directory or a bundle file, for air-gapped sites.
* :class:`CollateralCache` keeps collateral per (TEE, FMSPC, CA) with its validity window,
  refreshes it in the background before it expires, and never hands out expired collateral.

Every failure is a :class:`~marblekeep.errors.CollateralError` naming the URL or file and
what to do. Time comes from the injected ``clock``; nothing here calls ``datetime.now``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import string
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from marblekeep.attestation.claims import TeeKind
from marblekeep.attestation.dcap import Collateral, CollateralKey, collateral_key_of_quote
from marblekeep.attestation.explain import rfc3339
from marblekeep.errors import CollateralError, ConfigError

__all__ = [
    "INTEL_PCS_URL",
    "CollateralCache",
    "CollateralSource",
    "DirectoryCollateralSource",
    "PccsCollateralSource",
    "load_collateral_file",
]

log = logging.getLogger(__name__)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
#: Where Intel publishes the SGX root CA's CRL (used when talking to Intel's PCS directly).
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


@runtime_checkable
class CollateralSource(Protocol):
    """Something that can produce the collateral for a quote."""

    async def fetch(self, quote: bytes) -> Collateral: ...


# --------------------------------------------------------------------------- PCCS / PCS


def _raw_member(text: str, key: str, where: str) -> str:
    """The exact source text of member ``key`` of the top-level JSON object in ``text``.

    Intel signs the bytes of ``tcbInfo`` / ``enclaveIdentity`` as served; re-serialising the
    parsed value could reorder keys or change number spelling and break the signature.
    """
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos = len(text) - len(text.lstrip(ws))
    if not text.startswith("{", pos):
        raise CollateralError(f"{where}: the answer is not a JSON object")
    pos += 1
    try:
        while True:
            while pos < len(text) and text[pos] in ws:
                pos += 1
            if text.startswith("}", pos):
                break
            name, pos = decoder.raw_decode(text, pos)
            while text[pos] in ws:
                pos += 1
            if text[pos] != ":":
                raise ValueError("':' expected")
            pos += 1
            while text[pos] in ws:
                pos += 1
            start = pos
            _value, pos = decoder.raw_decode(text, pos)
            if name == key:
                return text[start:pos]
            while text[pos] in ws:
                pos += 1
            if text[pos] == ",":
                pos += 1
    except (ValueError, IndexError):
        raise CollateralError(f"{where}: the answer is not valid JSON") from None
    raise CollateralError(f"{where}: the answer has no {key!r} member")


def _crl_der(body: bytes, where: str) -> bytes:
    """A CRL as served: DER, PEM, or hex text (PCCS's rootcacrl); returned as DER."""
    data = body.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data).public_bytes(Encoding.DER)
        if data and all(chr(c) in string.hexdigits for c in data):
            data = bytes.fromhex(data.decode("ascii"))
        x509.load_der_x509_crl(data)
    except ValueError:
        raise CollateralError(f"{where}: the answer is not a certificate revocation list") from None
    return data


class PccsCollateralSource:
    """Fetch collateral from a PCCS or Intel's PCS (``/sgx|tdx/certification/v4/...``).

    ``base_url`` is the service root (``https://pccs.example:8081``); a trailing
    ``/sgx/certification/v4`` is accepted too. The root CA CRL comes from the PCCS's
    ``rootcacrl`` endpoint, or, for Intel's PCS (which has none), from ``root_ca_crl_url``.
    Collateral is signed by Intel, so TLS to the PCCS is not part of the trust chain:
    ``verify_tls=False`` is acceptable for a PCCS with a self-signed certificate.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        verify_tls: bool = True,
        root_ca_crl_url: str | None = None,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = base_url.strip().rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            url = url.removesuffix(suffix)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"PCCS URL {base_url!r}: must start with https:// (or http://)")
        self.base_url = url
        self.timeout = timeout
        self.verify_tls = verify_tls
        self.is_intel_pcs = url.startswith(INTEL_PCS_URL)
        self.root_ca_crl_url = root_ca_crl_url or (INTEL_ROOT_CA_CRL_URL if self.is_intel_pcs else None)
        self._headers = {"Ocp-Apim-Subscription-Key": api_key} if api_key else {}
        self._transport = transport

    def _url(self, tee: str, path: str) -> str:
        return f"{self.base_url}/{tee}/certification/v4/{path}"

    async def _get(self, client: httpx.AsyncClient, url: str, what: str) -> httpx.Response:
        try:
            response = await client.get(url, headers=self._headers)
        except httpx.HTTPError as exc:
            raise CollateralError(
                f"collateral: {what} from {url}: {type(exc).__name__} ({exc}); check the PCCS URL and"
                " that the PCCS is reachable, or use a collateral directory"
            ) from None
        if response.status_code != 200:
            hint = ""
            if response.status_code == 404:
                hint = ": the PCCS has no such collateral (unknown FMSPC? not cached by an offline PCCS?)"
            elif response.status_code in (401, 403):
                hint = ": the service refused access (API key?)"
            raise CollateralError(f"collateral: {what} from {url} answered HTTP {response.status_code}{hint}")
        return response

    @staticmethod
    def _chain(response: httpx.Response, names: tuple[str, ...], url: str) -> str:
        for name in names:
            value = response.headers.get(name)
            if value:
                return urllib.parse.unquote(value)
        raise CollateralError(f"collateral: the answer of {url} lacks the {names[0]} header")

    @staticmethod
    def _signed(response: httpx.Response, member: str, url: str) -> tuple[str, str]:
        text = response.text
        raw = _raw_member(text, member, url)
        signature = _raw_member(text, "signature", url)
        try:
            signature_hex = json.loads(signature)
            bytes.fromhex(signature_hex)
        except (ValueError, TypeError):
            raise CollateralError(f"collateral: the signature in {url} is not a hex string") from None
        return raw, signature_hex

    async def fetch(self, quote: bytes) -> Collateral:
        key = collateral_key_of_quote(quote)
        return await self.fetch_key(key)

    async def fetch_key(self, key: CollateralKey) -> Collateral:
        """Fetch the collateral for ``key`` (TEE, FMSPC, CA)."""
        tee = "tdx" if key.tee is TeeKind.TDX else "sgx"
        urls = {
            "pck_crl": self._url("sgx", f"pckcrl?ca={key.ca}&encoding=der"),
            "tcb": self._url(tee, f"tcb?fmspc={key.fmspc}"),
            "qe": self._url(tee, "qe/identity?update=standard"),
            "root": self.root_ca_crl_url or self._url("sgx", "rootcacrl"),
        }
        async with httpx.AsyncClient(
            timeout=self.timeout, verify=self.verify_tls, transport=self._transport, follow_redirects=True
        ) as client:
            pck, tcb, qe, root = await asyncio.gather(
                self._get(client, urls["pck_crl"], "PCK CRL"),
                self._get(client, urls["tcb"], "TCB info"),
                self._get(client, urls["qe"], "QE identity"),
                self._get(client, urls["root"], "root CA CRL"),
            )
        tcb_info, tcb_signature = self._signed(tcb, "tcbInfo", urls["tcb"])
        qe_identity, qe_signature = self._signed(qe, "enclaveIdentity", urls["qe"])
        document = {
            "pck_crl_issuer_chain": self._chain(pck, ("SGX-PCK-CRL-Issuer-Chain",), urls["pck_crl"]),
            "root_ca_crl": _crl_der(root.content, urls["root"]).hex(),
            "pck_crl": _crl_der(pck.content, urls["pck_crl"]).hex(),
            "tcb_info_issuer_chain": self._chain(
                tcb, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"), urls["tcb"]
            ),
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": self._chain(
                qe, ("SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"), urls["qe"]
            ),
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_signature,
        }
        collateral = Collateral.from_json(json.dumps(document, indent=1).encode("utf-8"))
        if collateral.key != key:
            raise CollateralError(
                f"collateral: {self.base_url} returned collateral for {collateral.key} when asked for {key}"
            )
        return collateral


# --------------------------------------------------------------------------- directory / bundle


def load_collateral_file(path: Path) -> list[Collateral]:
    """Collateral in a file: one dcap-qvl JSON object, or a bundle (a JSON array of them)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CollateralError(f"collateral file {path}: cannot be read ({exc.strerror})") from None
    stripped = raw.lstrip()
    if not stripped.startswith(b"["):
        try:
            return [Collateral.from_json(raw)]
        except CollateralError as exc:
            raise CollateralError(f"collateral file {path}: {exc.message}") from None
    try:
        entries = json.loads(raw)
    except ValueError:
        raise CollateralError(f"collateral bundle {path}: not valid JSON") from None
    found: list[Collateral] = []
    for index, entry in enumerate(entries):
        try:
            found.append(Collateral.from_json(json.dumps(entry).encode("utf-8")))
        except CollateralError as exc:
            raise CollateralError(f"collateral bundle {path} [{index}]: {exc.message}") from None
    return found


class DirectoryCollateralSource:
    """Collateral from local files, for air-gapped sites.

    ``path`` is a directory (every ``*.json`` below it) or one file (a collateral object or a
    bundle array). Files are indexed by what they contain (TEE, FMSPC, CA), not by name, and
    re-read when they change, so an operator updates collateral by dropping in new files.
    For one key the most recently issued collateral wins.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._files: dict[Path, tuple[tuple[int, int], list[Collateral] | str]] = {}

    def _scan(self) -> tuple[dict[CollateralKey, list[Collateral]], list[str]]:
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*.json") if p.is_file())
        elif self.path.is_file():
            files = [self.path]
        else:
            raise CollateralError(
                f"collateral directory {self.path} does not exist: create it and put collateral files"
                " (dcap-qvl JSON) into it"
            )
        index: dict[CollateralKey, list[Collateral]] = {}
        problems: list[str] = []
        seen: dict[Path, tuple[tuple[int, int], list[Collateral] | str]] = {}
        for file in files:
            try:
                stat = file.stat()
            except OSError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._files.get(file)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, load_collateral_file(file))
                except CollateralError as exc:
                    cached = (stamp, exc.message)
            seen[file] = cached
            content = cached[1]
            if isinstance(content, str):
                problems.append(content)
                continue
            for collateral in content:
                index.setdefault(collateral.key, []).append(collateral)
        self._files = seen
        return index, problems

    def available_keys(self) -> list[CollateralKey]:
        index, _problems = self._scan()
        return sorted(index, key=str)

    def find(self, key: CollateralKey) -> Collateral:
        index, problems = self._scan()
        candidates = index.get(key)
        if not candidates:
            available = ", ".join(str(k) for k in sorted(index, key=str)) or "none"
            unreadable = f"; unreadable: {'; '.join(problems)}" if problems else ""
            raise CollateralError(
                f"no collateral for {key} in {self.path} (available: {available}{unreadable}): fetch it"
                f" on a connected machine (FMSPC {key.fmspc}, CA {key.ca}) and copy it here"
            )
        return max(candidates, key=lambda c: (c.not_before, c.not_after))

    async def fetch(self, quote: bytes) -> Collateral:
        key = collateral_key_of_quote(quote)
        return await asyncio.to_thread(self.find, key)


# --------------------------------------------------------------------------- cache


@dataclass
class _Entry:
    collateral: Collateral
    fetched_at: dt.datetime
    quote: bytes  # a quote of this platform: what the source needs to fetch again
    last_attempt: dt.datetime | None = None
    last_error: str = ""
    refreshing: asyncio.Task[Collateral] | None = field(default=None, repr=False)


class CollateralCache:
    """Collateral per (TEE, FMSPC, CA), refreshed before expiry, never used when expired.

    ``fetch(quote)`` returns cached collateral while it is inside its validity window.
    Within ``refresh_before`` of its expiry it also starts a background refresh (at most
    one per key per ``retry_interval``); a failed refresh keeps the still-valid collateral
    and is reported in :meth:`status`. Expired collateral is never returned: the cache
    fetches anew, and if the source has nothing newer either, the caller gets
    ``CollateralError("collateral expired <RFC3339> ...")``.

    :meth:`run` is the background loop (start it with :meth:`start`); it refreshes every
    entry that is due, so collateral stays fresh even when no quote arrives.
    """

    def __init__(
        self,
        source: CollateralSource,
        *,
        clock: Callable[[], dt.datetime],
        refresh_before: dt.timedelta = dt.timedelta(days=3),
        retry_interval: dt.timedelta = dt.timedelta(minutes=10),
    ) -> None:
        self.source = source
        self.clock = clock
        self.refresh_before = refresh_before
        self.retry_interval = retry_interval
        self._entries: dict[CollateralKey, _Entry] = {}
        self._inflight: dict[CollateralKey, asyncio.Task[Collateral]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None

    def _due(self, entry: _Entry, now: dt.datetime) -> bool:
        if now < entry.collateral.not_after - self.refresh_before:
            return False
        return entry.last_attempt is None or now - entry.last_attempt >= self.retry_interval

    async def fetch(self, quote: bytes) -> Collateral:
        """Valid collateral for ``quote`` at ``clock()``; see the class docstring."""
        key = collateral_key_of_quote(quote)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and _usable(entry.collateral, now):
            if self._due(entry, now) and key not in self._inflight:
                task = asyncio.get_running_loop().create_task(self._refresh(key, entry.quote))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                task.add_done_callback(_consume)
            return entry.collateral
        collateral = await self._refresh(key, quote)
        collateral.check_valid_at(self.clock())  # expired or not yet valid: never used
        return collateral

    async def _refresh(self, key: CollateralKey, quote: bytes) -> Collateral:
        """Fetch ``key`` once, however many callers ask at the same time."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_and_store(key, quote))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
            task.add_done_callback(_consume)
        return await asyncio.shield(task)

    async def _fetch_and_store(self, key: CollateralKey, quote: bytes) -> Collateral:
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_attempt = now
        try:
            fresh = await self.source.fetch(quote)
            if fresh.key != key:
                raise CollateralError(f"collateral source returned collateral for {fresh.key}, not {key}")
        except CollateralError as exc:
            if entry is not None:
                entry.last_error = exc.message
            log.warning("collateral refresh for %s failed: %s", key, exc.message)
            raise
        fetched_at = self.clock()
        if entry is not None and not _usable(fresh, fetched_at) and _usable(entry.collateral, fetched_at):
            entry.last_error = (
                f"fetched collateral is valid only from {rfc3339(fresh.not_before)} to"
                f" {rfc3339(fresh.not_after)}; kept the current one (check the clock)"
            )
            return entry.collateral
        old = entry.collateral if entry is not None else None
        if (
            old is None
            or not _usable(old, fetched_at)
            or (fresh.not_before, fresh.not_after) >= (old.not_before, old.not_after)
        ):
            self._entries[key] = _Entry(fresh, fetched_at, quote, last_attempt=now)
            log.info("collateral for %s fetched, valid until %s", key, rfc3339(fresh.not_after))
            return fresh
        assert entry is not None
        entry.last_error = "the source returned older collateral than the cached one"
        return entry.collateral

    async def refresh_due(self) -> list[CollateralKey]:
        """One pass of the background loop: refresh every entry that is due; return those refreshed."""
        now = self.clock()
        refreshed: list[CollateralKey] = []
        for key, entry in list(self._entries.items()):
            if not self._due(entry, now):
                continue
            before = entry.collateral
            with contextlib.suppress(CollateralError):
                if await self._refresh(key, entry.quote) is not before:
                    refreshed.append(key)
        return refreshed

    async def run(self, interval: float = 300.0) -> None:
        """Refresh due entries every ``interval`` seconds, forever (cancel to stop)."""
        while True:
            try:
                await self.refresh_due()
            except Exception:  # the loop must survive anything a source does
                log.exception("collateral refresh pass failed")
            await asyncio.sleep(interval)

    def start(self, interval: float = 300.0) -> asyncio.Task[None]:
        """Start :meth:`run` as a task of the running loop."""
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self.run(interval))
        return self._runner

    async def aclose(self) -> None:
        """Stop the background loop and any refresh in progress."""
        tasks = [t for t in (self._runner, *self._background, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._runner = None

    def put(self, collateral: Collateral, quote: bytes) -> None:
        """Seed the cache (e.g. from a bundle at start-up); ``quote`` is one of that platform."""
        self._entries[collateral.key] = _Entry(collateral, self.clock(), quote)

    def status(self) -> list[dict[str, object]]:
        """Per key: ``key``, ``fetched_at``, ``not_after``, ``age_seconds`` and more (status, metrics)."""
        now = self.clock()
        report: list[dict[str, object]] = []
        for key, entry in sorted(self._entries.items(), key=lambda item: str(item[0])):
            c = entry.collateral
            report.append(
                {
                    "key": str(key),
                    "fetched_at": rfc3339(entry.fetched_at),
                    "not_before": rfc3339(c.not_before),
                    "not_after": rfc3339(c.not_after),
                    "age_seconds": max(0, int((now - entry.fetched_at).total_seconds())),
                    "expires_in_seconds": int((c.not_after - now).total_seconds()),
                    "expired": now > c.not_after,
                    "expires_first": c.expires_first,
                    "tcb_evaluation_data_number": c.tcb_evaluation_data_number,
                    "last_error": entry.last_error,
                }
            )
        return report


def _usable(collateral: Collateral, now: dt.datetime) -> bool:
    return collateral.not_before <= now <= collateral.not_after


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's exception so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
