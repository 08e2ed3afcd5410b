"""Marble activations over HTTPS on loopback, against a real ``marblekeep coordinator`` process,
by both protocols the Marble address speaks: marblekeep's (HTTPS + HPKE) and MarbleRun's (gRPC), the
latter driven by two clients.

    .venv/bin/python bench/activation.py [--seconds 3] [--levels 1,16,64] [--clients 2]
                                         [--protocols marblekeep,marblerun,marblerun-go]
                                         [--profile-server FILE]

Starts ``marblekeep coordinator --simulation`` as a subprocess on free loopback ports (state in a
temporary directory), sets a manifest, then for each concurrency level N measures, one after the
other, N concurrent Marbles of each protocol (``--protocols``, default all three):

- ``marblekeep``: our protocol, in ``--clients`` Python load-generator processes (aiohttp), separate
  from the Coordinator so that it does not share a GIL with them. One activation does what our
  premain does: a NEW HTTPS connection (full TLS handshake, no session resumption), POST
  /marble/v1/challenge, a fresh X25519 key, the simulation evidence bound to the request, POST
  /marble/v1/activate, and opening the sealed Parameters with marblekeep.marble.protocol.
- ``marblerun-go``: MarbleRun's protocol driven by grpc-go, as MarbleRun's premain (Go, on
  google.golang.org/grpc) drives it: bench/goload, ONE Go process per phase with N goroutines, built on
  first use into bench/goload/bin/ (gitignored; rebuilt when its sources change; without Go this
  protocol is skipped with the reason). One activation does what one premain start does: a NEW grpc-go
  client connection (TLS with ALPN h2 and InsecureSkipVerify, presenting the Marble's self-signed P-256
  client certificate; full handshake), one rpc.Marble/Activate call with an empty quote (simulation),
  the CSR, the type and a fresh UUID, the answer checked for the Marble's certificate, the connection
  closed.
- ``marblerun``: the same activation by Python's grpcio (a new grpc.aio channel per activation), in
  the ``--clients`` Python processes; kept as a comparison from the Python stack.

Why two gRPC clients: grpc-go is what real MarbleRun Marbles run, so ``marblerun-go`` is the faithful
load and its share of our rate is the figure for the target. grpcio costs the client about 2-2.5x the
CPU of grpc-go per activation; at N = 1 (latency-bound, client and server on the same 2 cores) that
alone lowers the grpcio rate. The client CPU column shows where a difference between the two gRPC rows
lies: the server CPU per activation is the same protocol's in both.

The Marble identities (P-256 key, self-signed certificate, CSR, made as MarbleRun v1.5.2's premain
makes them, see marble_identity) are made before the measurement, a pool of 32 per load generator
used round robin: a premain makes one per start, and the bench measures the Coordinator, not the
Marble's key generation. The Marble receives the seal key, a shared and a per-Marble symmetric key, a
shared cert-ecdsa secret and its TLS credentials (the bench/core.py Marble). Printed per level and
protocol: activations/s, p50/p99 latency, the CPU per activation of the server (the Coordinator
process, sampled around the measured part) and of the client (the Python load generators' summed, or
the Go process's: each client's own CPU); then each gRPC client's rate as a share of ours.

In the same run: the crypto floor (pki.leaf_floor: P-384 keygen + one signature, one core) and a
bare TLS-handshake floor: GET /api/v2/status on the Client API (same credentials) with a new
connection each, at the highest level's concurrency.

Targets on the 2-core reference machine: >= 200 activations/s at N = 64; p50 <= 15 ms at N = 1
(marblekeep's protocol); MarbleRun's protocol >= 80% of marblekeep's activations/s at each N (printed
for both gRPC clients). The load generators share those 2 cores with the Coordinator; the output says
so. Nothing asserts on time. ``--profile-server FILE`` runs the Coordinator under cProfile (timed by the
CPU time of its event-loop thread, see bench/serve_coordinator.py) and writes its stats there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import itertools
import json
import multiprocessing as mp
import os
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # gobuild: the shared Go build

from core import MANIFEST  # the same Marble as bench/core.py
from gobuild import find_go, go_build
from marblekeep.crypto.pki import leaf_floor
from marblekeep.marble.marblerun_wire import ActivationReq, decode_activation_resp, encode_activation_req
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    ActivationRequest,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
    open_parameters,
    parse_challenge_response,
)

MARBLE_TYPE = "app"
JSON_HEADERS = {"Content-Type": "application/json"}
STARTUP_TIMEOUT = 20.0
TARGET_RATE_AT_64 = 200.0
TARGET_P50_AT_1_MS = 15.0
TARGET_GRPC_SHARE = 0.80
GRPC_METHOD = "/rpc.Marble/Activate"
IDENTITY_POOL = 32
GOLOAD_DIR = Path(__file__).resolve().parent / "goload"

#: The protocols (and clients) the bench can measure, and the load-generator operation of each.
PROTOCOL_OPS = {
    "marblekeep": "activation",  # our protocol, aiohttp + HPKE (Python)
    "marblerun": "grpc-activation",  # MarbleRun's gRPC protocol, grpcio client (Python over C)
    "marblerun-go": "grpc-go-activation",  # MarbleRun's gRPC protocol, grpc-go as its premain (bench/goload)
}
PROTOCOL_HELP = {
    "marblekeep": "ours: HTTPS + HPKE, aiohttp client",
    "marblerun": "MarbleRun's gRPC protocol, Python grpcio client",
    "marblerun-go": "MarbleRun's gRPC protocol, driven by grpc-go as MarbleRun's premain (bench/goload)",
}


# --------------------------------------------------------------------------- the Coordinator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[bytes]
    client_url: str
    marble_url: str
    log_path: Path
    root_pem_path: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time of the Coordinator process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def supervised(
    proc: subprocess.Popen[bytes], log_path: Path, what: str, stop_timeout: float = 15
) -> Iterator[None]:
    """Wait until the Coordinator ``proc`` logs that it started (exit with its log's tail if it dies
    or takes too long); on leaving, SIGTERM it, then kill it if it does not stop in time."""
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while b"coordinator started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def coordinator(workdir: Path, profile: Path | None, src: Path | None = None) -> Iterator[Server]:
    """A Coordinator subprocess (bench/serve_coordinator.py); ``src``: run the marblekeep package
    of that source tree instead of the installed one."""
    client_port, marble_port = free_port(), free_port()
    log_path = workdir / "coordinator.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "serve_coordinator.py"),
        f"127.0.0.1:{client_port},127.0.0.1:{marble_port},{workdir / 'state'}",
    ]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH", "")]))
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(
        proc,
        f"https://127.0.0.1:{client_port}",
        f"https://127.0.0.1:{marble_port}",
        log_path,
        workdir / "root.pem",
    )
    with supervised(proc, log_path, "the Coordinator"):
        yield server


def set_manifest(server: Server) -> None:
    raw = json.dumps(MANIFEST).encode()
    body = {"manifest": base64.b64encode(raw).decode()}
    response = httpx.post(f"{server.client_url}/api/v2/manifest", json=body, verify=False, timeout=30)
    if response.status_code != 200:
        raise SystemExit(f"setting the manifest failed: {response.status_code} {response.text}")
    chain = httpx.get(f"{server.client_url}/api/v2/quote", verify=False, timeout=30).json()["data"]["cert"]
    marker = "-----BEGIN CERTIFICATE-----"
    server.root_pem_path.write_text(marker + chain.rsplit(marker, 1)[1])  # the root CA, last in the chain


# --------------------------------------------------------------------------- load generator


def client_tls() -> ssl.SSLContext:
    # As the premain without EDG_MARBLE_COORDINATOR_CA_FILE: the Parameters are sealed to the Marble's
    # attested key, so the transport is not authenticated. No session resumption: every connection
    # makes a full handshake.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def activation(ctx: ssl.SSLContext, base_url: str) -> None:
    """One Marble activation on a new connection, as the premain does it."""
    marble_uuid = uuid.uuid4()
    connector = aiohttp.TCPConnector(ssl=ctx, limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(base_url + CHALLENGE_PATH, data=b"{}", headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                raise RuntimeError(f"challenge: HTTP {resp.status}: {await resp.text()}")
            nonce = parse_challenge_response(await resp.read())
        key = X25519PrivateKey.generate()
        request = ActivationRequest(
            marble_type=MARBLE_TYPE,
            uuid=marble_uuid,
            dns_names=("app.internal",),
            hpke_public_key=key.public_key().public_bytes_raw(),
            nonce=nonce,
            evidence_type=EvidenceType.SIMULATION,
            evidence=b"",
        )
        # Simulation evidence is the report data itself (marblekeep.marble.evidence.SimulationIssuer).
        request = dataclasses.replace(request, evidence=expected_report_data(request))
        body = encode_activation_request(request)
        async with session.post(base_url + ACTIVATE_PATH, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                raise RuntimeError(f"activate: HTTP {resp.status}: {await resp.text()}")
            doc = await resp.json()
    params = open_parameters(base64.b64decode(doc["data"]["sealedParameters"]), key, request)
    if b"BEGIN CERTIFICATE" not in params.files["/tls/marble.crt"]:
        raise RuntimeError("activation returned no Marble certificate")


async def status_handshake(ctx: ssl.SSLContext, base_url: str) -> None:
    """A bare TLS handshake plus the cheapest request: GET /api/v2/status on a new connection."""
    connector = aiohttp.TCPConnector(ssl=ctx, limit=1)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(base_url + "/api/v2/status") as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"status: HTTP {resp.status}")
        await resp.read()


@dataclasses.dataclass(frozen=True)
class MarbleIdentity:
    """What MarbleRun v1.5.2's premain makes at start (marble/premain, util.GenerateCert and
    util.GenerateCSR): a P-256 key, a self-signed certificate for it, and a CSR signed by it."""

    credentials: grpc.ChannelCredentials
    csr_der: bytes


#: The premain's defaults: EDG_MARBLE_DNS_NAMES=localhost, and 127.0.0.1 and ::1 always.
PREMAIN_DNS_NAMES = ("localhost",)
PREMAIN_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def marble_identity(root_pem: bytes) -> MarbleIdentity:
    """The premain's identity, described from its observable output: an ECDSA P-256 key; a
    self-signed certificate with CN "MarbleRun Marble", the DNS names and IP addresses as SANs, key
    usage digital signature and key agreement, extended key usage server and client auth, basic
    constraints CA:false, valid from now for 2^63 ns; a CSR with an empty subject and the same SANs
    (loopback addresses first). Both signed with ECDSA-SHA256."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MarbleRun Marble")])
    dns = [x509.DNSName(n) for n in PREMAIN_DNS_NAMES]
    ips = [x509.IPAddress(ip) for ip in PREMAIN_IPS]
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(microseconds=(2**63 - 1) // 1000))
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([*dns, *ips]), critical=False)
        .sign(key, hashes.SHA256())
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([*dns, *ips]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    creds = grpc.ssl_channel_credentials(root_pem, key_pem, cert.public_bytes(serialization.Encoding.PEM))
    return MarbleIdentity(creds, csr.public_bytes(serialization.Encoding.DER))


#: The load generator's pool of Marble identities, used round robin (set up before the measurement).
_identities: list[Iterator[MarbleIdentity]] = []


async def grpc_activation(ctx: ssl.SSLContext, base_url: str) -> None:
    """One MarbleRun-premain activation: a new gRPC channel (TLS + client certificate), one call."""
    identity = next(_identities[0])
    target = base_url.removeprefix("https://")
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    request = ActivationReq(csr=identity.csr_der, marble_type=MARBLE_TYPE, uuid=str(uuid.uuid4()))
    async with grpc.aio.secure_channel(target, identity.credentials, options=options) as channel:
        call = channel.unary_unary(GRPC_METHOD, request_serializer=None, response_deserializer=None)
        answer = await call(encode_activation_req(request), timeout=60)
    params = decode_activation_resp(answer)
    if b"BEGIN CERTIFICATE" not in params.files["/tls/marble.crt"]:
        raise RuntimeError("activation returned no Marble certificate")


OPS: dict[str, Callable[[ssl.SSLContext, str], Awaitable[None]]] = {
    "activation": activation,
    "handshake": status_handshake,
    "grpc-activation": grpc_activation,
}


async def _drive(
    op_name: str, base_url: str, concurrency: int, seconds: float, barrier: Barrier, root_pem: bytes
) -> dict[str, Any]:
    ctx = client_tls()
    op = OPS[op_name]
    if op_name == "grpc-activation":
        _identities[:] = [itertools.cycle([marble_identity(root_pem) for _ in range(IDENTITY_POOL)])]
    for _ in range(3):  # warm up imports, the TLS context and the server's code paths
        await op(ctx, base_url)
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    cpu_start = time.process_time()
    deadline = start + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await op(ctx, base_url)
            except Exception as exc:  # a bench reports failures, it does not stop on them
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "latencies": latencies,
        "errors": errors,
        "elapsed": time.perf_counter() - start,
        "cpu": time.process_time() - cpu_start,
    }


