"""One TLS layer for the Coordinator's listeners (docs/adr/0002-tls-layer.md).

The layer terminates TLS itself under asyncio, with pyOpenSSL ``Connection`` objects on memory
BIOs: ciphertext from the socket goes into OpenSSL's read BIO, plaintext comes out of
``SSL_read``; plaintext from the application goes into ``SSL_write`` and ciphertext comes out of
the write BIO to the socket. Nothing else would do what the Coordinator needs:

- **any client certificate**: the server requests one and accepts any (or none) without chain
  verification; the leaf's DER is handed to the application (``peer_cert_der``). Users are
  matched in the handler (unlisted → HTTP 401), Marbles bind their quote to it (MarbleRun's gRPC
  Marble API). CPython's ``ssl`` cannot accept an unverified client certificate;
- **keys in memory only**: the listener key is given to OpenSSL as a ``cryptography`` key object
  (``SSL_CTX_use_PrivateKey`` on the key's ``EVP_PKEY``); no file is ever written;
- **ALPN dispatch**: the server offers the protocols the caller registered (``h2`` first, then
  ``http/1.1``) and starts the protocol of the negotiated one; without ALPN, ``http/1.1``;
- **TLS 1.3, and on TLS 1.2 only ECDHE with AEAD** (AES-GCM, ChaCha20-Poly1305); no CBC, no
  TLS ≤ 1.1, no renegotiation, no compression;
- **limits**: handshake timeout, request-head timeout and a cap on concurrent connections
  (api/limits.py).

After the handshake the application protocol (aiohttp's ``RequestHandler``, or a gRPC protocol)
gets a :class:`TLSTransport`: an ``asyncio.Transport`` whose ``get_extra_info`` answers
``peer_cert_der`` (leaf DER or None), ``alpn`` (str or None), ``tls_version``, ``cipher``,
``ssl_object`` (a read-only :class:`SSLObjectView` with ``selected_alpn_protocol()`` and
``getpeercert(binary_form=True)``, for libraries that ask the stdlib's way), and passes
``peername``, ``sockname``, ``socket`` through. Flow control is the socket transport's: writes are
encrypted at once and handed to it, so its buffer size and watermarks are the application's, and
its pause/resume_writing calls are forwarded.

Per-record Python work is kept small: incoming ciphertext is fed to OpenSSL as the socket
delivers it (up to 256 KiB) and decrypted in 64 KiB reads delivered to the application in one
call; outgoing ciphertext is drained from the BIO in one read sized to the plaintext written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from marblekeep.api.limits import ConnectionLimits
from marblekeep.api.tls import ServerCredentials

__all__ = [
    "ALPN_H2",
    "ALPN_HTTP11",
    "TLS12_CIPHERS",
    "CredentialsProvider",
    "ProtocolFactory",
    "TLSListener",
    "TLSTransport",
]

log = logging.getLogger("marblekeep.tls")

ALPN_H2 = "h2"
ALPN_HTTP11 = "http/1.1"
#: Server preference order of the application protocols offered in ALPN.
ALPN_PREFERENCE = (ALPN_H2, ALPN_HTTP11)

#: TLS 1.2 suites: ECDHE key exchange with AEAD only (TLS 1.3's own suites are all AEAD).
TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

READ_CHUNK = 64 * 1024
#: Bytes of TLS overhead to allow per 16 KiB record when draining the write BIO in one read.
_RECORD_OVERHEAD = 64
_MAX_RECORD = 16 * 1024
#: At most one "connection limit reached" log line per this many seconds and listener.
REFUSAL_LOG_INTERVAL = 10.0

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
CredentialsProvider = Callable[[], ServerCredentials]


def _accept_any_certificate(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """Verify callback: a client certificate is requested, never chain-verified. The handshake
    still proves possession of the leaf's key (CertificateVerify); who it is, the handler decides."""
    return True


