"""User authentication by TLS client certificate (ADR 0002, reference §6.2).

A tiny aiohttp app served by the TLS layer (:class:`TLSListener`) echoes the user that
:func:`match_user` finds for the connection's leaf certificate (``peer_cert_der``). Real
handshakes, real certificates. The layer accepts any client certificate: an unlisted one completes
the handshake and is nobody; the Coordinator's endpoints that need a user answer it with 401.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import ACTIVATION_MANIFEST, RunningCoordinator
from marblekeep.api.tls import ServerCredentials, make_server_credentials, match_user
from marblekeep.api.tlslayer import ALPN_HTTP11, TLSListener
from marblekeep.crypto.pki import CertifiedKey, create_root_ca
from testsupport import self_signed_cert

NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Identity:
    """A client certificate (possibly with extra chain certificates after it) and its key, on disk."""

    cert: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _write(
    tmp: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate] = (),
) -> Identity:
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain)))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Identity(cert, cert_file, key_file)


def self_signed(
    tmp: Path,
    name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    chain: Sequence[x509.Certificate] = (),
) -> Identity:
    """A self-signed user certificate, as MarbleRun's docs create them with openssl."""
    cert, key = self_signed_cert(
        name,
        not_before=not_before or NOW - dt.timedelta(days=1),
        not_after=not_after or NOW + dt.timedelta(days=365),
    )
    return _write(tmp, name, cert, key, chain)


