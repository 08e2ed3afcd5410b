"""The Go premains against a grpcio stub of MarbleRun's Marble API: what they send, how they apply the answer.

This pins that our Go premain (tests/interop/premain, the one CI runs) behaves as MarbleRun v1.5.2's
``premain.PreMainMock`` does (reference §5.1–5.2); where the genuine binary was built, both run and must
send requests of the same shape and apply answers the same way.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from interop_support import (
    GENUINE_PREMAIN,
    OUR_GO_PREMAIN,
    finish,
    genuine_binary,
    required_binary,
)

from harness import clean_env

pytestmark = pytest.mark.slow


def _varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at ``data[i:]`` and the index after it."""
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        assert key & 7 == 2, f"field {key >> 3}: wire type {key & 7}, expected length-delimited"
        length, i = _read_varint(data, i)
        out.setdefault(key >> 3, []).append(data[i : i + length])
        i += length
    return out


def parameters(files: dict[str, bytes], env: dict[str, bytes], argv: list[str]) -> bytes:
    """ActivationResp{Parameters{Files, Env, Argv}} (reference §5.1)."""
    body = b"".join(_field(1, _field(1, k.encode()) + _field(2, v)) for k, v in files.items())
    body += b"".join(_field(2, _field(1, k.encode()) + _field(2, v)) for k, v in env.items())
    body += b"".join(_field(3, a.encode()) for a in argv)
    return _field(1, body)


@dataclass
class Stub:
    """A grpcio server for rpc.Marble/Activate over TLS that records requests and answers ``answer``."""

    addr: str = ""
    answer: bytes = b""
    refuse: tuple[grpc.StatusCode, str] | None = None
    requests: list[dict[int, list[bytes]]] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def activate(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.requests.append(_fields(request))
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        if self.refuse is not None:
            context.abort(*self.refuse)
        return self.answer


@pytest.fixture
def stub() -> Iterator[Stub]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    st = Stub()
    handler = grpc.method_handlers_generic_handler(
        "rpc.Marble", {"Activate": grpc.unary_unary_rpc_method_handler(st.activate)}
    )
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    st.addr = f"127.0.0.1:{port}"
    yield st
    server.stop(grace=None)


@pytest.fixture(params=[OUR_GO_PREMAIN, GENUINE_PREMAIN])
def binary(request: pytest.FixtureRequest) -> Path:
    name: str = request.param
    return required_binary(name) if name == OUR_GO_PREMAIN else genuine_binary(name)


def run(binary: Path, cwd: Path, stub: Stub, **extra: str) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(
        clean_env(os.environ),
        EDG_MARBLE_TYPE="backend",
        EDG_MARBLE_COORDINATOR_ADDR=stub.addr,
        EDG_MARBLE_UUID_FILE=str(cwd.parent / f"{cwd.name}.uuid"),
        EDG_MARBLE_DNS_NAMES="localhost,svc.example,10.1.2.3",
        MARBLEKEEP_INTEROP_ENV="GREETING,BINARY",
        MARBLEKEEP_INTEROP_FILES="conf/app.conf",
    )
    env.update(extra)
    proc = subprocess.Popen(
        [str(binary)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return finish(proc)


def test_the_request_is_marbleruns(binary: Path, stub: Stub, tmp_path: Path) -> None:
    stub.answer = parameters({}, {}, [])
    result = run(binary, tmp_path / "m", stub)
    assert result.returncode == 0, result.stderr
    [req] = stub.requests
    assert req.get(1, [b""]) == [b""], "PreMainMock sends an empty quote"
    assert req[3] == [b"backend"]
    marble_uuid = uuid.UUID(req[4][0].decode())
    assert (tmp_path / "m.uuid").read_text() == str(marble_uuid)
    assert stat.S_IMODE((tmp_path / "m.uuid").stat().st_mode) == 0o600
    csr = x509.load_der_x509_csr(req[2][0])
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["localhost", "svc.example", "127.0.0.1", "::1", "10.1.2.3"]
    assert stub.metadata[0]["user-agent"].startswith("grpc-go/1.66.2")
    # the same UUID file: the same UUID again
    run(binary, tmp_path / "m", stub)
    assert uuid.UUID(stub.requests[1][4][0].decode()) == marble_uuid


def test_the_answer_is_applied(binary: Path, stub: Stub, tmp_path: Path) -> None:
    stub.answer = parameters(
        {"conf/app.conf": b"greeting = hello\n"},
        {"GREETING": b"hello", "BINARY": b"caf\xc3\xa9"},
        ["prog", "--flag"],
    )
    result = run(binary, tmp_path / "m", stub)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["argv"] == ["prog", "--flag"]
    assert report["env"] == {"GREETING": "hello", "BINARY": "café"}
    assert report["files"] == ["conf/app.conf"]
    conf = tmp_path / "m" / "conf" / "app.conf"
    assert conf.read_bytes() == b"greeting = hello\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o700


def test_an_empty_ttls_config_is_an_error(binary: Path, stub: Stub, tmp_path: Path) -> None:
    stub.answer = parameters({}, {"MARBLE_TTLS_CONFIG": b'{"tls": {"Incoming": {}, "Outgoing": {}}}'}, [])
    result = run(binary, tmp_path / "m", stub)
    assert result.returncode == 1
    assert "premain: TTLS config is empty" in result.stderr


def test_a_refusal_exits_1_with_the_status_and_message(binary: Path, stub: Stub, tmp_path: Path) -> None:
    stub.refuse = (grpc.StatusCode.PERMISSION_DENIED, "reached max activations count (1): raise it")
    result = run(binary, tmp_path / "m", stub)
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        "premain: rpc error: code = PermissionDenied desc = reached max activations count (1): raise it"
        in result.stderr
    )
    assert len(stub.requests) == 1, "one Activate call, no retry"
    assert not (tmp_path / "m" / "conf").exists()


def test_edg_marble_type_is_required(binary: Path, stub: Stub, tmp_path: Path) -> None:
    result = run(binary, tmp_path / "m", stub, EDG_MARBLE_TYPE="")
    assert result.returncode == 1
    assert "EDG_MARBLE_TYPE" in result.stderr
    assert stub.requests == []
