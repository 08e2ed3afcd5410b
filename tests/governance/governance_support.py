"""Helpers for the governance tests: users with real certificates, a manifest with roles, a pure
deployment, an in-process Coordinator with HTTPS listeners (in a background loop, so blocking
clients and the CLI can talk to it), a fake SGX verifier, and in-process Marble activations.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import threading
import uuid as uuid_mod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.api.server import Listeners
from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.core.deployment import Deployment, new_deployment, set_manifest
from marblekeep.core.governance import log_initial_manifest
from marblekeep.manifest import load_manifest
from marblekeep.marble.protocol import (
    ActivationRequest,
    EvidenceType,
    MarbleParameters,
    encode_activation_request,
    expected_report_data,
    open_parameters,
)
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import SimulationKeyFileProvider
from testsupport import self_signed_user_cert

T = TypeVar("T")

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
SIGNER = "ab" * 32
PRODUCT_ID = 7
UPDATERS = ("alice", "bob", "carol")


@dataclass(frozen=True)
class User:
    name: str
    cert_pem: bytes
    key_pem: bytes
    cert_der: bytes

    def files(self, directory: Path) -> tuple[Path, Path]:
        tag = hashlib.sha256(self.cert_der).hexdigest()[:12]  # two users may share a name
        cert, key = directory / f"{self.name}-{tag}.crt", directory / f"{self.name}-{tag}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


def make_user(name: str) -> User:
    cert_pem, key = self_signed_user_cert(
        name, now=NOW, valid_before=dt.timedelta(days=1), valid_for=dt.timedelta(days=3650)
    )
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return User(
        name=name,
        cert_pem=cert_pem.encode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
    )


_USERS: dict[str, User] = {}


def user(name: str) -> User:
    """A cached user (key generation once per test session)."""
    if name not in _USERS:
        _USERS[name] = make_user(name)
    return _USERS[name]


ROLES: dict[str, list[str]] = {
    # alice may do everything; bob and carol may update the manifest (bob also reads secrets);
    # dave is listed but holds no role.
    "alice": ["updater", "svn", "secret_reader", "secret_writer"],
    "bob": ["updater", "secret_reader"],
    "carol": ["updater"],
    "dave": [],
}


def manifest_doc(*, threshold: int = 0, rotate: bool = False, users: tuple[str, ...] = ()) -> dict[str, Any]:
    names = users or tuple(ROLES)
    return {
        "Packages": {"pkg": {"SignerID": SIGNER, "ProductID": PRODUCT_ID, "SecurityVersion": 2}},
        "Marbles": {
            "backend": {
                "Package": "pkg",
                "Parameters": {
                    "Files": {
                        "/data/shared.key": "{{ hex .Secrets.shared_key }}",
                        "/data/previous.key": "{{ hex .Previous.Secrets.shared_key }}",
                        "/data/cert.pem": "{{ pem .Secrets.shared_cert.Cert }}",
                    },
                    "Env": {"PER_KEY": "{{ hex .Secrets.per_key }}"},
                },
            },
            "frontend": {
                "Package": "pkg",
                "Parameters": {
                    "Env": {
                        "USER_KEY": "{{ hex .Secrets.user_key }}",
                        "PLAIN": "{{ string .Secrets.user_plain }}",
                    }
                },
            },
        },
        "Secrets": {
            "shared_key": {"Type": "symmetric-key", "Size": 128, "Shared": True},
            "per_key": {"Type": "symmetric-key", "Size": 256},
            "shared_cert": {"Type": "cert-ecdsa", "Size": 256, "Shared": True},
            "removable": {"Type": "symmetric-key", "Size": 128, "Shared": True},
            "user_key": {"Type": "symmetric-key", "Size": 128, "UserDefined": True},
            "user_plain": {"Type": "plain", "UserDefined": True},
            "user_cert": {"Type": "cert-ecdsa", "UserDefined": True},
        },
        "Users": {n: {"Certificate": user(n).cert_pem.decode(), "Roles": ROLES[n]} for n in names},
        "Roles": {
            "updater": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
            "svn": {
                "ResourceType": "Packages",
                "ResourceNames": ["pkg"],
                "Actions": ["updatesecurityversion"],
            },
            "secret_reader": {
                "ResourceType": "Secrets",
                "ResourceNames": ["user_key", "user_plain", "user_cert", "shared_key"],
                "Actions": ["ReadSecret"],
            },
            "secret_writer": {
                "ResourceType": "Secrets",
                "ResourceNames": ["user_key", "user_plain", "user_cert"],
                "Actions": ["WRITESECRET"],
            },
        },
        "Config": {"UpdateThreshold": threshold, "RotateRootSecret": rotate},
    }


def manifest_bytes(doc: dict[str, Any] | None = None, **kwargs: Any) -> bytes:
    return json.dumps(doc if doc is not None else manifest_doc(**kwargs), indent=2).encode()


def changed(doc: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` (default: :func:`manifest_doc`) to edit for an update."""
    return copy.deepcopy(doc if doc is not None else manifest_doc(**kwargs))


