"""What one MarbleRun-protocol activation costs the Coordinator beyond the activation core, part by
part: server CPU time, in-process, on one core, with no sockets (so preemption by other work on a
shared machine is not counted).

    .venv/bin/python bench/grpc_parts.py [--n 300] [--rounds 5]

1. The TLS handshake, server side only (the context of api/tlslayer.py with a P-256 listener key,
   TLS 1.3, client certificate requested; the client is OpenSSL with its default key-exchange groups,
   the output names the one negotiated), for a client that presents no certificate (our premain),
   a P-256 certificate (MarbleRun v1.5.2's premain) and a P-384 one; then reading the peer
   certificate's DER as the layer does.
2. The CSR: parsing and checking its signature (P-256 and P-384), and the whole
   ``parse_marblerun_request`` (UUID, CSR, SANs, subject) for the premain's P-256 CSR.
3. HTTP/2 and gRPC framing: one ``GrpcProtocol`` connection from the client's preface to the answer
   (the handler returns a 6 KiB answer at once), including the event-loop turns it takes.

Medians over ``--rounds`` of ``--n`` repetitions each, in microseconds. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from marblekeep.api.grpc import GrpcProtocol, UnaryMethod
from marblekeep.api.tls import ServerCredentials
from marblekeep.api.tlslayer import build_context
from marblekeep.marble.marblerun import parse_marblerun_request
from marblekeep.marble.marblerun_wire import ActivationReq

METHOD = "/rpc.Marble/Activate"


def self_signed(curve: ec.EllipticCurve, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(curve)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def csr_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(san, False)
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def handshake_cost(server_ctx: SSL.Context, client_ctx: SSL.Context) -> float:
    """Server CPU seconds of one full handshake (plus reading the peer certificate's DER)."""
    return _handshake(server_ctx, client_ctx)[0]


def negotiated_group(server_ctx: SSL.Context, client_ctx: SSL.Context) -> str:
    return _handshake(server_ctx, client_ctx)[1]


def _handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> tuple[float, str]:
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    spent = 0.0
    server_done = client_done = False
    while not (server_done and client_done):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except SSL.WantReadError:
                pass
        data = _drain(client)
        t0 = time.thread_time()
        if data:
            server.bio_write(data)
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
                peer = server.get_peer_certificate(as_cryptography=True)
                if peer is not None:
                    peer.public_bytes(serialization.Encoding.DER)
            except SSL.WantReadError:
                pass
        out = _drain(server)
        spent += time.thread_time() - t0
        if out:
            client.bio_write(out)
    return spent, str(server.get_group_name())


def _drain(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(conn.bio_read(65536))
        except SSL.WantReadError:
            return b"".join(chunks)


def client_context(cert: x509.Certificate | None, key: ec.EllipticCurvePrivateKey | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if cert is not None and key is not None:
        ctx.use_certificate(cert)
        ctx.use_privatekey(key)
    return ctx


class _Transport(asyncio.Transport):
    def __init__(self, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def grpc_client_bytes(message: bytes) -> tuple[bytes, bytes]:
    """What a gRPC client sends: preface, SETTINGS, HEADERS and DATA; then its SETTINGS ACK."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", METHOD),
        (":authority", "localhost:2001"),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-go/1.64.0"),
        ("te", "trailers"),
    ]
    conn.send_headers(1, headers)
    conn.send_data(1, len(message).to_bytes(5, "big") + message, end_stream=True)
    return conn.data_to_send(), b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


async def grpc_connection_cost(first: bytes, ack: bytes, answer: bytes, peer: bytes) -> float:
    async def handler(message: bytes, cert: bytes | None) -> bytes:
        return answer

    methods = {METHOD: UnaryMethod(handler, 1 << 20)}
    t0 = time.thread_time()
    proto = GrpcProtocol(methods)
    transport = _Transport({"peer_cert_der": peer})
    proto.connection_made(transport)
    proto.data_received(first)
    for _ in range(3):  # the handler's task, the deferred flush
        await asyncio.sleep(0)
    proto.data_received(ack)
    proto.connection_lost(None)
    spent = time.thread_time() - t0
    if b"grpc-status" not in transport.out and len(transport.out) < len(answer):
        raise RuntimeError("no answer")
    return spent


def measure(label: str, fn: Callable[[], float], n: int, rounds: int) -> None:
    for _ in range(max(5, n // 20)):
        fn()
    medians = [statistics.median(fn() for _ in range(n)) for _ in range(rounds)]
    print(f"{label:64s} {statistics.median(medians) * 1e6:8.0f} us")


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.thread_time()
        fn()
        return time.thread_time() - t0

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="repetitions per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = args.n, args.rounds

    listener_cert, listener_key = self_signed(ec.SECP256R1(), "listener")
    server_ctx = build_context(ServerCredentials((listener_cert,), listener_key), b"bench")
    p256 = self_signed(ec.SECP256R1(), "MarbleRun Marble")
    p384 = self_signed(ec.SECP384R1(), "MarbleRun Marble")
    group = negotiated_group(server_ctx, client_context(None, None))
    print(f"1. TLS 1.3 handshake, server side (P-256 listener key; key exchange {group}, OpenSSL's default):")
    for label, ctx in [
        ("   client presents no certificate (our premain)", client_context(None, None)),
        ("   client presents a P-256 certificate (MarbleRun v1.5.2 premain)", client_context(*p256)),
        ("   client presents a P-384 certificate", client_context(*p384)),
    ]:
        measure(label, lambda ctx=ctx: handshake_cost(server_ctx, ctx), n, rounds)

    print("2. the CSR:")
    for label, key in [("P-256", p256[1]), ("P-384", p384[1])]:
        der = csr_of(key)
        measure(
            f"   load + signature check, {label}",
            timed(lambda der=der: x509.load_der_x509_csr(der).is_signature_valid),
            n,
            rounds,
        )
    req = ActivationReq(csr=csr_of(p256[1]), marble_type="app", uuid=str(uuid.uuid4()))
    measure("   parse_marblerun_request (P-256 CSR)", timed(lambda: parse_marblerun_request(req)), n, rounds)

    print("3. HTTP/2 + gRPC framing, one connection with one unary call:")
    first, ack = grpc_client_bytes(os.urandom(600))
    answer = os.urandom(6 * 1024)
    peer = p256[0].public_bytes(serialization.Encoding.DER)

    async def h2_parts() -> None:
        async def once() -> float:
            return await grpc_connection_cost(first, ack, answer, peer)

        for _ in range(max(5, n // 20)):
            await once()
        medians = []
        for _ in range(rounds):
            medians.append(statistics.median([await once() for _ in range(n)]))
        print(
            f"{'   GrpcProtocol: preface, SETTINGS, call, answer, close':64s} "
            f"{statistics.median(medians) * 1e6:8.0f} us"
        )

    asyncio.run(h2_parts())


if __name__ == "__main__":
    main()