def loadgen(
    op_name: str,
    base_url: str,
    concurrency: int,
    seconds: float,
    barrier: Barrier,
    out: mp.Queue[Any],
    root_pem: bytes,
) -> None:
    out.put(asyncio.run(_drive(op_name, base_url, concurrency, seconds, barrier, root_pem)))


@dataclasses.dataclass(frozen=True)
class Phase:
    label: str
    concurrency: int
    rate: float
    p50_ms: float
    p99_ms: float
    count: int
    errors: int
    server_cpu_ms: float  # Coordinator CPU time per operation
    client_cpu_ms: float  # load generators' CPU time per operation
    first_error: str
    note: str = ""  # bench/goload: the TLS its warm-up negotiated


def run_phase(
    server: Server, op_name: str, base_url: str, concurrency: int, seconds: float, clients: int
) -> Phase:
    """One measured phase: ``concurrency`` Marbles for ``seconds``, the Coordinator's CPU time sampled
    around the measured part. ``grpc-go-activation`` runs in one Go process (``clients`` does not
    apply: it uses goroutines); the others in ``clients`` Python load-generator processes."""
    if op_name == "grpc-go-activation":
        return run_go_phase(server, base_url, concurrency, seconds)
    ctx = mp.get_context("spawn")
    procs = min(clients, concurrency)
    barrier = ctx.Barrier(procs + 1)
    out: mp.Queue[Any] = ctx.Queue()
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(
            target=loadgen,
            args=(op_name, base_url, share, seconds, barrier, out, server.root_pem_path.read_bytes()),
        )
        for share in shares
    ]
    for p in workers:
        p.start()
    barrier.wait(timeout=60)
    cpu0 = server.cpu_seconds()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    cpu1 = server.cpu_seconds()
    for p in workers:
        p.join()
    return phase_statistics(op_name, concurrency, results, cpu1 - cpu0)