def build_context(credentials: ServerCredentials, session_id: bytes) -> SSL.Context:
    """A server context: TLS 1.2+ with AEAD suites, client certificates requested, key in memory."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
    )
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.use_certificate(credentials.chain[0])
    for extra in credentials.chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(credentials.key)
    ctx.check_privatekey()
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any_certificate)
    # Required for session resumption when client certificates are requested (OpenSSL refuses to
    # resume a session without a session-id context); tickets are encrypted with per-context keys
    # that OpenSSL draws at random and keeps in memory.
    ctx.set_session_id(session_id)
    return ctx


class SSLObjectView:
    """The read-only part of ``ssl.SSLObject`` that libraries query on a server transport."""

    def __init__(self, peer_der: bytes | None, alpn: str | None, version: str, cipher: str | None) -> None:
        self._peer_der = peer_der
        self._alpn = alpn
        self._version = version
        self._cipher = cipher

    def selected_alpn_protocol(self) -> str | None:
        return self._alpn

    def getpeercert(self, binary_form: bool = False) -> bytes | dict[str, Any] | None:
        # Like ssl with an unverified certificate: the DER in binary form, an empty dict otherwise.
        if self._peer_der is None:
            return None
        return self._peer_der if binary_form else {}

    def version(self) -> str:
        return self._version

    def cipher(self) -> tuple[str, str, int] | None:
        return (self._cipher, self._version, 0) if self._cipher else None


class TLSTransport(asyncio.Transport):
    """The plaintext side of one TLS connection, as the application protocol sees it."""

    def __init__(self, conn: _TLSConnection, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._info = extra
        self._tls = conn
        self._protocol: asyncio.BaseProtocol | None = None

    # --- extra info: TLS facts first, then the socket transport's own (peername, sockname, socket)
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._info:
            return self._info[name]
        raw = self._tls.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    # --- writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data: expected a bytes-like object, not {type(data).__name__}")
        if data:
            self._tls.write_plaintext(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close that HTTP clients understand

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._tls.raw
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._tls.raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    # --- reading
    def is_reading(self) -> bool:
        return not self._tls.app_paused and not self._tls.closing

    def pause_reading(self) -> None:
        self._tls.pause_app_reading()

    def resume_reading(self) -> None:
        self._tls.resume_app_reading()

    # --- closing
    def is_closing(self) -> bool:
        return self._tls.closing

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    # --- the HTTP request-head deadline (api/limits.py RequestTracker)
    def request_started(self) -> None:
        self._tls.request_started()

    def request_finished(self) -> None:
        self._tls.request_finished()


class _TLSConnection(asyncio.Protocol):
    """The socket-side protocol of one connection: handshake, record layer, hand-over."""

    def __init__(self, listener: TLSListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self.raw: asyncio.Transport | None = None
        self._ssl: SSL.Connection | None = None
        self._app: asyncio.Protocol | None = None
        self._transport: TLSTransport | None = None
        self._handshaken = False
        self.closing = False
        self.app_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._head_deadline_armed = False
        self._awaiting_head = True
        self._counted = False
        self._write_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ socket side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        if not self._listener._admit(self):
            self.closing = True
            transport.abort()
            return
        self._counted = True
        self._ssl = SSL.Connection(self._listener._context(), None)
        self._ssl.set_accept_state()
        self._timer = self._loop.call_later(
            self._listener.limits.handshake_timeout, self._deadline_passed, "TLS handshake"
        )

    def data_received(self, data: bytes) -> None:
        tls = self._ssl
        if tls is None or (self.closing and not self._handshaken):
            return
        try:
            tls.bio_write(data)
        except SSL.Error:
            self.abort()
            return
        if not self._handshaken:
            self._handshake()
        else:
            self._read_records()

    def eof_received(self) -> bool:
        # The peer closed its side without close_notify (or after it): tell the application, then
        # close, as a plain TCP transport does for aiohttp.
        if self._app is not None and not self.closing:
            self._app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_write_timer()
        self.closing = True
        if self._counted:
            self._counted = False
            self._listener._release(self)
        app, self._app = self._app, None
        self._ssl = None
        if app is not None:
            app.connection_lost(exc)
        self.raw = None

    def pause_writing(self) -> None:
        # The peer does not read what we send. If that lasts for the idle timeout, drop it: a
        # client must not hold a connection (and a handler) by not reading its responses.
        if self._write_timer is None and not self.closing:
            self._write_timer = self._loop.call_later(
                self._listener.limits.idle_timeout, self._write_stalled, "the peer stopped reading"
            )
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        if self._app is not None:
            self._app.resume_writing()

    # ------------------------------------------------------------------ handshake
    def _handshake(self) -> None:
        tls = self._ssl
        assert tls is not None
        try:
            tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            # Send OpenSSL's alert (protocol version, handshake failure, ...) before closing.
            self._flush()
            log.debug(
                "TLS handshake failed",
                extra={"listener": self._listener.name, "peer": self._peer(), "error": _ssl_reason(exc)},
            )
            self._close_raw()
            return
        self._flush()  # Finished, session tickets
        self._cancel_timer()
        self._handshaken = True
        self._start_application(tls)
        if self._app is not None and not self.closing:
            self._read_records()  # application data that came with the client's last flight

    def _start_application(self, tls: SSL.Connection) -> None:
        alpn_raw = tls.get_alpn_proto_negotiated()
        alpn = alpn_raw.decode("ascii", "replace") if alpn_raw else None
        factory = self._listener._factory_for(alpn)
        if factory is None:  # only possible if a protocol was unregistered mid-handshake
            self._close_raw()
            return
        peer = tls.get_peer_certificate(as_cryptography=True)
        peer_der = peer.public_bytes(Encoding.DER) if peer is not None else None
        cipher = tls.get_cipher_name()
        version = tls.get_protocol_version_name()
        extra = {
            "peer_cert_der": peer_der,
            "alpn": alpn,
            "tls_version": version,
            "cipher": cipher,
            # For libraries that ask the stdlib's way (ALPN, peer certificate in DER).
            "ssl_object": SSLObjectView(peer_der, alpn, version, cipher),
            # aiohttp reports request.secure / scheme "https" when this is truthy.
            "sslcontext": self._listener,
        }
        self._head_deadline_armed = alpn != ALPN_H2
        protocol = factory()
        assert isinstance(protocol, asyncio.Protocol)
        self._transport = TLSTransport(self, extra)
        self._transport.set_protocol(protocol)
        self._app = protocol
        protocol.connection_made(self._transport)

    # ------------------------------------------------------------------ records
    def _read_records(self) -> None:
        tls = self._ssl
        assert tls is not None
        chunks: list[bytes] = []
        eof = False
        failed: SSL.Error | None = None
        while True:
            try:
                chunks.append(tls.recv(READ_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # close_notify from the peer
                eof = True
                break
            except SSL.Error as exc:
                failed = exc
                break
        self._flush()  # alerts, key updates
        if chunks and self._app is not None and not self.closing:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._awaiting_head and self._head_deadline_armed and self._timer is None:
                self._timer = self._loop.call_later(
                    self._listener.limits.header_timeout, self._deadline_passed, "request head"
                )
            self._app.data_received(data)
        if failed is not None:
            log.debug(
                "TLS record error",
                extra={"listener": self._listener.name, "peer": self._peer(), "error": _ssl_reason(failed)},
            )
            self._close_raw()  # after the alert flushed above has been written
        elif eof and self._app is not None and not self.closing:
            keep_open = self._app.eof_received()
            if not keep_open:
                self.close()

    def write_plaintext(self, data: bytes | bytearray | memoryview) -> None:
        tls = self._ssl
        if tls is None or self.closing:
            return
        view = memoryview(data)
        try:
            while view:
                sent = tls.send(view)
                view = view[sent:]
        except SSL.Error as exc:
            log.debug(
                "TLS write failed",
                extra={"listener": self._listener.name, "peer": self._peer(), "error": _ssl_reason(exc)},
            )
            self.abort()
            return
        size = len(data)
        self._flush(size + (size // _MAX_RECORD + 1) * _RECORD_OVERHEAD)

    def _flush(self, hint: int = READ_CHUNK) -> None:
        """Move all ciphertext waiting in the write BIO to the socket."""
        tls, raw = self._ssl, self.raw
        if tls is None or raw is None:
            return
        size = max(hint, READ_CHUNK)
        while True:
            try:
                out = tls.bio_read(size)
            except SSL.WantReadError:
                return
            except SSL.Error:
                return
            raw.write(out)
            if len(out) < size:
                return

    # ------------------------------------------------------------------ application controls
    def pause_app_reading(self) -> None:
        if not self.app_paused:
            self.app_paused = True
            if self.raw is not None and not self.closing:
                self.raw.pause_reading()

    def resume_app_reading(self) -> None:
        if self.app_paused:
            self.app_paused = False
            if self.raw is not None and not self.closing:
                self.raw.resume_reading()

    def request_started(self) -> None:
        self._awaiting_head = False
        if self._handshaken:
            self._cancel_timer()

    def request_finished(self) -> None:
        self._awaiting_head = True

    def close(self) -> None:
        """Orderly close: close_notify, then the socket once its buffer is written."""
        if self.closing:
            return
        self.closing = True
        self._cancel_timer()
        tls = self._ssl
        if tls is not None and self._handshaken:
            with contextlib.suppress(SSL.Error):
                tls.shutdown()
            self._flush()
        self._close_raw()

    def abort(self) -> None:
        self.closing = True
        self._cancel_timer()
        if self.raw is not None:
            self.raw.abort()

    def _close_raw(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.close()
            # close() waits until the socket's buffer is written; a peer that never reads would
            # keep the connection (and its slot) forever.
            if self._write_timer is None and self.raw is not None and self.raw.get_write_buffer_size():
                self._write_timer = self._loop.call_later(
                    self._listener.limits.idle_timeout, self._write_stalled, "the peer stopped reading"
                )

    def _write_stalled(self, why: str) -> None:
        self._write_timer = None
        log.debug(
            f"{why}: dropping the connection",
            extra={"listener": self._listener.name, "peer": self._peer()},
        )
        self.abort()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # ------------------------------------------------------------------ timers
    def _deadline_passed(self, what: str) -> None:
        self._timer = None
        if self.closing:
            return
        log.debug(
            f"{what} not complete in time: closing the connection",
            extra={"listener": self._listener.name, "peer": self._peer()},
        )
        if self._app is not None:
            self.close()
        else:
            self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer(self) -> str:
        peer = self.raw.get_extra_info("peername") if self.raw is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer)


def _ssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings only (never data): e.g. 'unsupported protocol'."""
    try:
        reasons = [str(err[2]) for err in exc.args[0] if isinstance(err, tuple) and len(err) == 3]
    except (IndexError, TypeError):
        reasons = []
    return ", ".join(reasons) or type(exc).__name__


