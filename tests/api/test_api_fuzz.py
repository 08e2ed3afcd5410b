"""Issue 12 item 11 / issue 11 (robustness suite): schemathesis against running Coordinators.

Three ``marblekeep coordinator --simulation`` subprocesses on loopback, over real HTTPS:

- ``deployed``: a manifest with two users (so a full update stays pending, and no update can lock the
  fuzzing user out), user-defined secrets named as in the document's examples, recovery keys and the
  sign-quote feature gate; every request carries alice's client certificate, so the authenticated
  operations are reached;
- ``anonymous``: the same deployment, requests without a client certificate (the 401 answers);
- ``recovery``: a Coordinator that lost its key-encryption key and waits in recovery mode.

For every operation of the document schemathesis sends the documented examples, boundary and
negative cases (coverage phase) and random requests (fuzzing phase), and checks each answer:
no 5xx, no traceback or internal-error text in the body, and the status code, content type and
body the document allows; a request the document calls invalid must get a 4xx, a method it does
not list a 405 with ``Allow``; every request must answer within the request timeout (no hang).
After the run each Coordinator must stop cleanly and must not have logged an internal error.

CI runs ``FUZZ_EXAMPLES`` examples per operation and target. ``MARBLEKEEP_FUZZ=long`` runs many
more (``MARBLEKEEP_FUZZ_EXAMPLES`` overrides the number).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from harness import CoordinatorProcess, free_port
from marblekeep.api.openapi import document
from testsupport import self_signed_user_cert

pytestmark = pytest.mark.slow

LONG = os.environ.get("MARBLEKEEP_FUZZ", "") == "long"
#: Paths served on the Marble API listener (Marble activation; the replicas' key hand-over).
MARBLE_API_PREFIXES = ("/marble/", "/coordinator/")
FUZZ_EXAMPLES = int(os.environ.get("MARBLEKEEP_FUZZ_EXAMPLES", "500" if LONG else "15"))
REQUEST_TIMEOUT = 30.0
#: Text that must never reach a client: a Python traceback, a source location, our 500 text.
FORBIDDEN_TEXT = (b"Traceback (most recent call last)", b'File "/', b"internal error", b"site-packages")

schema = schemathesis.openapi.from_dict(document())


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fuzz_manifest(users: dict[str, str], recovery_pem: str) -> dict[str, Any]:
    """Names match the document's examples, so the examples phase reaches real successes."""
    return {
        "Packages": {
            "backend": {
                "UniqueID": "c2720445a45267813688ff73fa188aa060c1b661aefaf1650d42f690697b5ab3",
                "Debug": False,
            }
        },
        "Marbles": {
            "backend": {
                "Package": "backend",
                "Parameters": {
                    "Env": {
                        "API_KEY": "{{ string .Secrets.api_key }}",
                        "SESSION_KEY": "{{ hex .Secrets.session_key }}",
                    }
                },
            }
        },
        "Secrets": {
            "api_key": {"Type": "plain", "UserDefined": True},
            "session_key": {"Type": "symmetric-key", "Size": 128, "UserDefined": True},
        },
        "Users": {
            "alice": {"Certificate": users["alice"], "Roles": ["updater", "secret-admin", "svn"]},
            "bob": {"Certificate": users["bob"], "Roles": ["updater"]},
        },
        "Roles": {
            "updater": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
            "secret-admin": {
                "ResourceType": "Secrets",
                "ResourceNames": ["api_key", "session_key"],
                "Actions": ["ReadSecret", "WriteSecret"],
            },
            "svn": {
                "ResourceType": "Packages",
                "ResourceNames": ["backend"],
                "Actions": ["UpdateSecurityVersion"],
            },
        },
        "RecoveryKeys": {"owner": recovery_pem},
        "Config": {"FeatureGates": ["SignQuoteEndpoint", "MonotonicCounter"]},
    }