def phase_statistics(
    op_name: str, concurrency: int, results: list[dict[str, Any]], server_cpu: float
) -> Phase:
    """The Phase of the load generators' ``results`` (``_drive``'s shape: latencies, errors, elapsed,
    cpu; bench/goload adds error_count, as it keeps only the first messages) and the Coordinator's CPU
    seconds ``server_cpu`` over the measured part."""
    latencies = sorted(x for r in results for x in r["latencies"])
    errors = [e for r in results for e in r["errors"]]
    error_count = sum(int(r.get("error_count", len(r["errors"]))) for r in results)
    elapsed = max(r["elapsed"] for r in results)
    count = len(latencies)
    if count == 0:
        raise SystemExit(f"{op_name} at N={concurrency}: nothing succeeded; first error: {errors[:1]}")
    # Server CPU is sampled around the whole phase (the tail after the deadline included): an estimate.
    return Phase(
        label=op_name,
        concurrency=concurrency,
        rate=count / elapsed,
        p50_ms=statistics.median(latencies) * 1e3,
        p99_ms=latencies[min(count - 1, int(0.99 * count))] * 1e3,
        count=count,
        errors=error_count,
        server_cpu_ms=server_cpu * 1e3 / count,
        client_cpu_ms=sum(r["cpu"] for r in results) * 1e3 / count,
        first_error=errors[0] if errors else "",
    )