def with_chain(tmp: Path, name: str, leaf: Identity, chain: Sequence[x509.Certificate]) -> Identity:
    """The same leaf and key, presented with extra certificates after the leaf."""
    key = serialization.load_pem_private_key(leaf.key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return _write(tmp, name, leaf.cert, key, chain)


class EchoServer:
    """An aiohttp app on a background loop, served by the TLS layer, echoing the matched user."""

    def __init__(self, credentials: ServerCredentials, users: dict[str, bytes]) -> None:
        self.credentials = credentials
        self.users = users
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._listener: TLSListener | None = None
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _handler(self, request: web.Request) -> web.Response:
        leaf = request.transport.get_extra_info("peer_cert_der") if request.transport else None
        digest = hashlib.sha256(leaf).hexdigest() if leaf is not None else None
        return web.json_response({"user": match_user(leaf, self.users), "leaf_sha256": digest})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/whoami", self._handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        assert self._runner.server is not None
        self._listener = TLSListener(lambda: self.credentials, {ALPN_HTTP11: self._runner.server})
        await self._listener.start("127.0.0.1", 0)
        self.port = self._listener.sockets[0].getsockname()[1]

    def stop(self) -> None:
        assert self._runner is not None and self._listener is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        asyncio.run_coroutine_threadsafe(self._listener.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Setup:
    tmp: Path
    root: CertifiedKey
    root_file: Path
    credentials: ServerCredentials
    alice: Identity
    bob: Identity

    def users(self, *ids: Identity) -> dict[str, bytes]:
        return {i.cert.subject.rfc4514_string().removeprefix("CN="): i.der for i in ids}


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    root = create_root_ca(["localhost"], NOW)
    root_file = tmp_path / "root.pem"
    root_file.write_bytes(root.cert_pem)
    return Setup(
        tmp=tmp_path,
        root=root,
        root_file=root_file,
        credentials=make_server_credentials(root, ["localhost"], NOW),
        alice=self_signed(tmp_path, "alice"),
        bob=self_signed(tmp_path, "bob"),
    )


@pytest.fixture
def serve(setup: Setup) -> Iterator[Any]:
    servers: list[EchoServer] = []

    def start(users: dict[str, bytes]) -> EchoServer:
        server = EchoServer(setup.credentials, users)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def whoami(
    setup: Setup,
    port: int,
    identity: Identity | None,
    *,
    server_name: str | None = "localhost",
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> str | None:
    """GET /whoami over a fresh TLS connection; raises ssl.SSLError if the handshake fails."""
    ctx = ssl.create_default_context(cafile=str(setup.root_file))
    ctx.minimum_version = ctx.maximum_version = version
    if server_name is None:
        ctx.check_hostname = False  # connect by IP without SNI; the chain is still verified
    if identity is not None:
        ctx.load_cert_chain(identity.cert_file, identity.key_file)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        # ragged EOFs raise: the server ends the connection with close_notify
        ctx.wrap_socket(raw, server_hostname=server_name, suppress_ragged_eofs=False) as tls,
    ):
        user: str | None = get_whoami(tls)["user"]
    return user


def get_whoami(tls: ssl.SSLSocket) -> dict[str, Any]:
    """GET /whoami on an open TLS connection, read to the end; the answer's JSON body (HTTP 200)."""
    tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    doc: dict[str, Any] = json.loads(body)
    return doc


@pytest.mark.parametrize("server_name", ["localhost", None], ids=["sni", "no-sni"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_listed_unlisted_and_no_certificate(
    setup: Setup, serve: Any, server_name: str | None, version: ssl.TLSVersion
) -> None:
    server = serve(setup.users(setup.alice))
    assert whoami(setup, server.port, setup.alice, server_name=server_name, version=version) == "alice"
    assert whoami(setup, server.port, None, server_name=server_name, version=version) is None
    # Accepted by the TLS layer (no chain verification), and nobody: the handler decides.
    assert whoami(setup, server.port, setup.bob, server_name=server_name, version=version) is None


def test_unlisted_certificate_completes_the_handshake_and_is_seen_by_the_handler(
    setup: Setup, serve: Any
) -> None:
    """The handshake with an unknown, self-signed client certificate succeeds on TLS 1.2 and 1.3,
    and the application sees exactly that leaf's DER (never a later chain entry)."""
    server = serve(setup.users(setup.alice))
    bob_with_alice = with_chain(setup.tmp, "bob-alice2", setup.bob, [setup.alice.cert])
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        for identity in (setup.bob, bob_with_alice):
            ctx = ssl.create_default_context(cafile=str(setup.root_file))
            ctx.minimum_version = ctx.maximum_version = version
            ctx.load_cert_chain(identity.cert_file, identity.key_file)
            with (
                socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls,
            ):
                assert tls.version() == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
                answer = get_whoami(tls)
            bob_sha256 = hashlib.sha256(setup.bob.der).hexdigest()
            assert answer == {"user": None, "leaf_sha256": bob_sha256}


def test_expired_and_not_yet_valid_listed_certificates_still_work(setup: Setup, serve: Any) -> None:
    expired = self_signed(
        setup.tmp, "expired", not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)
    )
    future = self_signed(
        setup.tmp, "future", not_before=NOW + dt.timedelta(days=30), not_after=NOW + dt.timedelta(days=60)
    )
    server = serve(setup.users(expired, future))
    assert whoami(setup, server.port, expired) == "expired"
    assert whoami(setup, server.port, future) == "future"


def test_listed_certificate_later_in_the_chain_does_not_authenticate(setup: Setup, serve: Any) -> None:
    """Bob presents his own (unlisted) leaf followed by Alice's public certificate: nobody."""
    server = serve(setup.users(setup.alice))
    bob_with_alice = with_chain(setup.tmp, "bob-alice", setup.bob, [setup.alice.cert])
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert whoami(setup, server.port, bob_with_alice, version=version) is None
    # Alice's leaf followed by some other certificate is still Alice.
    alice_with_bob = with_chain(setup.tmp, "alice-bob", setup.alice, [setup.bob.cert])
    assert whoami(setup, server.port, alice_with_bob) == "alice"


def test_leaf_issued_by_a_listed_ca_certificate_matches_no_user(setup: Setup, serve: Any) -> None:
    """If a user lists a CA certificate, leaves it issued are nobody: only the exact DER of the
    leaf identifies a user."""
    ca = trustme.CA()
    ca_der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(serialization.Encoding.DER)
    users = {"ca-user": ca_der}
    server = serve(users)
    leaf = ca.issue_cert("client@example")
    cert_file, key_file = setup.tmp / "leaf.pem", setup.tmp / "leaf.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    identity = Identity(x509.load_pem_x509_certificate(cert_file.read_bytes()), cert_file, key_file)
    assert whoami(setup, server.port, identity) is None


def test_match_user_is_exact_der_of_the_leaf_only(setup: Setup) -> None:
    users = setup.users(setup.alice)
    assert match_user(setup.alice.der, users) == "alice"
    assert match_user(None, users) is None
    assert match_user(b"", users) is None
    assert match_user(setup.bob.der, users) is None
    assert match_user(setup.alice.der + b"\x00", users) is None
    # a re-encoding of the same certificate (PEM instead of DER) is not the DER
    assert match_user(setup.alice.cert.public_bytes(serialization.Encoding.PEM), users) is None
    # the same key and subject in another certificate is another certificate
    key = serialization.load_pem_private_key(setup.alice.key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    twin = (
        x509.CertificateBuilder()
        .subject_name(setup.alice.cert.subject)
        .issuer_name(setup.alice.cert.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert match_user(twin.public_bytes(serialization.Encoding.DER), users) is None


def test_user_changes_apply_to_the_next_request_without_restart(setup: Setup, serve: Any) -> None:
    users = setup.users(setup.alice)
    server = serve(users)
    assert whoami(setup, server.port, setup.alice) == "alice"
    assert whoami(setup, server.port, setup.bob) is None

    # Bob replaces Alice: same listener, same port, nothing to rebuild in the TLS layer.
    server.users = setup.users(setup.bob)
    assert whoami(setup, server.port, setup.bob) == "bob"
    assert whoami(setup, server.port, setup.alice) is None

    # Both.
    server.users = setup.users(setup.alice, setup.bob)
    assert whoami(setup, server.port, setup.alice) == "alice"
    assert whoami(setup, server.port, setup.bob) == "bob"

    # No users at all: every client is anonymous.
    server.users = {}
    assert whoami(setup, server.port, setup.alice) is None
    assert whoami(setup, server.port, None) is None


def test_new_credentials_apply_to_new_handshakes(setup: Setup, serve: Any) -> None:
    server = serve(setup.users(setup.alice))
    other_root = create_root_ca(["localhost"], NOW)
    server.credentials = make_server_credentials(other_root, ["localhost"], NOW)
    with pytest.raises(ssl.SSLCertVerificationError):
        whoami(setup, server.port, setup.alice)  # the client pins the old root
    setup.root_file.write_bytes(other_root.cert_pem)
    assert whoami(setup, server.port, setup.alice) == "alice"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_with_user_certificate(setup: Setup, serve: Any) -> None:
    server = serve(setup.users(setup.alice))

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--noproxy", "*", "--cacert", str(setup.root_file), *args,
             f"https://localhost:{server.port}/whoami"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    ok = curl("--cert", str(setup.alice.cert_file), "--key", str(setup.alice.key_file))
    assert ok.returncode == 0 and json.loads(ok.stdout)["user"] == "alice"
    anonymous = curl()
    assert anonymous.returncode == 0 and json.loads(anonymous.stdout) == {"user": None, "leaf_sha256": None}
    stranger = curl("--cert", str(setup.bob.cert_file), "--key", str(setup.bob.key_file))
    assert stranger.returncode == 0, stranger.stderr  # the handshake completes
    assert json.loads(stranger.stdout)["user"] is None


# ------------------------------------------------------------------ the Coordinator's own listener


def test_coordinator_client_api_trusts_the_manifest_users(tmp_path: Path, setup: Setup) -> None:
    running = RunningCoordinator(tmp_path / "seal")
    try:
        users_manifest = json.loads(json.dumps(ACTIVATION_MANIFEST))
        users_manifest["Users"] = {
            "alice": {"Certificate": setup.alice.cert.public_bytes(serialization.Encoding.PEM).decode()}
        }
        raw = json.dumps(users_manifest).encode()

        def get(identity: Identity | None, path: str) -> tuple[int, dict[str, Any]]:
            ctx = running.ssl_context()
            if identity is not None:
                ctx.load_cert_chain(identity.cert_file, identity.key_file)
            with (
                socket.create_connection(("127.0.0.1", running.client_port), timeout=10) as raw_sock,
                ctx.wrap_socket(raw_sock, server_hostname="localhost", suppress_ragged_eofs=False) as tls,
            ):
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(body)

        def status(identity: Identity | None) -> int:
            code: int = get(identity, "/api/v2/status")[1]["data"]["code"]
            return code

        # Before the manifest there are no users: any client certificate is ignored.
        assert status(setup.bob) == 2
        running.set_manifest(raw)
        assert running.coord.user_certificates == {"alice": setup.alice.der}
        # Public endpoints work with any certificate or none.
        assert status(setup.alice) == 3
        assert status(None) == 3
        assert status(setup.bob) == 3
        # A user-only endpoint: no certificate and an unlisted one are MarbleRun's 401 JSend fail;
        # Alice is authenticated at once, without a restart (and then lacks the permission: 403).
        for who in (None, setup.bob):
            code, doc = get(who, "/api/v2/secrets?s=shared_key")
            assert code == 401
            assert doc["status"] == "fail"
            assert doc["message"].startswith(
                "unauthorized user: client certificate did not match any MarbleRun users"
            )
        code, doc = get(setup.alice, "/api/v2/secrets?s=shared_key")
        assert code == 403, doc
        # The Marble API does not ask for user certificates.
        with running.marble() as marble:
            assert len(marble.challenge()) == 32
        assert base64.b64decode(running.client().get("/api/v2/manifest").json()["data"]["manifest"]) == raw
    finally:
        running.stop()
