"""A default ``marblekeep coordinator --simulation`` subprocess serves both Marble protocols on one
address: MarbleRun's gRPC (ALPN ``h2``, a grpcio client presenting a premain-style self-signed
certificate that nobody registered) and ours (``marblekeep marble run``, HTTP/1.1). The same UUID
gets the same keys by both; the Marble certificate from the gRPC activation authenticates to the
monotonic counters over real TLS."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from harness import CoordinatorSubprocess, clean_env, free_port, run_marble_subprocess
from marble.marblerun_support import MarbleRunMarble, PbActivationResp

pytestmark = pytest.mark.slow

METHOD = "/rpc.Marble/Activate"
MANIFEST = {
    "Packages": {"pkg": {"UniqueID": "ab" * 32}},
    "Marbles": {
        "app": {
            "Package": "pkg",
            "Parameters": {
                "Env": {"SEAL_KEY": "{{ hex .MarbleRun.SealKey }}", "PER_KEY": "{{ hex .Secrets.per_key }}"},
                "Files": {"/tmp/marblekeep-e2e-unused": "x"},
            },
        },
    },
    "Secrets": {"per_key": {"Type": "symmetric-key", "Size": 256}},
    "Config": {"FeatureGates": ["MonotonicCounter"]},
}


@dataclass
class Running:
    coordinator: CoordinatorSubprocess
    client_url: str
    mesh_addr: str
    root_pem: bytes
    workdir: Path
    env: dict[str, str]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    client_addr = f"127.0.0.1:{free_port()}"
    mesh_addr = f"127.0.0.1:{free_port()}"
    env = clean_env()
    coordinator = CoordinatorSubprocess(
        workdir=tmp_path,
        env=env,
        client_addr=client_addr,
        mesh_addr=mesh_addr,
    )
    try:
        url = f"https://{client_addr}"
        body = {"manifest": base64.b64encode(json.dumps(MANIFEST).encode()).decode()}
        r = httpx.post(f"{url}/api/v2/manifest", json=body, verify=False, trust_env=False, timeout=30)
        assert r.status_code == 200, r.text
        chain = httpx.get(f"{url}/api/v2/quote", verify=False, trust_env=False, timeout=30).json()["data"][
            "cert"
        ]
        marker = "-----BEGIN CERTIFICATE-----"
        root = (marker + chain.rsplit(marker, 1)[1]).encode()
        yield Running(coordinator, url, mesh_addr, root, tmp_path, env)
    finally:
        coordinator.stop()


def _activate(running: Running, marble: MarbleRunMarble | None, request: bytes) -> bytes:
    if marble is not None:
        creds = grpc.ssl_channel_credentials(running.root_pem, marble.key_pem, marble.cert_pem)
    else:
        creds = grpc.ssl_channel_credentials(running.root_pem)
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(running.mesh_addr, creds, options=options) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return bytes(stub(request, timeout=60))


def test_both_premains_activate_on_one_address_with_the_same_keys(running: Running) -> None:
    marble = MarbleRunMarble()
    answer = PbActivationResp.FromString(_activate(running, marble, marble.request("app"))).Parameters
    uuid_file = running.workdir / "uuid"
    uuid_file.write_text(str(marble.uuid))
    program = "import os, json; print(json.dumps({k: os.environ[k] for k in ('SEAL_KEY', 'PER_KEY')}))"
    ours = run_marble_subprocess(
        running.workdir,
        running.env,
        mesh_addr=running.mesh_addr,
        marble_type="app",
        uuid_file=uuid_file,
        program=program,
        activation_timeout=30,
    )
    assert ours.returncode == 0, ours.stderr
    got = json.loads(ours.stdout)
    assert got["SEAL_KEY"].encode() == answer.Env["SEAL_KEY"]
    assert got["PER_KEY"].encode() == answer.Env["PER_KEY"]
    log = running.coordinator.output
    assert "protocol=marblerun" in log and "protocol=marblekeep" in log


def test_no_client_certificate_is_unauthenticated_over_real_tls(running: Running) -> None:
    marble = MarbleRunMarble()
    with pytest.raises(grpc.RpcError) as info:
        _activate(running, None, marble.request("app"))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def _client_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """Presents ``cert``/``key``; does not verify the Coordinator (the test pins nothing here)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx


def test_the_marble_certificate_authenticates_to_the_monotonic_counters(running: Running) -> None:
    marble = MarbleRunMarble()
    env = PbActivationResp.FromString(_activate(running, marble, marble.request("app"))).Parameters.Env
    chain = running.workdir / "marble-chain.pem"
    key = running.workdir / "marble-key.pem"
    chain.write_bytes(env["MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"])
    key.write_bytes(env["MARBLE_PREDEFINED_PRIVATE_KEY"])
    url = f"{running.client_url}/api/v2/monotonic-counter"
    with httpx.Client(verify=_client_tls(chain, key), trust_env=False, timeout=30) as client:
        assert client.post(url, json={"name": "epoch", "value": 3}).json()["data"] == {"value": 0}
        assert client.post(url, json={"name": "epoch", "value": 2}).json()["data"] == {"value": 3}
    # The premain's own self-signed certificate is not a Marble certificate.
    own_cert = running.workdir / "self-signed.pem"
    own_key = running.workdir / "self-signed-key.pem"
    own_cert.write_bytes(marble.cert_pem)
    own_key.write_bytes(marble.key_pem)
    with httpx.Client(verify=_client_tls(own_cert, own_key), trust_env=False, timeout=30) as client:
        r = client.post(url, json={"name": "epoch", "value": 9})
    assert r.status_code == 401, r.text
