"""DCAP quote verification (SGX ECDSA quote v3, TDX quote v4/v5) with ``dcap-qvl``.

:func:`verify_quote` checks, in order: the evidence form (raw, or with Open Enclave's
16-byte header, which is stripped), the collateral's validity window at the given time
(``collateral expired <RFC3339>``), that the collateral is for the quote's TEE, then lets
``dcap-qvl`` verify the signature chain to Intel's root, the CRLs, the QE identity and the
TCB level; only then are the report fields read into :class:`TeeClaims`. The verification
time is an input: nothing here reads a clock.

``dcap-qvl`` holds the GIL for the whole verification, so :class:`QuoteVerifierPool` runs it
in worker *processes* to use every core and to keep the event loop responsive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.x509.oid import NameOID

from marblekeep.attestation.claims import TCB_STATUSES, TeeClaims, TeeKind
from marblekeep.attestation.evidence import parse_header, read_report, strip_oe_header
from marblekeep.attestation.explain import rfc3339
from marblekeep.errors import AttestationError, CollateralError, ConfigError, MarbleKeepError

__all__ = [
    "TCB_STATUSES",
    "Collateral",
    "CollateralKey",
    "QuoteVerifierPool",
    "collateral_key_of_quote",
    "verify_quote",
]


# Older dcap-qvl releases (and Intel's QVL) use the SCREAMING_CASE result names.
_STATUS_ALIASES: dict[str, str] = {
    "OK": "UpToDate",
    "SW_HARDENING_NEEDED": "SWHardeningNeeded",
    "CONFIGURATION_NEEDED": "ConfigurationNeeded",
    "CONFIG_NEEDED": "ConfigurationNeeded",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded",
    "CONFIG_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded",
    "OUT_OF_DATE": "OutOfDate",
    "OUT_OF_DATE_CONFIGURATION_NEEDED": "OutOfDateConfigurationNeeded",
    "OUT_OF_DATE_CONFIG_NEEDED": "OutOfDateConfigurationNeeded",
    "REVOKED": "Revoked",
}

_REQUIRED_FIELDS: tuple[str, ...] = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)

_CA_BY_ISSUER = {"Intel SGX PCK Processor CA": "processor", "Intel SGX PCK Platform CA": "platform"}


@dataclass(frozen=True)
class CollateralKey:
    """What collateral is for: the TEE, the platform family (FMSPC) and the PCK CA."""

    tee: TeeKind
    fmspc: str  # upper-case hex, 12 characters
    ca: str  # "processor" | "platform"

    def __str__(self) -> str:
        return f"{self.tee.value}/{self.fmspc}/{self.ca}"


def _fail(field_name: str, problem: str) -> CollateralError:
    return CollateralError(
        f"collateral: {field_name}: {problem}; use collateral in dcap-qvl's JSON format"
        " (as written by `marblekeep`'s PCCS fetcher or dcap-qvl's get_collateral)"
    )


def _parse_time(field_name: str, value: object) -> dt.datetime:
    if not isinstance(value, str):
        raise _fail(field_name, "missing or not an RFC 3339 date")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(field_name, f"{value!r} is not an RFC 3339 date") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _hex_field(data: dict[str, Any], name: str) -> bytes:
    value = data[name]
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _fail(name, "not a hex string") from None


def _json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise _fail(name, "not valid JSON") from None
    if not isinstance(value, dict):
        raise _fail(name, "not a JSON object")
    return value


@dataclass(frozen=True)
class Collateral:
    """Parsed collateral with its validity window.

    ``raw_json`` is dcap-qvl's JSON format, exactly as loaded. ``not_before`` is the latest
    issue date and ``not_after`` the earliest "next update" / expiry of everything inside
    (TCB info, QE identity, both CRLs, the issuer certificates); ``expires_first`` names
    the item that sets ``not_after``. Collateral is never used outside its window.
    """

    raw_json: bytes
    key: CollateralKey
    not_before: dt.datetime
    not_after: dt.datetime
    expires_first: str
    tcb_evaluation_data_number: int = 0

    @property
    def tee(self) -> TeeKind:
        return self.key.tee

    @property
    def fmspc(self) -> str:
        return self.key.fmspc

    @property
    def ca(self) -> str:
        return self.key.ca

    @classmethod
    def from_json(cls, raw: bytes) -> Collateral:
        """Parse dcap-qvl's collateral JSON; every problem is a :class:`CollateralError`."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail("(file)", "not UTF-8 text") from None
        data = _json_object("(file)", text)
        for name in _REQUIRED_FIELDS:
            if not isinstance(data.get(name), str) or not data[name]:
                raise _fail(name, "missing or not a string")

        tcb_info = _json_object("tcb_info", data["tcb_info"])
        qe_identity = _json_object("qe_identity", data["qe_identity"])
        tee_id = tcb_info.get("id", "SGX")
        if tee_id not in ("SGX", "TDX"):
            raise _fail("tcb_info.id", f"unknown TEE {tee_id!r} (expected SGX or TDX)")
        fmspc = tcb_info.get("fmspc")
        if not isinstance(fmspc, str) or len(fmspc) != 12:
            raise _fail("tcb_info.fmspc", "missing or not 12 hex characters")
        eval_number = tcb_info.get("tcbEvaluationDataNumber", 0)
        if not isinstance(eval_number, int):
            raise _fail("tcb_info.tcbEvaluationDataNumber", "not an integer")

        windows: list[tuple[str, dt.datetime, dt.datetime]] = [
            (
                "TCB info",
                _parse_time("tcb_info.issueDate", tcb_info.get("issueDate")),
                _parse_time("tcb_info.nextUpdate", tcb_info.get("nextUpdate")),
            ),
            (
                "QE identity",
                _parse_time("qe_identity.issueDate", qe_identity.get("issueDate")),
                _parse_time("qe_identity.nextUpdate", qe_identity.get("nextUpdate")),
            ),
        ]
        ca = ""
        for name, label in (("root_ca_crl", "root CA CRL"), ("pck_crl", "PCK CRL")):
            der = _hex_field(data, name)
            try:
                crl = x509.load_der_x509_crl(der)
            except ValueError:
                raise _fail(name, "not a DER certificate revocation list") from None
            if crl.next_update_utc is None:
                raise _fail(name, "the CRL has no nextUpdate")
            windows.append((label, crl.last_update_utc, crl.next_update_utc))
            if name == "pck_crl":
                names = crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
                issuer_cn = str(names[0].value) if names else ""
                ca = _CA_BY_ISSUER.get(issuer_cn, "")
                if not ca:
                    raise _fail("pck_crl", f"issuer {issuer_cn!r} is not an Intel SGX PCK CA")
        for name in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
            try:
                certs = x509.load_pem_x509_certificates(data[name].encode("ascii"))
            except (ValueError, UnicodeEncodeError):
                raise _fail(name, "not a PEM certificate chain") from None
            for cert in certs:
                subject = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                common_name = str(subject[0].value) if subject else "?"
                label = f"certificate {common_name} in {name}"
                windows.append((label, cert.not_valid_before_utc, cert.not_valid_after_utc))
        _hex_field(data, "tcb_info_signature")
        _hex_field(data, "qe_identity_signature")
        try:
            _qvl_collateral(raw)
        except ValueError as exc:
            raise _fail("(file)", f"dcap-qvl cannot load it ({exc})") from None

        not_before = max(start for _n, start, _e in windows)
        first = min(windows, key=lambda w: w[2])
        return cls(
            raw_json=raw,
            key=CollateralKey(TeeKind.SGX if tee_id == "SGX" else TeeKind.TDX, fmspc.upper(), ca),
            not_before=not_before,
            not_after=first[2],
            expires_first=first[0],
            tcb_evaluation_data_number=eval_number,
        )

    def check_valid_at(self, at: dt.datetime) -> None:
        """Raise :class:`CollateralError` when ``at`` is outside the validity window."""
        at = _aware(at)
        if at > self.not_after:
            raise CollateralError(
                f"collateral expired {rfc3339(self.not_after)} ({self.expires_first} for {self.key},"
                f" verification time {rfc3339(at)}): fetch fresh collateral from the PCCS or put"
                " current collateral into the collateral directory"
            )
        if at < self.not_before:
            raise CollateralError(
                f"collateral not yet valid: issued {rfc3339(self.not_before)}, after the verification"
                f" time {rfc3339(at)} ({self.key}): check the clock or use older collateral"
            )

    def status(self, now: dt.datetime) -> dict[str, object]:
        """JSON-ready facts about this collateral at ``now``."""
        now = _aware(now)
        return {
            "key": str(self.key),
            "not_before": rfc3339(self.not_before),
            "not_after": rfc3339(self.not_after),
            "expires_first": self.expires_first,
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
            "expired": now > self.not_after,
            "seconds_to_expiry": int((self.not_after - now).total_seconds()),
        }


