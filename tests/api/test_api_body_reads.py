"""Request bodies are read whole, however the client splits them (issue 11, #7).

The body below is written in several TLS records with pauses between them, so that the server sees
the first part long before the rest. ``/api/v2/recover`` used to read only what had arrived and
answered 400 "not valid JSON"; every endpoint must read the whole body up to its limit.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest

from harness import STATUS_3, RunningCoordinator, activation_manifest_bytes


def _split_post(
    coordinator: RunningCoordinator, port: int, path: str, body: bytes, pieces: int = 4
) -> tuple[int, dict[str, object]]:
    """POST ``body`` over TLS in ``pieces`` separate records, pausing between them."""
    ctx = coordinator.ssl_context()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            tls.sendall(head)
            step = max(1, len(body) // pieces)
            for start in range(0, len(body), step):
                time.sleep(0.15)  # let the server run the handler on what has arrived so far
                tls.sendall(body[start : start + step])
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload)


def _recover_body() -> bytes:
    return json.dumps(
        {
            "recoverySecret": base64.b64encode(b"s" * 512).decode(),
            "recoverySecretSignature": base64.b64encode(b"g" * 512).decode(),
        }
    ).encode()


def test_split_recover_body_is_read_whole(deployed: RunningCoordinator) -> None:
    # Not in Recovery: a whole, well-formed body gets the state answer (409), not "not valid JSON".
    status, doc = _split_post(deployed, deployed.client_port, "/api/v2/recover", _recover_body())
    assert (status, doc.get("message")) == (409, "server is not in expected state"), doc


def test_split_recover_body_over_the_limit_is_413(deployed: RunningCoordinator) -> None:
    body = json.dumps({"recoverySecret": "A" * 30000, "recoverySecretSignature": ""}).encode()
    ctx = deployed.ssl_context()
    # No Content-Length: chunked, so only reading counts the bytes.
    with socket.create_connection(("127.0.0.1", deployed.client_port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(
                b"POST /api/v2/recover HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n"
            )
            for start in range(0, len(body), 8000):
                piece = body[start : start + 8000]
                tls.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            tls.sendall(b"0\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.split(b" ", 2)[1] == b"413"
    assert b"limit is 20480 bytes" in answer


@pytest.mark.parametrize("pieces", [2, 7])
def test_split_manifest_body_is_read_whole(coordinator: RunningCoordinator, pieces: int) -> None:
    body = json.dumps({"manifest": base64.b64encode(activation_manifest_bytes()).decode()}).encode()
    status, doc = _split_post(coordinator, coordinator.client_port, "/api/v2/manifest", body, pieces)
    assert status == 200, doc
    with coordinator.client() as c:
        assert c.get("/api/v2/status").json()["data"]["message"] == STATUS_3


def test_split_activation_body_is_read_whole(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        prepared = marble.prepare("backend")
    status, doc = _split_post(deployed, deployed.marble_port, "/marble/v1/activate", prepared.body(), 5)
    assert status == 200, doc
    assert isinstance(doc["data"], dict) and "sealedParameters" in doc["data"]