class TLSListener:
    """A TCP listener that terminates TLS and hands plaintext to a protocol chosen by ALPN.

    ``credentials`` is called for every new connection; when it returns another object than
    before (the root changed), a new OpenSSL context is built from it. ``protocols`` maps ALPN
    names (``h2``, ``http/1.1``) to protocol factories such as aiohttp's ``web.Server``; a client
    without ALPN gets ``http/1.1``. Only registered protocols are offered.
    """

    def __init__(
        self,
        credentials: CredentialsProvider,
        protocols: Mapping[str, ProtocolFactory],
        *,
        limits: ConnectionLimits | None = None,
        name: str = "listener",
    ) -> None:
        self._credentials = credentials
        self._protocols: dict[str, ProtocolFactory] = {}
        for alpn, factory in protocols.items():
            self.set_protocol(alpn, factory)
        if not self._protocols:
            raise ValueError("TLSListener: register at least one protocol")
        self.limits = limits or ConnectionLimits()
        self.name = name
        self._session_id = ("marblekeep " + name).encode()[:32]
        self._ctx: SSL.Context | None = None
        self._ctx_credentials: ServerCredentials | None = None
        self._connections: set[_TLSConnection] = set()
        self._server: asyncio.Server | None = None
        self._refused = 0
        self._last_refusal_log = float("-inf")

    # ------------------------------------------------------------------ protocols (ALPN)
    def set_protocol(self, alpn: str, factory: ProtocolFactory | None) -> None:
        """Register (or with None remove) the protocol for an ALPN name; applies to new handshakes."""
        if alpn not in ALPN_PREFERENCE:
            supported = ", ".join(ALPN_PREFERENCE)
            raise ValueError(f"ALPN protocol {alpn!r} is not supported: use one of {supported}")
        if factory is None:
            self._protocols.pop(alpn, None)
        else:
            self._protocols[alpn] = factory

    @property
    def offered_protocols(self) -> tuple[str, ...]:
        return tuple(p for p in ALPN_PREFERENCE if p in self._protocols)

    def _factory_for(self, alpn: str | None) -> ProtocolFactory | None:
        return self._protocols.get(alpn or ALPN_HTTP11)

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> bytes | Any:
        for name in self.offered_protocols:
            encoded = name.encode()
            if encoded in offered:
                return encoded
        # No common protocol: continue without ALPN (http/1.1), as before this layer existed.
        return SSL.NO_OVERLAPPING_PROTOCOLS

    # ------------------------------------------------------------------ contexts
    def _context(self) -> SSL.Context:
        credentials = self._credentials()
        if self._ctx is None or credentials is not self._ctx_credentials:
            ctx = build_context(credentials, self._session_id)
            ctx.set_alpn_select_callback(self._select_alpn)
            self._ctx, self._ctx_credentials = ctx, credentials
        return self._ctx

    # ------------------------------------------------------------------ connection cap
    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _admit(self, conn: _TLSConnection) -> bool:
        if len(self._connections) < self.limits.max_connections:
            self._connections.add(conn)
            return True
        self._refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            log.warning(
                f"{self.name}: connection limit reached ({self.limits.max_connections} open connections): "
                f"refusing new connections ({self._refused} refused since the last report); raise "
                "--max-connections if this is expected load",
                extra={"listener": self.name, "max_connections": self.limits.max_connections},
            )
            self._last_refusal_log = now
            self._refused = 0
        return False

    def _release(self, conn: _TLSConnection) -> None:
        self._connections.discard(conn)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (raises OSError when the address is taken)."""
        self._context()  # fail now, not at the first client, if the credentials do not load
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _TLSConnection(self),
            host,
            port,
            reuse_address=True,
            backlog=min(socket.SOMAXCONN, 1024),
        )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting and abort the connections that are left (after a graceful shutdown)."""
        self.stop_accepting()
        for conn in list(self._connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