def _aware(at: dt.datetime) -> dt.datetime:
    if at.tzinfo is None:
        raise ConfigError("verification time: a timezone-aware datetime is required (e.g. datetime.now(UTC))")
    return at.astimezone(dt.UTC)


@functools.lru_cache(maxsize=64)
def _qvl_collateral(raw: bytes) -> Any:
    """dcap-qvl's collateral object for ``raw`` (parsed once per process)."""
    return dcap_qvl.QuoteCollateralV3.from_json(raw.decode("utf-8"))


@functools.lru_cache(maxsize=1024)
def _key_from_chain(chain: bytes, is_tdx: bool) -> CollateralKey:
    extension = dcap_qvl.parse_pck_extension_from_pem(chain)
    leaf = x509.load_pem_x509_certificate(chain)
    names = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer_cn = str(names[0].value) if names else ""
    ca = _CA_BY_ISSUER.get(issuer_cn)
    if ca is None:
        raise ValueError(f"PCK certificate issuer {issuer_cn!r} is not an Intel SGX PCK CA")
    return CollateralKey(TeeKind.TDX if is_tdx else TeeKind.SGX, bytes(extension.fmspc).hex().upper(), ca)


def collateral_key_of_quote(quote: bytes) -> CollateralKey:
    """Which collateral ``quote`` needs: TEE, FMSPC and CA, read from its PCK certificate.

    The quote is *not* verified here; the key only selects collateral, and the verification
    then proves that the collateral fits.
    """
    raw = strip_oe_header(quote)
    header = parse_header(raw)
    try:
        parsed = dcap_qvl.parse_quote(raw)
        chain = parsed.cert_chain_pem_bytes()
    except (ValueError, RuntimeError) as exc:
        raise AttestationError(f"quote: cannot be parsed ({exc}); send the complete quote") from None
    if not chain:
        raise CollateralError(
            "quote: carries no PCK certificate chain (certification data type 5), so its FMSPC is"
            " unknown; configure the quoting library to embed the PCK certificate chain"
        )
    try:
        # keyed by the chain: every quote of one platform shares it, so the parse runs once
        return _key_from_chain(bytes(chain), header.kind is TeeKind.TDX)
    except (ValueError, RuntimeError) as exc:
        raise CollateralError(f"quote: FMSPC or CA cannot be read from its PCK certificate ({exc})") from None


