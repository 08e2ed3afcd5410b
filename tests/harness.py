"""The one test harness for a running Coordinator (import as ``from harness import ...``).

Used by the API, governance and end-to-end tests:

- :class:`RunningCoordinator` — a Coordinator with its real HTTPS listeners on loopback, run in an
  event loop on a background thread, so that tests can use blocking clients (httpx, CliRunner) and
  real subprocesses (``curl``, ``openssl``). Options: simulation or not (with a file KEK and an
  optional fake verifier such as :class:`FakeSgxVerifier`), a metrics listener, a manifest size limit,
  the host name used in :attr:`~RunningCoordinator.addr`, clients with a user's TLS certificate
  (and extra chain certificates), and a restart on the same seal directory.
- :class:`MarbleClient` — a Marble that speaks the activation protocol field by field (attack
  tests alter any field after the evidence was computed); :func:`activate` activates in process.
- Users with real certificates and the governance test manifest (roles, user-defined secrets), and
  the activation test manifest (seal key, shared/per-Marble keys, a certificate, MaxActivations).
- :class:`CoordinatorSubprocess` / :class:`CoordinatorProcess` — ``marblekeep coordinator
  --simulation`` as a real subprocess; :func:`run_marblekeep`, :func:`run_marble_subprocess`.
- :class:`StubServer`, :class:`StubPki`, :func:`jsend`, :func:`jsend_error` — small aiohttp HTTPS
  servers that play a v1-only Coordinator or an impostor.

It replaces the former ``api_support``, ``governance_support`` and ``e2e_support`` modules.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiohttp import web
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.api.limits import ConnectionLimits
from marblekeep.api.server import Listeners
from marblekeep.api.tls import ServerCredentials, make_server_credentials
from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.cli.main import main
from marblekeep.core.deployment import Deployment, new_deployment, set_manifest
from marblekeep.core.governance import log_initial_manifest
from marblekeep.crypto.pki import CertifiedKey, IssuedLeaf, LeafIssuer, create_intermediate, create_root_ca
from marblekeep.manifest import load_manifest
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
from marblekeep.service import Coordinator, CoordinatorConfig, EvidenceVerifier
from marblekeep.store.kek import KeyEncryptionKeyProvider, SimulationKeyFileProvider
from testsupport import self_signed_user_cert, stop_gracefully

T = TypeVar("T")

STATUS_2 = "Coordinator is ready to accept a manifest."
STATUS_3 = "Coordinator is running correctly and ready to accept marbles."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def last_pem(chain: str) -> str:
    """The last PEM block of a chain (the quote endpoint's ``cert`` ends with the root)."""
    marker = "-----BEGIN CERTIFICATE-----"
    return marker + chain.rsplit(marker, 1)[1]


def iter_pems(text: str) -> Iterator[str]:
    marker = "-----BEGIN CERTIFICATE-----"
    for part in text.split(marker)[1:]:
        yield marker + part


# ------------------------------------------------------------------------- the activation manifest

#: A manifest with a virtual seal key, a shared and a per-Marble symmetric key, a certificate
#: secret and a Marble type that may be activated only once. Simulation skips the measurements.
ACTIVATION_MANIFEST: dict[str, Any] = {
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


def activation_manifest_bytes() -> bytes:
    return json.dumps(ACTIVATION_MANIFEST, indent=2).encode()


def web_secrets() -> dict[str, Any]:
    """A manifest's ``Secrets`` of the end-to-end and Go interop Coordinators: a shared and a per-Marble
    256-bit key, and a shared ECDSA certificate for ``web.example`` (a fresh dict each call)."""
    return {
        "shared_key": {"Type": "symmetric-key", "Size": 256, "Shared": True},
        "own_key": {"Type": "symmetric-key", "Size": 256},
        "web_cert": {
            "Type": "cert-ecdsa",
            "Size": 256,
            "Shared": True,
            "Cert": {"Subject": {"CommonName": "web.example"}},
        },
    }


def writer_manifest_doc(admin_pem: str, marble_type: str, secret_names: Sequence[str]) -> dict[str, Any]:
    """A manifest with one Marble type (activations practically unbounded) and user-defined plain
    secrets that the ``admin`` user may read and write (the crash and fault end-to-end tests)."""
    return {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {marble_type: {"Package": "app", "MaxActivations": 1_000_000}},
        "Secrets": {name: {"Type": "plain", "UserDefined": True} for name in secret_names},
        "Users": {"admin": {"Certificate": admin_pem, "Roles": ["writer"]}},
        "Roles": {
            "writer": {
                "ResourceType": "Secrets",
                "ResourceNames": list(secret_names),
                "Actions": ["ReadSecret", "WriteSecret"],
            }
        },
    }


def replica_manifest_doc(admin_cert_pem: str, *, max_activations: int) -> dict[str, Any]:
    """The manifest of the etcd and replica end-to-end tests: a ``worker`` Marble given its seal key, a
    generated key and a user-defined ``token`` in its environment; a ``limited`` Marble with
    ``MaxActivations``; an ``admin`` user who may read and write ``token``."""
    return {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {
            "worker": {
                "Package": "app",
                "Parameters": {
                    "Env": {
                        "MK_SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
                        "MK_OWN_KEY": "{{ hex .Secrets.own_key }}",
                        "MK_TOKEN": "{{ string .Secrets.token }}",
                    }
                },
            },
            "limited": {"Package": "app", "MaxActivations": max_activations},
        },
        "Secrets": {
            "own_key": {"Type": "symmetric-key", "Size": 256},
            "token": {"Type": "plain", "UserDefined": True},
        },
        "Users": {"admin": {"Certificate": admin_cert_pem, "Roles": ["secrets"]}},
        "Roles": {
            "secrets": {
                "ResourceType": "Secrets",
                "ResourceNames": ["token"],
                "Actions": ["ReadSecret", "WriteSecret"],
            }
        },
    }


# ------------------------------------------------------------------------- users and governance

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


def governance_manifest_doc(
    *, threshold: int = 0, rotate: bool = False, users: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The governance test manifest: users with roles, user-defined secrets, ``.Previous``."""
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


def governance_manifest_bytes(doc: dict[str, Any] | None = None, **kwargs: Any) -> bytes:
    return json.dumps(doc if doc is not None else governance_manifest_doc(**kwargs), indent=2).encode()


def changed(doc: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` (default: :func:`governance_manifest_doc`) to edit for an update."""
    return copy.deepcopy(doc if doc is not None else governance_manifest_doc(**kwargs))


def deployed(raw: bytes | None = None) -> Deployment:
    """A pure deployment in state 3 with the governance manifest (and its first log entry)."""
    dep = new_deployment(["localhost", "10.0.0.7"], NOW)
    manifest = load_manifest(raw or governance_manifest_bytes())
    return log_initial_manifest(set_manifest(dep, manifest, NOW), NOW)


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


# ------------------------------------------------------------------------- the in-process Coordinator


class BackgroundLoop:
    """An asyncio loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class RunningCoordinator:
    """A Coordinator and its real HTTPS listeners on loopback, in an event loop on a background thread.

    ``simulation=False`` seals with a key file (``kek_provider``, default ``<seal_dir>/test-kek.key``)
    and verifies evidence with ``verifier`` (e.g. :class:`FakeSgxVerifier`; default: none configured,
    so real evidence is refused); ``connection_limits`` replaces the listeners' defaults. ``host`` is
    the host name of :attr:`addr` (the listeners always bind 127.0.0.1; their certificate names
    ``localhost``, 127.0.0.1 and ::1).
    """

    def __init__(
        self,
        seal_dir: Path,
        *,
        simulation: bool = True,
        kek_provider: KeyEncryptionKeyProvider | None = None,
        verifier: EvidenceVerifier | None = None,
        prometheus: bool = False,
        max_manifest_bytes: int | None = None,
        connection_limits: ConnectionLimits | None = None,
        host: str = "localhost",
    ) -> None:
        self.seal_dir = seal_dir
        self.simulation = simulation
        self.host = host
        self._verifier = verifier
        self._prometheus = prometheus
        self._max_manifest_bytes = max_manifest_bytes
        self._connection_limits = connection_limits
        if kek_provider is None and not simulation:
            kek_provider = SimulationKeyFileProvider(seal_dir / "test-kek.key")
        self._kek_provider = kek_provider
        self.bg = BackgroundLoop()
        self._start()

    def _start(self) -> None:
        self.client_port = free_port()
        self.marble_port = free_port()
        self.metrics_port = free_port() if self._prometheus else 0
        extra: dict[str, Any] = {}
        if self._max_manifest_bytes is not None:
            extra["max_manifest_bytes"] = self._max_manifest_bytes
        if self._connection_limits is not None:
            extra["connection_limits"] = self._connection_limits
        self.config = CoordinatorConfig(
            client_addr=f"127.0.0.1:{self.client_port}",
            mesh_addr=f"127.0.0.1:{self.marble_port}",
            prometheus_addr=f"127.0.0.1:{self.metrics_port}" if self._prometheus else "",
            seal_dir=self.seal_dir,
            simulation=self.simulation,
            **extra,
        )
        self.coord: Coordinator = self.run(
            Coordinator.open(self.config, kek_provider=self._kek_provider, verifier=self._verifier)
        )
        self.listeners = Listeners(self.coord, self.config)
        self.run(self.listeners.start())
        self.root_pem_path = self.seal_dir / "test-root.pem"
        self.root_pem_path.write_bytes(self.coord.deployment.ca.root.cert_pem)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.bg.run(coro, timeout=60)

    @property
    def addr(self) -> str:
        """``HOST:PORT`` of the Client API, as the CLI takes it."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"https://localhost:{self.client_port}"

    @property
    def marble_url(self) -> str:
        return f"https://localhost:{self.marble_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def root_pem(self) -> bytes:
        return self.coord.deployment.ca.root.cert_pem

    @property
    def intermediate_pem(self) -> bytes:
        return self.coord.deployment.ca.intermediate.cert_pem

    def ssl_context(self, who: User | None = None, *, chain: tuple[User, ...] = ()) -> ssl.SSLContext:
        """Trusts the root; with ``who``, sends that user's certificate (then ``chain``'s)."""
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
            base_url=self.client_url, verify=self.ssl_context(who, chain=chain), trust_env=False, timeout=30
        )

    def marble(self) -> MarbleClient:
        return MarbleClient(
            httpx.Client(base_url=self.marble_url, verify=self.ssl_context(), trust_env=False, timeout=30)
        )

    def set_manifest(self, raw: bytes | None = None) -> None:
        """Set ``raw`` (default: the activation manifest) through the Client API."""
        with self.client() as c:
            r = c.post("/api/v2/manifest", json={"manifest": b64(raw or activation_manifest_bytes())})
        assert r.status_code == 200, r.text

    def restart(self, while_stopped: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Stop and reopen on the same seal directory (new ports); ``while_stopped`` runs between."""
        self.run(self.listeners.stop())
        self.run(self.coord.close())
        if while_stopped is not None:
            self.run(while_stopped())
        self._start()

    def stop(self) -> None:
        self.run(self.listeners.stop())
        self.run(self.coord.close())
        self.bg.close()

    def __enter__(self) -> RunningCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------- a Marble, step by step


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


def simulation_activation_request(
    marble_type: str,
    nonce: bytes,
    key: X25519PrivateKey | None = None,
    *,
    marble_uuid: uuid_mod.UUID | None = None,
    dns_names: tuple[str, ...] = ("localhost",),
) -> ActivationRequest:
    """A simulation-mode activation request for ``nonce`` (a fresh UUID and HPKE key unless given),
    its evidence the report data the Coordinator expects."""
    req = ActivationRequest(
        marble_type=marble_type,
        uuid=marble_uuid or uuid_mod.uuid4(),
        dns_names=dns_names,
        hpke_public_key=(key or X25519PrivateKey.generate()).public_key().public_bytes_raw(),
        nonce=nonce,
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    return replace(req, evidence=expected_report_data(req))


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
        req = simulation_activation_request(
            marble_type, self.challenge(), key, marble_uuid=marble_uuid, dns_names=dns_names
        )
        return Prepared(req, key)

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


# ------------------------------------------------------------------------- subprocesses


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """``marblekeep ARGS`` in-process (click's runner); whatever it answers, never a traceback."""
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment (``os.environ`` unless ``base``) without any EDG_/MARBLEKEEP_ variable of the
    caller, so a subprocess Coordinator or CLI sees only the settings the test gives it."""
    return {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(("EDG_", "MARBLEKEEP_"))
    }


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
    """``marblekeep coordinator --simulation`` as a subprocess; its output goes to ``log`` (default
    ``<workdir>/coordinator.log``), its state to ``seal_dir`` (default ``<workdir>/seal``).

    With ``wait`` the constructor returns once the Coordinator logged "coordinator started".
    """

    def __init__(
        self,
        *,
        workdir: Path,
        env: dict[str, str],
        client_addr: str,
        mesh_addr: str,
        seal_dir: Path | None = None,
        log: Path | None = None,
        extra: Sequence[str] = (),
        wait: bool = True,
    ) -> None:
        seal_dir = workdir / "seal" if seal_dir is None else seal_dir
        self.log = log = workdir / "coordinator.log" if log is None else log
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


class CoordinatorProcess(CoordinatorSubprocess):
    """A :class:`CoordinatorSubprocess` on free loopback ports for ``seal_dir``, without the caller's
    ``EDG_*``/``MARBLEKEEP_*`` environment; its output goes to ``<seal_dir>-stderr.log`` beside it."""

    def __init__(self, seal_dir: Path, *extra: str) -> None:
        self.client_port = free_port()
        self.marble_port = free_port()
        self.seal_dir = seal_dir
        self.stderr_path = seal_dir.parent / f"{seal_dir.name}-stderr.log"
        super().__init__(
            workdir=seal_dir.parent,
            env=clean_env(),
            client_addr=f"127.0.0.1:{self.client_port}",
            mesh_addr=f"127.0.0.1:{self.marble_port}",
            seal_dir=seal_dir,
            log=self.stderr_path,
            extra=extra,
        )

    def stderr(self) -> str:
        return self.output

    def root_pem(self) -> bytes:
        with httpx.Client(verify=False, trust_env=False, timeout=30) as c:
            r = c.get(f"https://127.0.0.1:{self.client_port}/api/v2/quote")
        return last_pem(r.json()["data"]["cert"]).encode()


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


# ------------------------------------------------------------------------- stub servers


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
        leaf = LeafIssuer(marble_root).issue(uuid_mod.uuid4(), "impostor", ["localhost"], now)
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
