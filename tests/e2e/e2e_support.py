"""Helpers for the end-to-end tests: free ports, the ``marblekeep`` executable, an in-process
Coordinator on loopback, and small aiohttp stub servers (v1-only Coordinator, impostors) that run
in a background event loop so that blocking clients (CliRunner, httpx) can talk to them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from marblekeep.api.server import Listeners
from marblekeep.api.tls import ServerCredentials, make_server_credentials
from marblekeep.crypto.pki import CertifiedKey, IssuedLeaf, LeafIssuer, create_intermediate, create_root_ca
from marblekeep.service import Coordinator, CoordinatorConfig
from testsupport import stop_gracefully

T = TypeVar("T")

STATUS_2 = "Coordinator is ready to accept a manifest."
STATUS_3 = "Coordinator is running correctly and ready to accept marbles."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def marblekeep_argv() -> list[str]:
    """How to run the installed ``marblekeep`` command of this virtualenv."""
    beside = Path(sys.executable).with_name("marblekeep")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("marblekeep")
    assert found, "the marblekeep console script is not installed (pip install -e .)"
    return [found]


def python3() -> str:
    return shutil.which("python3") or sys.executable


class CoordinatorSubprocess:
    """``marblekeep coordinator --simulation`` as a subprocess; its output goes to ``log``.

    With ``wait`` the constructor returns once the Coordinator logged "coordinator started".
    """

    def __init__(
        self,
        *,
        workdir: Path,
        env: dict[str, str],
        client_addr: str,
        mesh_addr: str,
        seal_dir: Path,
        log: Path,
        extra: Sequence[str] = (),
        wait: bool = True,
    ) -> None:
        self.log = log
        self._out = log.open("wb")
        argv = [*marblekeep_argv(), "coordinator", "--simulation", "--client-addr", client_addr]
        argv += ["--mesh-addr", mesh_addr, "--seal-dir", str(seal_dir), *extra]
        self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_started()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "coordinator started" not in self.output:
            if self.proc.poll() is not None:
                raise AssertionError(f"the Coordinator exited ({self.proc.returncode}):\n{self.output}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the Coordinator did not start:\n{self.output}")
            time.sleep(0.02)

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._out.close()
        return code

    def stop(self, timeout: float = 20) -> int:
        code = stop_gracefully(self.proc, timeout)
        self._out.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._out.close()


def run_marblekeep(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``marblekeep`` console script as a subprocess (what an operator runs)."""
    return subprocess.run(
        [*marblekeep_argv(), *args],
        check=False,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_marble_subprocess(
    workdir: Path,
    env: dict[str, str],
    *,
    mesh_addr: str,
    marble_type: str,
    uuid_file: Path,
    program: str,
    activation_timeout: float,
) -> subprocess.CompletedProcess[str]:
    """``marblekeep marble run -- python3 -c PROGRAM`` as a Marble of ``marble_type``."""
    marble_env = dict(
        env,
        EDG_MARBLE_TYPE=marble_type,
        EDG_MARBLE_COORDINATOR_ADDR=mesh_addr,
        EDG_MARBLE_UUID_FILE=str(uuid_file),
        EDG_MARBLE_DNS_NAMES="localhost",
        MARBLEKEEP_ACTIVATION_TIMEOUT=f"{activation_timeout:g}",
    )
    return subprocess.run(
        [*marblekeep_argv(), "marble", "run", "--", python3(), "-c", program],
        check=False,
        cwd=workdir,
        env=marble_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class BackgroundLoop:
    """An asyncio loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class InProcessCoordinator:
    """A simulation Coordinator with real HTTPS listeners on loopback, in a background loop."""

    def __init__(self, seal_dir: Path) -> None:
        self.bg = BackgroundLoop()
        self.client_port = free_port()
        self.config = CoordinatorConfig(
            client_addr=f"127.0.0.1:{self.client_port}",
            mesh_addr=f"127.0.0.1:{free_port()}",
            seal_dir=seal_dir,
            simulation=True,
        )
        self.coord: Coordinator = self.bg.run(Coordinator.open(self.config))
        self.listeners = Listeners(self.coord, self.config)
        self.bg.run(self.listeners.start())

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def root_pem(self) -> bytes:
        return self.coord.deployment.ca.root.cert_pem

    @property
    def intermediate_pem(self) -> bytes:
        return self.coord.deployment.ca.intermediate.cert_pem

    def stop(self) -> None:
        self.bg.run(self.listeners.stop())
        self.bg.run(self.coord.close())
        self.bg.close()


@dataclass(frozen=True)
class StubPki:
    """A Coordinator-like PKI for stub servers: root → intermediate (key K) → a Marble leaf."""

    root: CertifiedKey
    intermediate: CertifiedKey
    marble_root: CertifiedKey
    listener: ServerCredentials
    marble_leaf: IssuedLeaf

    @property
    def chain_pem(self) -> str:
        return (self.intermediate.cert_pem + self.root.cert_pem).decode()

    @classmethod
    def create(cls) -> StubPki:
        now = dt.datetime.now(dt.UTC)
        root = create_root_ca(["localhost"], now)
        intermediate, marble_root = create_intermediate(root, ["localhost"], now)
        leaf = LeafIssuer(marble_root).issue(uuid.uuid4(), "impostor", ["localhost"], now)
        return cls(root, intermediate, marble_root, make_server_credentials(root, ["localhost"], now), leaf)

    def impostor_credentials(self) -> ServerCredentials:
        """A Marble's own TLS credentials plus the intermediate: a chain that reaches the root."""
        key = serialization.load_pem_private_key(self.marble_leaf.key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        leaf = x509.load_pem_x509_certificate(self.marble_leaf.cert_pem)
        return ServerCredentials((leaf, self.intermediate.cert), key)


def load_stdlib_credentials(ctx: ssl.SSLContext, credentials: ServerCredentials) -> None:
    """Test stubs only: CPython's ssl loads keys from files, so write them to a private temporary
    directory (the Coordinator itself never does this: docs/adr/0002-tls-layer.md)."""
    with tempfile.TemporaryDirectory(prefix="marblekeep-stub-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(credentials.chain_pem)
        key_path.write_bytes(
            credentials.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx.load_cert_chain(cert_path, key_path)


class StubServer:
    """An aiohttp HTTPS server on loopback with the given routes and TLS credentials."""

    def __init__(
        self,
        app: web.Application,
        credentials: ServerCredentials,
        configure: Callable[[ssl.SSLContext], None] | None = None,
    ) -> None:
        self.bg = BackgroundLoop()
        self.port = free_port()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_stdlib_credentials(ctx, credentials)
        if configure is not None:
            configure(ctx)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.bg.run(self.runner.setup())
        self.bg.run(web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=ctx).start())

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.bg.run(self.runner.cleanup())
        self.bg.close()


def jsend(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps({"status": "success", "data": data}).encode() + b"\n",
        status=status,
        content_type="application/json",
    )


def jsend_error(message: str, status: int) -> web.Response:
    doc: dict[str, Any] = {"status": "error" if status >= 500 or status == 405 else "fail", "data": None}
    if message:
        doc["message"] = message
    return web.Response(body=json.dumps(doc).encode() + b"\n", status=status, content_type="text/plain")