# --------------------------------------------------------------------------- the grpc-go load generator


class GoLoadUnavailable(Exception):
    """bench/goload cannot be built here (no Go, or the build failed); the message says why."""


def goload_binary() -> Path:
    """bench/goload built into bench/goload/bin/ (gitignored), named by a digest of its sources, so a
    change to them makes a new build; built on first use, one build at a time."""
    sources = sorted(p for p in GOLOAD_DIR.iterdir() if p.suffix == ".go" or p.name in {"go.mod", "go.sum"})
    digest = hashlib.sha256()
    for p in sources:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    bin_dir = GOLOAD_DIR / "bin"
    path = bin_dir / f"goload-{digest.hexdigest()[:16]}"
    if os.access(path, os.X_OK):
        return path
    go = find_go()
    if go is None:
        raise GoLoadUnavailable(
            "Go is not installed (looked on PATH, in /usr/local/go/bin and /usr/lib/go/bin); install Go "
            ">= 1.22 (the module proxy must be reachable, or the module cache hold bench/goload/go.sum's "
            "modules) to measure MarbleRun's protocol driven by grpc-go"
        )
    print(f"building {path.relative_to(GOLOAD_DIR.parent.parent)} with {go} ...", flush=True)
    failed = go_build(go, GOLOAD_DIR, path, lambda: os.access(path, os.X_OK))
    if failed is not None:
        raise GoLoadUnavailable(f"building bench/goload failed:\n{failed}")
    for old in bin_dir.glob("goload-*"):
        if old != path and not old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)
    return path