def _normalise_status(status: str) -> str:
    return _STATUS_ALIASES.get(status, status)


def _explain_failure(message: str, raw: bytes, collateral: Collateral) -> str:
    """A sentence for a dcap-qvl failure: what it said, what it means, what to do."""
    lower = message.lower()
    hint = ""
    if "no matching tcb level" in lower:
        hint = (
            f"the platform's TCB (CPU SVN, PCE SVN, TDX module) matches no level in the TCB info for"
            f" {collateral.key} (evaluation data number {collateral.tcb_evaluation_data_number}): the"
            " platform is older than every level Intel lists; update its firmware/microcode/TDX module"
        )
    elif "fmspc" in lower:
        try:
            quote_key = collateral_key_of_quote(raw)
            hint = f"the collateral is for {collateral.key} but the quote's platform is {quote_key}"
        except AttestationError:
            hint = f"the collateral ({collateral.key}) is not for this quote's platform"
        hint += "; fetch the collateral for this quote"
    elif "expired" in lower or "future" in lower:
        hint = "a certificate or CRL is outside its validity period at the verification time"
    elif "revoked" in lower:
        hint = "a certificate in the quote's PCK chain is revoked by Intel"
    elif "signature" in lower or "verify" in lower or "mismatch" in lower or "hash" in lower:
        hint = (
            "the quote was altered or was not produced by a genuine quoting enclave"
            " (its signature chain to Intel's root does not hold)"
        )
    return f"quote verification failed: {message}" + (f" — {hint}" if hint else "")


