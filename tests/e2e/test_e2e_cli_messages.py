"""What the CLI says when a newcomer gets something wrong (issue 12 items 5 and 7): an unlisted
user certificate (HTTP 401, from a loopback HTTPS stub that answers as the Client API will), the
Marble API's port instead of the Client API's, a key that does not belong to its certificate, and
the warnings of ``manifest set`` (a real Coordinator on loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from harness import RunningCoordinator, StubPki, StubServer, jsend, jsend_error
from harness import run_cli as run
from testsupport import self_signed_user_cert


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    with RunningCoordinator(tmp_path / "seal", host="127.0.0.1") as running:
        yield running


def _user_files(tmp_path: Path, name: str = "mallory") -> tuple[Path, Path]:
    cert_pem, key = self_signed_user_cert(name)
    cert, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.write_text(cert_pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key_file


def _unauthorized_app(pki: StubPki) -> web.Application:
    async def quote(request: web.Request) -> web.Response:
        return jsend({"cert": pki.chain_pem, "quote": ""})

    async def secrets(request: web.Request) -> web.Response:
        return jsend_error("unauthorized user", 401)

    app = web.Application()
    app.router.add_get("/api/v2/quote", quote)
    app.router.add_get("/api/v2/secrets", secrets)
    app.router.add_get("/api/v2/update-manifest", secrets)
    return app


def test_http_401_says_the_certificate_is_not_a_user(tmp_path: Path) -> None:
    pki = StubPki.create()
    server = StubServer(_unauthorized_app(pki), pki.listener)
    cert, key = _user_files(tmp_path)
    pin = ["--coordinator-cert", str(tmp_path / "pin.pem"), "-i"]
    try:
        result = run("secret", "get", "api_key", server.addr, "-c", str(cert), "-k", str(key), *pin)
    finally:
        server.stop()
    assert result.exit_code == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith("Error: GET /api/v2/secrets: the Coordinator answered HTTP 401")
    assert f"the certificate {cert} is not a user of the deployment" in error
    assert "cannot reach" not in result.stderr


def test_an_unlisted_certificate_refused_in_the_tls_handshake_is_not_a_user(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    # Until the Client API answers 401, an unlisted certificate fails in the handshake: same advice.
    doc = json.loads((Path(__file__).resolve().parents[2] / "examples" / "manifest.json").read_text())
    file = tmp_path / "manifest.json"
    file.write_text(json.dumps(doc))
    pin = ["--coordinator-cert", str(tmp_path / "pin.pem"), "-i"]
    assert run("manifest", "set", str(file), coordinator.addr, *pin).exit_code == 0
    cert, key = _user_files(tmp_path)
    result = run("secret", "get", "api_key", coordinator.addr, "-c", str(cert), "-k", str(key), *pin)
    assert result.exit_code == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith("Error: ")
    assert f"{cert}" in error and "not a user of the deployment" in error
    assert "cannot reach" not in error


def test_the_marble_api_port_is_named_as_such(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    marble_addr = coordinator.config.mesh_addr
    result = run("status", marble_addr, "-i", "--coordinator-cert", str(tmp_path / "pin.pem"))
    assert result.exit_code == 2
    assert result.stderr.count("Error: ") == 1
    assert "is the Coordinator's Marble API port" in result.stderr
    assert "default port 4433" in result.stderr
    assert "HTTP 405" not in result.stderr
    assert not (tmp_path / "pin.pem").exists()


def test_a_key_that_does_not_match_its_certificate_says_so(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    cert, _key = _user_files(tmp_path, "alice")
    _other_cert, other_key = _user_files(tmp_path, "bob")
    pin = ["--coordinator-cert", str(tmp_path / "pin.pem"), "-i"]
    result = run("secret", "get", "x", coordinator.addr, "-c", str(cert), "-k", str(other_key), *pin)
    assert result.exit_code == 2
    assert "the key does not match the certificate" in result.stderr
    assert "cannot be loaded" not in result.stderr


def test_manifest_set_prints_the_warnings_validate_prints(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    doc = json.loads((Path(__file__).resolve().parents[2] / "examples" / "manifest.json").read_text())
    doc["Marbles"]["frontend"]["MaxActivation"] = 1
    file = tmp_path / "typo.json"
    file.write_text(json.dumps(doc, indent=2))
    validate = run("manifest", "validate", str(file))
    expected = 'Marbles.frontend.MaxActivation: unknown field, ignored (did you mean "MaxActivations"?)'
    assert expected in validate.stdout
    result = run(
        "manifest", "set", str(file), coordinator.addr, "-i", "--coordinator-cert", str(tmp_path / "pin")
    )
    assert result.exit_code == 0, result.output
    assert f"warning: {file}: {expected}" in result.stderr