def deployed(raw: bytes | None = None) -> Deployment:
    """A pure deployment in state 3 with the test manifest (and its first log entry)."""
    dep = new_deployment(["localhost", "10.0.0.7"], NOW)
    manifest = load_manifest(raw or manifest_bytes())
    return log_initial_manifest(set_manifest(dep, manifest, NOW), NOW)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeSgxVerifier:
    """Evidence = 64 bytes of report data + one byte ISVSVN; the rest of the claims are the
    package's (SignerID, ProductID), so only the SVN decides."""

    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims:
        return TeeClaims(
            kind=TeeKind.SGX,
            report_data=evidence[:64],
            tcb_status="UpToDate",
            mrenclave="cd" * 32,
            mrsigner=SIGNER,
            isv_prod_id=PRODUCT_ID,
            isv_svn=evidence[64],
        )


async def activate(
    coord: Coordinator, marble_type: str, *, svn: int | None = None, marble_uuid: uuid_mod.UUID | None = None
) -> MarbleParameters:
    """Activate one Marble in process: simulation evidence, or (``svn`` given) fake SGX evidence."""
    key = X25519PrivateKey.generate()
    req = ActivationRequest(
        marble_type=marble_type,
        uuid=marble_uuid or uuid_mod.uuid4(),
        dns_names=("localhost",),
        hpke_public_key=key.public_key().public_bytes_raw(),
        nonce=coord.challenge(),
        evidence_type=EvidenceType.SIMULATION if svn is None else EvidenceType.SGX_DCAP,
        evidence=b"",
    )
    report = expected_report_data(req)
    evidence = report if svn is None else report + bytes([svn])
    req = ActivationRequest(**{**req.__dict__, "evidence": evidence})
    outcome = await coord.activate(encode_activation_request(req))
    return open_parameters(outcome.sealed, key, req)


class RunningCoordinator:
    """A Coordinator with real HTTPS listeners, run in an event loop on a background thread.

    ``simulation=False`` uses the fake SGX verifier and a file KEK (so SVNs are enforced)."""

    def __init__(self, seal_dir: Path, *, simulation: bool = True) -> None:
        self.seal_dir = seal_dir
        self.simulation = simulation
        self.client_port = free_port()
        self.marble_port = free_port()
        self.config = CoordinatorConfig(
            client_addr=f"127.0.0.1:{self.client_port}",
            mesh_addr=f"127.0.0.1:{self.marble_port}",
            seal_dir=seal_dir,
            simulation=simulation,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._start()

    def _start(self) -> None:
        kek = None if self.simulation else SimulationKeyFileProvider(self.seal_dir / "test-kek.key")
        verifier = None if self.simulation else FakeSgxVerifier()
        self.coord: Coordinator = self.run(
            Coordinator.open(self.config, kek_provider=kek, verifier=verifier)  # type: ignore[arg-type]
        )
        self.listeners = Listeners(self.coord, self.config)
        self.run(self.listeners.start())
        self.root_pem_path = self.seal_dir / "test-root.pem"
        self.root_pem_path.write_bytes(self.coord.deployment.ca.root.cert_pem)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    @property
    def addr(self) -> str:
        return f"localhost:{self.client_port}"

    def ssl_context(self, who: User | None = None, *, chain: tuple[User, ...] = ()) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root_pem_path))
        if who is not None:
            directory = self.seal_dir / "users"
            directory.mkdir(exist_ok=True)
            cert, key = who.files(directory)
            if chain:  # send more certificates after the leaf
                cert = directory / f"{who.name}-chain-{'-'.join(u.name for u in chain)}.crt"
                cert.write_bytes(who.cert_pem + b"".join(u.cert_pem for u in chain))
            ctx.load_cert_chain(cert, key)
        return ctx

    def client(self, who: User | None = None, *, chain: tuple[User, ...] = ()) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://localhost:{self.client_port}",
            verify=self.ssl_context(who, chain=chain),
            trust_env=False,
            timeout=30,
        )

    def set_manifest(self, raw: bytes | None = None) -> None:
        with self.client() as c:
            r = c.post("/api/v2/manifest", json={"manifest": b64(raw or manifest_bytes())})
        assert r.status_code == 200, r.text

    def restart(self, while_stopped: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Stop and reopen on the same seal directory (new ports); ``while_stopped`` runs between."""
        self.run(self.listeners.stop())
        self.run(self.coord.close())
        if while_stopped is not None:
            self.run(while_stopped())
        self.client_port, self.marble_port = free_port(), free_port()
        self.config = CoordinatorConfig(
            client_addr=f"127.0.0.1:{self.client_port}",
            mesh_addr=f"127.0.0.1:{self.marble_port}",
            seal_dir=self.seal_dir,
            simulation=self.simulation,
        )
        self._start()

    def stop(self) -> None:
        self.run(self.listeners.stop())
        self.run(self.coord.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def env_home(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI runs: the pinned root goes under ``tmp_path`` (never the real home)."""
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