def verify_quote(quote: bytes, collateral: Collateral, at: dt.datetime) -> TeeClaims:
    """Verify an SGX or TDX quote at time ``at``; return what its report says.

    Raises :class:`CollateralError` when the collateral is outside its validity window or is
    for another TEE, :class:`AttestationError` when the quote does not verify. The returned
    claims carry the TCB status and advisories; *accepting* them is the policy's job
    (:mod:`marblekeep.attestation.policy`).
    """
    at = _aware(at)
    raw = strip_oe_header(quote)
    header = parse_header(raw)
    collateral.check_valid_at(at)
    if header.kind is not collateral.tee:
        raise CollateralError(
            f"collateral is for {collateral.tee.value.upper()} ({collateral.key}) but the quote is an"
            f" {header.kind.value.upper()} quote; use the collateral for this quote's platform"
        )
    try:
        report = dcap_qvl.verify(raw, _qvl_collateral(collateral.raw_json), int(at.timestamp()))
        status = _normalise_status(str(report.status))
        advisories = tuple(str(a) for a in report.advisory_ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # dcap-qvl raises ValueError; a Rust panic is a BaseException
        raise AttestationError(_explain_failure(str(exc), raw, collateral)) from None
    return read_report(raw, tcb_status=status, advisory_ids=advisories)


# --------------------------------------------------------------------------- worker wire format
#
# The pool talks to its worker processes over pipes with a small binary format (no pickle:
# a worker handles untrusted quotes, and nothing it sends back is ever executed).
#
#   frame     = u32 length (of the rest) | u32 batch id | payload
#   request   = u16 collateral count | u16 item count
#               | per collateral: u32 length | collateral JSON
#               | per item: u16 collateral index | i64 time (µs since the epoch, UTC) | u32 length | quote
#   response  = JSON array, one entry per item: {"claims": {...}} or {"error": class, "message": str}

_FRAME = struct.Struct("<II")
_REQ_HEAD = struct.Struct("<HH")
_ITEM = struct.Struct("<HqI")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def encode_request(
    batch_id: int, collaterals: list[bytes], items: list[tuple[int, dt.datetime, bytes]]
) -> bytes:
    parts = [_REQ_HEAD.pack(len(collaterals), len(items))]
    for raw in collaterals:
        parts += [struct.pack("<I", len(raw)), raw]
    for index, at, quote in items:
        micros = (at - _EPOCH) // dt.timedelta(microseconds=1)
        parts += [_ITEM.pack(index, micros, len(quote)), quote]
    payload = b"".join(parts)
    return _FRAME.pack(len(payload) + 4, batch_id) + payload


def decode_request(payload: bytes) -> tuple[list[bytes], list[tuple[int, dt.datetime, bytes]]]:
    n_coll, n_items = _REQ_HEAD.unpack_from(payload, 0)
    pos = _REQ_HEAD.size
    collaterals: list[bytes] = []
    for _ in range(n_coll):
        (size,) = struct.unpack_from("<I", payload, pos)
        collaterals.append(payload[pos + 4 : pos + 4 + size])
        pos += 4 + size
    items: list[tuple[int, dt.datetime, bytes]] = []
    for _ in range(n_items):
        index, micros, size = _ITEM.unpack_from(payload, pos)
        pos += _ITEM.size
        items.append((index, _EPOCH + dt.timedelta(microseconds=micros), payload[pos : pos + size]))
        pos += size
    return collaterals, items


def claims_to_json(claims: TeeClaims) -> dict[str, object]:
    return {
        "kind": claims.kind.value,
        "report_data": claims.report_data.hex(),
        "tcb_status": claims.tcb_status,
        "advisory_ids": list(claims.advisory_ids),
        "debug": claims.debug,
        "mrenclave": claims.mrenclave,
        "mrsigner": claims.mrsigner,
        "isv_prod_id": claims.isv_prod_id,
        "isv_svn": claims.isv_svn,
        "mrtd": claims.mrtd,
        "rtmrs": list(claims.rtmrs),
        "mrseam": claims.mrseam,
    }


def claims_from_json(data: dict[str, Any]) -> TeeClaims:
    return TeeClaims(
        kind=TeeKind(data["kind"]),
        report_data=bytes.fromhex(data["report_data"]),
        tcb_status=str(data["tcb_status"]),
        advisory_ids=tuple(str(a) for a in data["advisory_ids"]),
        debug=bool(data["debug"]),
        mrenclave=str(data["mrenclave"]),
        mrsigner=str(data["mrsigner"]),
        isv_prod_id=int(data["isv_prod_id"]),
        isv_svn=int(data["isv_svn"]),
        mrtd=str(data["mrtd"]),
        rtmrs=tuple(str(r) for r in data["rtmrs"]),
        mrseam=str(data["mrseam"]),
    )


@functools.lru_cache(maxsize=64)
def _collateral_from_raw(raw: bytes) -> Collateral:
    return Collateral.from_json(raw)


def verify_batch(payload: bytes) -> bytes:
    """Worker side: verify every item of a request payload; return the JSON response."""
    collaterals, items = decode_request(payload)
    outcomes: list[dict[str, object]] = []
    for index, at, quote in items:
        try:
            claims = verify_quote(quote, _collateral_from_raw(collaterals[index]), at)
            outcomes.append({"claims": claims_to_json(claims)})
        except MarbleKeepError as exc:
            outcomes.append({"error": type(exc).__name__, "message": exc.message})
        except Exception as exc:
            outcomes.append(
                {"error": "AttestationError", "message": f"quote verification failed: {type(exc).__name__}"}
            )
    return json.dumps(outcomes, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- process pool

_ERRORS_BY_NAME: dict[str, type[MarbleKeepError]] = {
    cls.__name__: cls for cls in (AttestationError, CollateralError, ConfigError)
}


@dataclass
class _Request:
    quote: bytes
    collateral: Collateral
    at: dt.datetime
    future: asyncio.Future[TeeClaims]


def _settle(future: asyncio.Future[TeeClaims], outcome: TeeClaims | BaseException) -> None:
    if future.done() or future.get_loop().is_closed():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _Worker:
    """One worker process and the batches it has in flight."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "marblekeep.attestation.verifier_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)
        self.outbuf = bytearray()
        self.inbuf = bytearray()
        self.in_flight: dict[int, list[_Request]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.alive = True

    def detach(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.rfd)
            self.loop.remove_writer(self.wfd)
        self.loop = None

    def stop(self) -> None:
        self.detach()
        self.alive = False
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class QuoteVerifierPool:
    """Runs :func:`verify_quote` in worker processes, off the event loop.

    ``dcap-qvl`` holds the GIL, so threads would not help: the pool runs ``workers`` worker
    processes (default: the number of CPUs), started on first use or by :meth:`start`.
    The event loop talks to them over non-blocking pipes (no helper threads, no pickle).

    Requests are *micro-batched*: each worker has at most ``depth`` batches in flight, and
    the requests that queued up meanwhile (up to ``max_batch``) go out together as the next
    batch. An idle pool sends a lone request at once, so latency does not grow; a busy pool
    pays the inter-process round trip once per batch rather than once per quote. Errors are
    re-raised in the caller as the same :mod:`marblekeep.errors` class with the same message.
    A worker that dies fails its in-flight requests (``AttestationError``, retry) and is
    replaced on the next request.
    """

    def __init__(self, workers: int | None = None, *, max_batch: int = 16, depth: int = 2) -> None:
        count = workers if workers is not None else (os.cpu_count() or 1)
        if count < 1:
            raise ConfigError(f"quote verifier pool: workers must be at least 1, not {count}")
        if not 1 <= max_batch <= 1000 or depth < 1:
            raise ConfigError("quote verifier pool: max_batch must be 1..1000 and depth at least 1")
        self.workers = count
        self.max_batch = max_batch
        self.depth = depth
        self._pool: list[_Worker] = []
        self._queue: collections.deque[_Request] = collections.deque()
        self._next_batch = 0
        self._scheduled_on: asyncio.AbstractEventLoop | None = None  # a dispatch is pending there
        self._closed = False

    def start(self) -> None:
        """Start the worker processes now (they also start on the first request)."""
        if self._closed:
            raise ConfigError("quote verifier pool: used after close()")
        self._pool = [w for w in self._pool if w.alive]
        while len(self._pool) < self.workers:
            self._pool.append(_Worker())

    async def verify(self, quote: bytes, collateral: Collateral, at: dt.datetime) -> TeeClaims:
        """Verify in a worker; same contract as :func:`verify_quote`."""
        at = _aware(at)
        loop = asyncio.get_running_loop()
        self.start()
        request = _Request(quote, collateral, at, loop.create_future())
        self._queue.append(request)
        self._schedule_dispatch(loop)
        return await request.future

    def _schedule_dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch soon: after the callers woken in this loop iteration had a chance to queue."""
        if self._scheduled_on is not loop:  # (a dispatch pending on a closed loop never runs)
            self._scheduled_on = loop
            loop.call_soon(self._dispatch, loop)

    def _attach(self, worker: _Worker, loop: asyncio.AbstractEventLoop) -> None:
        if worker.loop is not loop:
            worker.detach()
            worker.loop = loop
            loop.add_reader(worker.rfd, self._on_readable, worker)
            if worker.outbuf:
                loop.add_writer(worker.wfd, self._on_writable, worker)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled_on = None
        if self._closed:
            return
        self.start()
        while self._queue:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # the caller was cancelled
            free = sum(max(0, self.depth - len(w.in_flight)) for w in self._pool)
            if not self._queue or free == 0:
                return
            # spread what is queued over the free slots, so that every worker gets a share
            size = min(self.max_batch, -(-len(self._queue) // free))
            worker = min(self._pool, key=lambda w: len(w.in_flight))
            batch: list[_Request] = []
            while self._queue and len(batch) < size:
                request = self._queue.popleft()
                if not request.future.done():
                    batch.append(request)
            if batch:
                self._send(worker, batch, loop)

    def _send(self, worker: _Worker, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        collaterals: list[bytes] = []
        slots: dict[int, int] = {}
        items: list[tuple[int, dt.datetime, bytes]] = []
        for r in batch:
            slot = slots.setdefault(id(r.collateral.raw_json), len(collaterals))
            if slot == len(collaterals):
                collaterals.append(r.collateral.raw_json)
            items.append((slot, r.at, r.quote))
        self._next_batch = (self._next_batch + 1) & 0xFFFFFFFF
        worker.in_flight[self._next_batch] = batch
        worker.outbuf += encode_request(self._next_batch, collaterals, items)
        self._attach(worker, loop)
        self._on_writable(worker)

    def _on_writable(self, worker: _Worker) -> None:
        try:
            while worker.outbuf:
                written = os.write(worker.wfd, worker.outbuf)
                del worker.outbuf[:written]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._worker_died(worker, exc)
            return
        assert worker.loop is not None
        if worker.outbuf:
            worker.loop.add_writer(worker.wfd, self._on_writable, worker)
        else:
            worker.loop.remove_writer(worker.wfd)

    def _on_readable(self, worker: _Worker) -> None:
        try:
            chunk = os.read(worker.rfd, 1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            self._worker_died(worker, exc)
            return
        if not chunk:
            self._worker_died(worker, None)
            return
        worker.inbuf += chunk
        while len(worker.inbuf) >= 4:
            (length,) = struct.unpack_from("<I", worker.inbuf, 0)
            if len(worker.inbuf) < 4 + length:
                break
            batch_id = struct.unpack_from("<I", worker.inbuf, 4)[0]
            payload = bytes(worker.inbuf[8 : 4 + length])
            del worker.inbuf[: 4 + length]
            self._resolve(worker.in_flight.pop(batch_id, []), payload)
        if worker.loop is not None and self._queue:
            self._schedule_dispatch(worker.loop)

    @staticmethod
    def _resolve(batch: list[_Request], payload: bytes) -> None:
        try:
            outcomes = json.loads(payload)
            if not isinstance(outcomes, list) or len(outcomes) != len(batch):
                raise ValueError("wrong number of results")
            for request, outcome in zip(batch, outcomes, strict=True):
                if "claims" in outcome:
                    _settle(request.future, claims_from_json(outcome["claims"]))
                else:
                    error = _ERRORS_BY_NAME.get(str(outcome.get("error")), AttestationError)
                    _settle(request.future, error(str(outcome.get("message", "quote verification failed"))))
        except (ValueError, KeyError, TypeError, AttributeError):
            failure = AttestationError(
                "quote verifier worker sent a malformed answer; the quote was not verified"
            )
            for request in batch:
                _settle(request.future, failure)

    def _worker_died(self, worker: _Worker, exc: BaseException | None) -> None:
        loop = worker.loop
        worker.detach()
        worker.alive = False
        reason = f" ({type(exc).__name__})" if exc else ""
        failure = AttestationError(f"quote verifier worker exited{reason}; the quote was not verified: retry")
        for batch in worker.in_flight.values():
            for request in batch:
                _settle(request.future, failure)
        worker.in_flight.clear()
        with contextlib.suppress(Exception):
            worker.stop()
        if worker in self._pool:
            self._pool.remove(worker)
        if loop is not None and self._queue and not self._closed and not loop.is_closed():
            self._schedule_dispatch(loop)  # queued requests go to a fresh worker

    def close(self) -> None:
        """Stop the workers. Requests still in flight fail with :class:`AttestationError`."""
        self._closed = True
        failure = AttestationError("quote verifier pool closed; the quote was not verified")
        for worker in self._pool:
            for batch in worker.in_flight.values():
                for request in batch:
                    _settle(request.future, failure)
            worker.in_flight.clear()
            worker.stop()
        self._pool = []
        while self._queue:
            _settle(self._queue.popleft().future, failure)

    def __enter__(self) -> QuoteVerifierPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
