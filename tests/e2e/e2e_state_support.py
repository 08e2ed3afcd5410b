"""Helpers for the state, recovery and crash end-to-end tests (issue 4).

A :class:`Site` is one deployment on loopback: a work directory, free ports, a seal directory and
an environment. :class:`CoordinatorProcess` runs ``marblekeep coordinator --simulation`` on it as a
real subprocess; :func:`cli` runs the ``marblekeep`` CLI in-process (CliRunner) against it; Marbles
run as ``marblekeep marble run -- python3 -c PRINT_ENV`` and print what they received as JSON.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import CoordinatorSubprocess, clean_env, free_port, run_marble_subprocess, run_marblekeep
from marblekeep.cli.main import main
from testsupport import self_signed_user_cert

STATUS_1 = (
    "Coordinator is in recovery mode. Either upload a key to unseal the saved state, or set a new "
    "manifest. For more information on how to proceed, consult the documentation."
)
STATUS_2 = "Coordinator is ready to accept a manifest."
STATUS_3 = "Coordinator is running correctly and ready to accept marbles."
KEK_FILE = "simulation-kek.key"
STATE_DB = "state.db"

#: A Marble's program: print every variable it was given as one JSON object.
PRINT_ENV = (
    "import json, os\n"
    "prefixes = ('MK_', 'MARBLE_PREDEFINED_')\n"
    "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(prefixes)}))\n"
)


@dataclass
class Site:
    """One deployment's places: work dir, ports, seal dir, pin file and environment."""

    workdir: Path
    client_addr: str = ""
    mesh_addr: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_addr = self.client_addr or f"127.0.0.1:{free_port()}"
        self.mesh_addr = self.mesh_addr or f"127.0.0.1:{free_port()}"
        env = clean_env()
        env.update(XDG_CONFIG_HOME=str(self.workdir / "config"), PYTHONUNBUFFERED="1")
        self.env = env

    @property
    def seal_dir(self) -> Path:
        return self.workdir / "seal"

    @property
    def pin(self) -> Path:
        return self.workdir / "pinned-root.pem"

    @property
    def db(self) -> Path:
        return self.seal_dir / STATE_DB

    @property
    def kek_file(self) -> Path:
        return self.seal_dir / KEK_FILE

    def path(self, name: str) -> Path:
        return self.workdir / name


class CoordinatorProcess(CoordinatorSubprocess):
    """``marblekeep coordinator --simulation`` on the site's ports and seal directory."""

    def __init__(self, site: Site, name: str, *extra: str, wait: bool = True) -> None:
        self.site = site
        super().__init__(
            workdir=site.workdir,
            env=site.env,
            client_addr=site.client_addr,
            mesh_addr=site.mesh_addr,
            seal_dir=site.seal_dir,
            log=site.path(f"coordinator-{name}.log"),
            extra=extra,
            wait=wait,
        )


def refused_start(site: Site, name: str, *extra: str) -> tuple[int, str]:
    """Start a Coordinator that must refuse to start; (exit code, its output)."""
    coordinator = CoordinatorProcess(site, name, *extra, wait=False)
    try:
        code = coordinator.wait_exit(timeout=30)
    except subprocess.TimeoutExpired:
        coordinator.kill()
        raise AssertionError(f"the Coordinator started instead of refusing:\n{coordinator.output}") from None
    return code, coordinator.output


def cli(site: Site, *args: str, ok: bool = True, input: str | None = None) -> Result:
    """The ``marblekeep`` CLI in-process; ``ok`` asserts exit status 0."""
    result = CliRunner().invoke(
        main, list(args), env={"XDG_CONFIG_HOME": str(site.workdir / "config")}, input=input
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"marblekeep {' '.join(args)} raised {result.exception!r}:\n{result.output}")
    assert "Traceback" not in result.output
    if ok:
        assert result.exit_code == 0, f"marblekeep {' '.join(args)} failed:\n{result.output}"
    return result


def cli_process(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``marblekeep`` console script as a subprocess (what an operator runs)."""
    return run_marblekeep(site.workdir, site.env, *args)


def marble(site: Site, marble_type: str, uuid_file: str) -> subprocess.CompletedProcess[str]:
    return run_marble_subprocess(
        site.workdir,
        site.env,
        mesh_addr=site.mesh_addr,
        marble_type=marble_type,
        uuid_file=site.path(uuid_file),
        program=PRINT_ENV,
        activation_timeout=10,
    )


def run_marble(site: Site, marble_type: str, uuid_file: str) -> dict[str, str]:
    result = marble(site, marble_type, uuid_file)
    assert result.returncode == 0, f"Marble {marble_type}/{uuid_file} failed:\n{result.stderr}"
    values: dict[str, str] = json.loads(result.stdout)
    return values


def status_v2(site: Site) -> dict[str, Any]:
    """GET /api/v2/status without TLS authentication (the test only reads the answer)."""
    response = httpx.get(f"https://{site.client_addr}/api/v2/status", verify=False, timeout=10)
    doc: dict[str, Any] = response.json()["data"]
    return doc


def status_code(site: Site) -> int:
    """The Coordinator's state code (1 recovery, 2 accepting a manifest, 3 accepting Marbles)."""
    return int(status_v2(site)["code"])


# ------------------------------------------------------------------------------------- keys and users


def rsa_owner(site: Site, name: str, bits: int = 2048) -> tuple[Path, str]:
    """A recovery-key owner: their private key file (PKCS#8 PEM) and the public PEM for the manifest."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = site.path(f"{name}.key.pem")
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public.decode()


@dataclass(frozen=True)
class User:
    cert: Path
    key: Path
    cert_pem: str

    @property
    def args(self) -> tuple[str, str, str, str]:
        return ("-c", str(self.cert), "-k", str(self.key))


def make_user(site: Site, name: str) -> User:
    """A manifest user: a self-signed P-256 certificate and its key."""
    cert_pem, key = self_signed_user_cert(
        name, valid_before=dt.timedelta(days=1), valid_for=dt.timedelta(days=365)
    )
    cert_path, key_path = site.path(f"{name}.crt"), site.path(f"{name}.key")
    cert_path.write_text(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return User(cert_path, key_path, cert_pem)


def recovery_secrets(path: Path) -> dict[str, bytes]:
    """The encrypted recovery secrets in a ``manifest set -r`` file."""
    doc = json.loads(path.read_text())
    return {name: base64.b64decode(value) for name, value in doc["RecoverySecrets"].items()}


def openssl_decrypt(key: Path, encrypted: bytes, workdir: Path) -> bytes:
    """What a recovery-key owner does by hand (the recovery documentation's command)."""
    source = workdir / "openssl-in.bin"
    source.write_bytes(encrypted)
    argv = ["openssl", "pkeyutl", "-decrypt", "-inkey", str(key), "-in", str(source)]
    argv += ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"]
    return subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout
