"""Structured logs of a real ``marblekeep coordinator --log-format json`` process: every stderr line
is one JSON object, and no secret a Marble received ever appears in them."""

from __future__ import annotations

import base64
import json
import re
import ssl
import uuid as uuid_mod
from pathlib import Path

import httpx
import pytest

from harness import CoordinatorProcess, MarbleClient, activation_manifest_bytes

pytestmark = pytest.mark.slow

PEM_BODY = re.compile(rb"-----BEGIN ([A-Z ]+)-----\n(.*?)\n-----END \1-----", re.S)


def secret_forms(value: bytes) -> set[str]:
    """Every spelling of a secret that might leak into a log line."""
    forms: set[str] = set()
    text = value.decode("utf-8", "replace").strip()
    if len(text) >= 16:
        forms.add(text)
    for label, body in PEM_BODY.findall(value):
        if b"PRIVATE" in label:
            forms.update(line.decode() for line in body.split(b"\n") if len(line) >= 16)
    if re.fullmatch(r"[0-9a-fA-F]{32,}", text):
        raw = bytes.fromhex(text)
        forms.update({raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), repr(raw)})
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        pass
    else:
        if len(raw) >= 16:
            forms.update({raw.hex(), text})
    return forms


def test_json_logs_are_json_and_never_contain_secrets(tmp_path: Path) -> None:
    proc = CoordinatorProcess(tmp_path / "seal", "--log-format", "json")
    try:
        root = tmp_path / "root.pem"
        root.write_bytes(proc.root_pem())
        verify = ssl.create_default_context(cafile=str(root))
        client = httpx.Client(
            base_url=f"https://localhost:{proc.client_port}", verify=verify, trust_env=False, timeout=30
        )
        with client:
            # a rejected manifest first (its problems are logged/answered, nothing secret in it)
            assert client.post("/api/v2/manifest", json={"manifest": "@@"}).status_code == 400
            raw = activation_manifest_bytes()
            r = client.post("/api/v2/manifest", json={"manifest": base64.b64encode(raw).decode()})
            assert r.status_code == 200, r.text
            assert client.get("/status").status_code == 200  # a deprecated v1 call is logged

        received: list[bytes] = []
        marble_http = httpx.Client(
            base_url=f"https://localhost:{proc.marble_port}", verify=verify, trust_env=False, timeout=30
        )
        with MarbleClient(marble_http) as marble:
            for marble_type in ("backend", "backend", "once"):
                params = marble.activate(marble_type, uuid_mod.uuid4())
                received.extend(params.env.values())
                received.extend(params.files.values())
            # refusals are logged too
            assert marble.post(marble.prepare("once").body()).status_code == 403
            assert marble.post(marble.prepare("nope").body()).status_code == 403
            assert marble.post(b"{").status_code == 400
    finally:
        code = proc.stop()
    assert code == 0

    stderr = proc.stderr()
    lines = stderr.splitlines()
    assert lines, "the Coordinator logged nothing"
    docs = []
    for line in lines:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
        assert isinstance(doc, dict)
        assert {"time", "level", "logger", "msg"} <= set(doc), doc
        docs.append(doc)
    messages = [d["msg"] for d in docs]
    assert any("SIMULATION MODE" in m for m in messages)
    assert "coordinator started" in messages
    assert "manifest set" in messages
    assert messages.count("marble activated") == 3
    assert messages.count("marble activation refused") == 2
    assert "coordinator stopped" in messages
    started = docs[messages.index("coordinator started")]
    assert started["simulation"] is True
    refused = [d for d in docs if d["msg"] == "marble activation refused"]
    assert {d["marble_type"] for d in refused} == {"once", "unknown"}
    assert any("max activations" in d["reason"] for d in refused)

    secrets = set().union(*(secret_forms(v) for v in received))
    assert len(secrets) > 20  # the check below has something to look for
    leaked = sorted(s for s in secrets if s in stderr)
    assert not leaked, f"{len(leaked)} secret value(s) appear in the Coordinator's log"
