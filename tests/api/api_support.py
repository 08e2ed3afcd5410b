"""Helpers for the API tests: an in-process Coordinator with real HTTPS listeners on loopback,
run in a background event loop so that tests can use blocking clients and real subprocesses
(``curl``, ``openssl``), and a Marble-side client that speaks the activation protocol field by
field (so that attack tests can alter any field after the evidence was computed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid as uuid_mod
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.api.limits import ConnectionLimits
from marblekeep.api.server import Listeners
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    ActivationRequest,
    EvidenceType,
    MarbleParameters,
    encode_activation_request,
    expected_report_data,
    open_parameters,
    parse_challenge_response,
)
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import KeyEncryptionKeyProvider
from testsupport import stop_gracefully

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]

STATUS_2 = "Coordinator is ready to accept a manifest."
STATUS_3 = "Coordinator is running correctly and ready to accept marbles."

#: A manifest with a virtual seal key, a shared and a per-Marble symmetric key, a certificate
#: secret and a Marble type that may be activated only once. Simulation skips the measurements.
MANIFEST: dict[str, Any] = {
    "Packages": {
        "pkg": {
            "UniqueID": "c2720445a45267813688ff73fa188aa060c1b661aefaf1650d42f690697b5ab3",
            "Debug": False,
        }
    },
    "Marbles": {
        "backend": {
            "Package": "pkg",
            "Parameters": {
                "Env": {
                    "SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
                    "SHARED_KEY": "{{ hex .Secrets.shared_key }}",
                    "PER_KEY": "{{ hex .Secrets.per_key }}",
                },
                "Files": {
                    "/srv/backend/cert.pem": "{{ pem .Secrets.tls_cert.Cert }}",
                    "/srv/backend/key.pem": "{{ pem .Secrets.tls_cert.Private }}",
                },
            },
        },
        "once": {
            "Package": "pkg",
            "MaxActivations": 1,
            "Parameters": {"Env": {"ONCE_KEY": "{{ base64 .Secrets.per_key }}"}},
        },
        "twice": {"Package": "pkg", "MaxActivations": 2},
    },
    "Secrets": {
        "shared_key": {"Type": "symmetric-key", "Size": 128, "Shared": True},
        "per_key": {"Type": "symmetric-key", "Size": 256},
        "tls_cert": {"Type": "cert-ecdsa", "Size": 256, "Shared": True},
    },
}


def manifest_bytes() -> bytes:
    return json.dumps(MANIFEST, indent=2).encode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def last_pem(chain: str) -> str:
    """The last PEM block of a chain (the quote endpoint's ``cert`` ends with the root)."""
    marker = "-----BEGIN CERTIFICATE-----"
    return marker + chain.rsplit(marker, 1)[1]


class RunningCoordinator:
    """A Coordinator and its listeners, running in an event loop on a background thread."""

    def __init__(
        self,
        seal_dir: Path,
        *,
        simulation: bool = True,
        kek_provider: KeyEncryptionKeyProvider | None = None,
        prometheus: bool = False,
        max_manifest_bytes: int | None = None,
        connection_limits: ConnectionLimits | None = None,
    ) -> None:
        self.client_port = free_port()
        self.marble_port = free_port()
        self.metrics_port = free_port() if prometheus else 0
        extra: dict[str, Any] = {}
        if max_manifest_bytes is not None:
            extra["max_manifest_bytes"] = max_manifest_bytes
        if connection_limits is not None:
            extra["connection_limits"] = connection_limits
        self.config = CoordinatorConfig(
            client_addr=f"127.0.0.1:{self.client_port}",
            mesh_addr=f"127.0.0.1:{self.marble_port}",
            prometheus_addr=f"127.0.0.1:{self.metrics_port}" if prometheus else "",
            seal_dir=seal_dir,
            simulation=simulation,
            **extra,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.coord: Coordinator = self.run(Coordinator.open(self.config, kek_provider=kek_provider))
        self.listeners = Listeners(self.coord, self.config)
        self.run(self.listeners.start())
        self.root_pem_path = seal_dir / "test-root.pem"
        self.root_pem_path.write_bytes(self.coord.deployment.ca.root.cert_pem)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    @property
    def client_url(self) -> str:
        return f"https://localhost:{self.client_port}"

    @property
    def marble_url(self) -> str:
        return f"https://localhost:{self.marble_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root_pem_path))

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.client_url, verify=self.ssl_context(), trust_env=False, timeout=30)

    def marble(self) -> MarbleClient:
        return MarbleClient(
            httpx.Client(base_url=self.marble_url, verify=self.ssl_context(), trust_env=False, timeout=30)
        )

    def set_manifest(self, raw: bytes | None = None) -> None:
        body = {"manifest": base64.b64encode(raw or manifest_bytes()).decode()}
        with self.client() as c:
            r = c.post("/api/v2/manifest", json=body)
        assert r.status_code == 200, r.text

    def stop(self) -> None:
        self.run(self.listeners.stop())
        self.run(self.coord.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@dataclass(frozen=True)
class Prepared:
    """An activation request with simulation evidence over its binding, and its private key."""

    request: ActivationRequest
    key: X25519PrivateKey

    def body(self) -> bytes:
        return encode_activation_request(self.request)

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body())
        return doc


class MarbleClient:
    """A Marble speaking the activation protocol step by step."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def __enter__(self) -> MarbleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def challenge(self) -> bytes:
        r = self.http.post(CHALLENGE_PATH, content=b"{}")
        assert r.status_code == 200, r.text
        return parse_challenge_response(r.content)

    def prepare(
        self,
        marble_type: str = "backend",
        marble_uuid: uuid_mod.UUID | None = None,
        dns_names: tuple[str, ...] = ("localhost",),
    ) -> Prepared:
        key = X25519PrivateKey.generate()
        req = ActivationRequest(
            marble_type=marble_type,
            uuid=marble_uuid or uuid_mod.uuid4(),
            dns_names=dns_names,
            hpke_public_key=key.public_key().public_bytes_raw(),
            nonce=self.challenge(),
            evidence_type=EvidenceType.SIMULATION,
            evidence=b"",
        )
        return Prepared(replace(req, evidence=expected_report_data(req)), key)

    def post(self, body: bytes | str) -> httpx.Response:
        return self.http.post(ACTIVATE_PATH, content=body, headers={"Content-Type": "application/json"})

    def open(self, prepared: Prepared, response: httpx.Response) -> MarbleParameters:
        assert response.status_code == 200, response.text
        sealed = base64.b64decode(response.json()["data"]["sealedParameters"])
        return open_parameters(sealed, prepared.key, prepared.request)

    def activate(
        self, marble_type: str = "backend", marble_uuid: uuid_mod.UUID | None = None
    ) -> MarbleParameters:
        prepared = self.prepare(marble_type, marble_uuid)
        return self.open(prepared, self.post(prepared.body()))


# ------------------------------------------------------------------------- subprocess Coordinator


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from marblekeep.cli.main import main; sys.exit(main())", *args]


class CoordinatorProcess:
    """``marblekeep coordinator --simulation`` as a subprocess; stderr collected to a file."""

    def __init__(self, seal_dir: Path, *extra: str) -> None:
        self.client_port = free_port()
        self.marble_port = free_port()
        self.seal_dir = seal_dir
        self.stderr_path = seal_dir.parent / f"{seal_dir.name}-stderr.log"
        self._stderr = self.stderr_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDG_", "MARBLEKEEP_"))}
        self.proc = subprocess.Popen(
            cli_command(
                "coordinator",
                "--simulation",
                "--client-addr",
                f"127.0.0.1:{self.client_port}",
                "--mesh-addr",
                f"127.0.0.1:{self.marble_port}",
                "--seal-dir",
                str(seal_dir),
                *extra,
            ),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
        )
        self._wait_started()

    def _wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited early: {self.stderr()}")
            if b"coordinator started" in self.stderr_path.read_bytes():
                return
            time.sleep(0.05)
        raise AssertionError(f"coordinator did not start in time: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def root_pem(self) -> bytes:
        with httpx.Client(verify=False, trust_env=False, timeout=30) as c:
            r = c.get(f"https://127.0.0.1:{self.client_port}/api/v2/quote")
        return last_pem(r.json()["data"]["cert"]).encode()

    def stop(self) -> int:
        code = stop_gracefully(self.proc)
        self._stderr.close()
        return code


def iter_pems(text: str) -> Iterator[str]:
    marker = "-----BEGIN CERTIFICATE-----"
    for part in text.split(marker)[1:]:
        yield marker + part