def _read_line(proc: subprocess.Popen[bytes], stderr: IO[bytes], timeout: float, what: str) -> bytes:
    """One line of the Go load generator's stdout; exits with its stderr if it dies or stalls."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line.endswith(b"\n"):
        proc.kill()
        proc.wait()
        stderr.seek(0)
        err = stderr.read().decode(errors="replace")[-2000:]
        state = f"exited with status {proc.returncode}" if ready else f"sent nothing in {timeout:.0f} s"
        raise SystemExit(f"bench/goload {state} while waiting for {what}:\n{err}")
    return line


def run_go_phase(server: Server, base_url: str, concurrency: int, seconds: float) -> Phase:
    """One phase of MarbleRun's protocol driven by grpc-go (bench/goload): ONE Go process with
    ``concurrency`` goroutines; its client CPU is the Go process's."""
    addr = base_url.removeprefix("https://")
    cmd = [
        str(goload_binary()),
        f"-addr={addr}",
        f"-n={concurrency}",
        f"-seconds={seconds}",
        f"-type={MARBLE_TYPE}",
        f"-pool={IDENTITY_POOL}",
        f"-dns={','.join(PREMAIN_DNS_NAMES)}",
    ]
    # stderr to a file: grpc-go logs there, and a full pipe would stall the load generator
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if _read_line(proc, stderr, 60, "ready").strip() != b"ready":
                raise SystemExit("bench/goload did not say ready")
            cpu0 = server.cpu_seconds()  # the barrier: the measurement starts with the line below
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            result = json.loads(_read_line(proc, stderr, seconds + 60, "its result"))
            cpu1 = server.cpu_seconds()
            proc.stdin.close()
            if proc.wait(timeout=30) != 0:
                raise SystemExit(f"bench/goload exited with status {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    phase = phase_statistics("grpc-go-activation", concurrency, [result], cpu1 - cpu0)
    return dataclasses.replace(phase, note=str(result.get("tls", "")))


def crypto_floor(seconds: float) -> float:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    for _ in range(20):
        leaf_floor(key, now)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            leaf_floor(key, now)
        done += 20
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measured level")
    parser.add_argument("--levels", default="1,16,64", help="comma-separated concurrency levels N")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--protocols",
        default=",".join(PROTOCOL_OPS),
        help="comma-separated, which protocols (and clients) to measure (default: all):\n"
        + "\n".join(f"  {name}: {text}" for name, text in PROTOCOL_HELP.items()),
    )
    parser.add_argument(
        "--profile-server",
        type=Path,
        default=None,
        help="cProfile the Coordinator (CPU time of its event-loop thread) to FILE",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    unknown = set(protocols) - set(PROTOCOL_OPS)
    if unknown:
        parser.error(f"--protocols: unknown {', '.join(sorted(unknown))} (use {', '.join(PROTOCOL_OPS)})")
    started = time.perf_counter()
    if "marblerun-go" in protocols:
        try:
            goload = goload_binary()
        except GoLoadUnavailable as exc:
            print(f"marblerun-go is SKIPPED: {exc}")
            protocols.remove("marblerun-go")
        else:
            print(f"marblerun-go load generator: {goload.relative_to(GOLOAD_DIR.parent.parent)}")

    cpus = os.cpu_count() or 1
    print(
        f"machine: {cpus} CPU(s), shared by the Coordinator process and {args.clients} load-generator "
        "process(es) (client TLS handshakes, X25519 and HPKE opening compete with the server for them)"
    )
    floor = crypto_floor(1.0)
    print(f"crypto floor (P-384 keygen + one signature, one core):   {floor:7.0f} /s  ({1e6 / floor:.0f} us)")

    phases: dict[tuple[str, int], Phase] = {}
    with (
        tempfile.TemporaryDirectory(prefix="marblekeep-bench-") as tmp,
        coordinator(Path(tmp), args.profile_server) as server,
    ):
        set_manifest(server)
        hs = run_phase(server, "handshake", server.client_url, max(levels), args.seconds, args.clients)
        print(
            f"TLS-handshake floor (new connection + GET /api/v2/status, N={hs.concurrency}): "
            f"{hs.rate:7.0f} /s  (p50 {hs.p50_ms:.1f} ms, server CPU {hs.server_cpu_ms:.2f} ms, "
            f"client CPU {hs.client_cpu_ms:.2f} ms each)"
        )
        print()
        for protocol in protocols:
            print(f"  {protocol}: {PROTOCOL_HELP[protocol]}")
        if "marblerun-go" in protocols:
            print(
                "  (client CPU of marblerun-go is the one Go process's, goroutines on all cores; of the "
                f"others, the sum of the {args.clients} Python load-generator processes')"
            )
        print(
            "protocol        N  activations/s   p50 ms   p99 ms   count  errors  "
            "CPU ms/activation: server client"
        )
        go_tls = ""
        for n in levels:
            for protocol in protocols:
                op = PROTOCOL_OPS[protocol]
                ph = run_phase(server, op, server.marble_url, n, args.seconds, args.clients)
                phases[(protocol, n)] = ph
                go_tls = go_tls or ph.note
                print(
                    f"{protocol:12s} {n:4d}  {ph.rate:13.0f}  {ph.p50_ms:7.1f}  {ph.p99_ms:7.1f}"
                    f"  {ph.count:6d}  {ph.errors:6d}  {ph.server_cpu_ms:25.2f} {ph.client_cpu_ms:6.2f}",
                    flush=True,
                )
                if ph.first_error:
                    print(f"      first error: {ph.first_error}")
        if go_tls:
            print(f"marblerun-go connections: {go_tls}")

    print()
    ours = {n: p for (protocol, n), p in phases.items() if protocol == "marblekeep"}
    if 64 in ours:
        ok = ours[64].rate >= TARGET_RATE_AT_64
        verdict = "met" if ok else "MISSED"
        print(f"target N=64 >= {TARGET_RATE_AT_64:.0f} activations/s: {ours[64].rate:.0f} ({verdict})")
    if 1 in ours:
        ok = ours[1].p50_ms <= TARGET_P50_AT_1_MS
        verdict = "met" if ok else "MISSED"
        print(f"target N=1 p50 <= {TARGET_P50_AT_1_MS:.0f} ms: {ours[1].p50_ms:.1f} ms ({verdict})")
    clients = {"marblerun-go": "grpc-go client (as the premain)", "marblerun": "grpcio client"}
    for protocol, client in clients.items():
        theirs = {n: p for (name, n), p in phases.items() if name == protocol}
        for n in levels:
            if n in ours and n in theirs:
                share = theirs[n].rate / ours[n].rate
                verdict = "met" if share >= TARGET_GRPC_SHARE else "MISSED"
                print(
                    f"target MarbleRun protocol, {client:31s} >= {TARGET_GRPC_SHARE:.0%} of ours "
                    f"at N={n:<3d}: {theirs[n].rate:5.0f} / {ours[n].rate:5.0f} = {share:4.0%} "
                    f"({verdict}; server CPU {theirs[n].server_cpu_ms / ours[n].server_cpu_ms:.2f}x ours)"
                )
    print(f"(whole run {time.perf_counter() - started:.0f} s)")
    if args.profile_server is not None:
        print(f"server profile written to {args.profile_server} (python -m pstats {args.profile_server})")


if __name__ == "__main__":
    main()