@dataclass
class Target:
    """A running Coordinator and how to reach each of its listeners."""

    name: str
    process: CoordinatorProcess
    metrics_port: int
    root_pem: Path
    client_cert: tuple[str, str] | None

    def base_url(self, path: str) -> str:
        if path.startswith(MARBLE_API_PREFIXES):
            return f"https://localhost:{self.process.marble_port}"
        if path == "/metrics":
            return f"http://127.0.0.1:{self.metrics_port}"
        return f"https://localhost:{self.process.client_port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root_pem))

    def status_code(self) -> int:
        with httpx.Client(verify=self.ssl_context(), trust_env=False, timeout=30) as c:
            code: int = c.get(f"{self.base_url('/')}/api/v2/status").json()["data"]["code"]
        return code


def _start(seal_dir: Path, name: str, cert: tuple[str, str] | None) -> Target:
    metrics_port = free_port()
    process = CoordinatorProcess(seal_dir, "--prometheus-addr", f"127.0.0.1:{metrics_port}")
    root = seal_dir.parent / f"{name}-root.pem"
    root.write_bytes(process.root_pem())
    return Target(name, process, metrics_port, root, cert)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("fuzz")
    certs: dict[str, str] = {}
    for name in ("alice", "bob"):
        pem, key = self_signed_user_cert(name)
        certs[name] = pem
        (base / f"{name}.crt").write_text(pem)
        (base / f"{name}.key").write_bytes(_key_pem(key))
    owner = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    recovery_pem = (
        owner.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    raw = json.dumps(fuzz_manifest(certs, recovery_pem), indent=2).encode()
    return {"base": base, "manifest": raw, "alice": (str(base / "alice.crt"), str(base / "alice.key"))}


def _set_manifest(target: Target, raw: bytes) -> None:
    with httpx.Client(verify=target.ssl_context(), trust_env=False, timeout=30) as c:
        r = c.post(
            f"{target.base_url('/')}/api/v2/manifest", json={"manifest": base64.b64encode(raw).decode()}
        )
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module", params=["deployed", "anonymous", "recovery"])
def target(request: pytest.FixtureRequest, material: dict[str, Any]) -> Iterator[Target]:
    seal_dir = material["base"] / f"{request.param}-seal"
    if request.param in ("deployed", "anonymous"):
        cert = material["alice"] if request.param == "deployed" else None
        running = _start(seal_dir, request.param, cert)
        _set_manifest(running, material["manifest"])
        assert running.status_code() == 3
    else:
        first = _start(seal_dir, "lost", None)
        _set_manifest(first, material["manifest"])
        assert first.process.stop() == 0
        (seal_dir / "simulation-kek.key").unlink()  # the sealing key is lost: recovery mode
        running = _start(seal_dir, request.param, None)
        assert running.status_code() == 1
    try:
        yield running
    finally:
        code = running.process.stop()
        log = running.process.stderr()
        # After the run: the Coordinator stopped cleanly and never logged an internal error.
        assert code == 0, log
        assert "internal error" not in log, log
        assert "Traceback" not in log, log


def no_traceback_or_internal_text(ctx: Any, response: Any, case: Any) -> bool | None:
    if case.path == "/api/v2/openapi.json":  # the document quotes the error texts it describes
        return None
    for text in FORBIDDEN_TEXT:
        if text in response.content:
            raise AssertionError(f"the body holds {text!r}: {response.content[:500]!r}")
    return None


CHECKS = [
    not_a_server_error,
    no_traceback_or_internal_text,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    # A request the document calls invalid must get a 4xx (the document is not looser than the API).
    negative_data_rejection,
    # A method the document does not list must get 405 with an Allow header.
    unsupported_method,
]


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_fuzz(case: Any, target: Target) -> None:
    kwargs: dict[str, Any] = {"timeout": REQUEST_TIMEOUT}
    base_url = target.base_url(case.path)
    if base_url.startswith("https://"):
        kwargs["verify"] = str(target.root_pem)
        if target.client_cert is not None and not case.path.startswith(MARBLE_API_PREFIXES):
            kwargs["cert"] = target.client_cert
    case.call_and_validate(base_url=base_url, checks=CHECKS, **kwargs)
