"""Issue 9, "Done when": nothing the Coordinator writes under ``$TMPDIR`` or its data directory
contains a private key in the clear (ADR 0002: the listener key lives in memory only).

A real ``marblekeep coordinator --simulation`` subprocess runs with a private, empty ``TMPDIR`` and
data directory. The test sets a manifest, changes the users with an update (the old listener
rebuilt its TLS context, and wrote the key, on every user change), activates a Marble, reads the
listener's public key from a handshake and stops the Coordinator. Then:

- inotify (Linux) reports every file or directory created under ``TMPDIR`` during the whole run,
  also those removed at once (the old code wrote the key PEM there and deleted it right after
  loading): there must be none;
- every file under ``TMPDIR`` and the data directory is scanned for PEM private keys, DER
  private-key structures (SEC1, PKCS#8) and the listener's raw private scalar: none.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import socket
import ssl
import struct
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import CoordinatorSubprocess, clean_env, free_port, run_marble_subprocess
from testsupport import self_signed_user_cert

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_ISDIR = 0x40000000

#: DER prefixes of private keys: SEC1 ECPrivateKey (P-256, P-384), PKCS#8 with an EC or RSA key.
DER_KEY_PREFIXES = {
    "SEC1 P-256": bytes.fromhex("307702010104 20".replace(" ", "")),
    "SEC1 P-384": bytes.fromhex("3081a402010104 30".replace(" ", "")),
    "PKCS#8 EC": bytes.fromhex("020100301306072a8648ce3d0201"),
    "PKCS#8 RSA": bytes.fromhex("020100300d06092a864886f70d010101"),
}


class Inotify:
    """Creations in one directory, queued by the kernel until read (nothing is missed)."""

    def __init__(self, path: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")
        if self._libc.inotify_add_watch(self.fd, str(path).encode(), IN_CREATE | IN_MOVED_TO) < 0:
            pytest.skip(f"inotify_add_watch failed: {os.strerror(ctypes.get_errno())}")

    def created(self) -> list[str]:
        names: list[str] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                name = buf[offset + 16 : offset + 16 + length].rstrip(b"\0").decode(errors="replace")
                names.append(name + ("/" if mask & IN_ISDIR else ""))
                offset += 16 + length
        return names

    def close(self) -> None:
        os.close(self.fd)


def _listener_public_key(addr: str) -> ec.EllipticCurvePublicKey:
    host, port = addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    public = x509.load_der_x509_certificate(der).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def _contains_scalar_of(data: bytes, public: ec.EllipticCurvePublicKey) -> bool:
    """Does any 32-byte window of ``data`` hold the private scalar of ``public`` (P-256)?"""
    target = public.public_numbers()
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    for i in range(len(data) - 31):
        d = int.from_bytes(data[i : i + 32], "big")
        if not 0 < d < order:
            continue
        if ec.derive_private_key(d, ec.SECP256R1()).public_key().public_numbers() == target:
            return True
    return False


def _manifest(users: dict[str, str]) -> bytes:
    doc: dict[str, Any] = {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {
            "worker": {
                "Package": "app",
                "Parameters": {
                    "Env": {
                        "OWN_KEY": "{{ hex .Secrets.own_key }}",
                        "TLS_KEY": "{{ pem .MarbleRun.MarbleCert.Private }}",
                    }
                },
            }
        },
        "Secrets": {"own_key": {"Type": "symmetric-key", "Size": 256}},
        "Users": {name: {"Certificate": pem, "Roles": ["updater"]} for name, pem in users.items()},
        "Roles": {"updater": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]}},
        "Config": {"UpdateThreshold": 1},
    }
    return json.dumps(doc, indent=2).encode()


def _user_context(tmp: Path, name: str, pem: str, key: ec.EllipticCurvePrivateKey) -> ssl.SSLContext:
    cert_file, key_file = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_file.write_text(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def test_no_private_key_under_tmpdir_or_the_data_directory(tmp_path: Path) -> None:
    private_tmp = tmp_path / "coordinator-tmp"
    data_dir = tmp_path / "data"
    private_tmp.mkdir()
    client_files = tmp_path / "client"  # the test's own user keys live here, not in the scanned dirs
    client_files.mkdir()
    base_env = clean_env()
    base_env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), PYTHONUNBUFFERED="1")
    coordinator_env = dict(base_env, TMPDIR=str(private_tmp), TEMP=str(private_tmp), TMP=str(private_tmp))
    client_addr, mesh_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    watch = Inotify(private_tmp)
    coordinator = CoordinatorSubprocess(
        workdir=tmp_path,
        env=coordinator_env,
        client_addr=client_addr,
        mesh_addr=mesh_addr,
        seal_dir=data_dir,
        log=tmp_path / "coordinator.log",
    )
    try:
        alice_pem, alice_key = self_signed_user_cert("alice")
        bob_pem, _ = self_signed_user_cert("bob")
        alice = _user_context(client_files, "alice", alice_pem, alice_key)
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.verify_mode = ssl.CERT_NONE
        url = f"https://{client_addr}"
        first = _manifest({"alice": alice_pem})
        r = httpx.post(
            f"{url}/api/v2/manifest",
            json={"manifest": base64.b64encode(first).decode()},
            verify=anonymous,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        # A user change: Bob joins (threshold 1: Alice's update applies at once).
        second = _manifest({"alice": alice_pem, "bob": bob_pem})
        r = httpx.post(
            f"{url}/api/v2/update",
            json={"manifest": base64.b64encode(second).decode()},
            verify=alice,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        r = httpx.get(f"{url}/api/v2/manifest", verify=anonymous, timeout=30)
        assert base64.b64decode(r.json()["data"]["manifest"]) == second
        marble = run_marble_subprocess(
            tmp_path,
            base_env,
            mesh_addr=mesh_addr,
            marble_type="worker",
            uuid_file=tmp_path / "uuid",
            program="import os; print(len(os.environ['OWN_KEY']))",
            activation_timeout=20,
        )
        assert marble.returncode == 0, marble.stderr
        assert marble.stdout.strip() == "64"
        listener_public = _listener_public_key(mesh_addr)
        assert _listener_public_key(client_addr).public_numbers() == listener_public.public_numbers()
    finally:
        assert coordinator.stop() == 0, coordinator.output

    created = watch.created()
    watch.close()
    assert created == [], f"the Coordinator created {created} under its TMPDIR"

    scanned: list[Path] = []
    for root in (private_tmp, data_dir):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            scanned.append(path)
            assert b"PRIVATE KEY" not in data, f"{path} holds a PEM private key"
            for kind, prefix in DER_KEY_PREFIXES.items():
                assert prefix not in data, f"{path} holds what looks like a {kind} private key"
            assert not _contains_scalar_of(data, listener_public), f"{path} holds the listener's key"
    assert any(p.is_relative_to(data_dir) for p in scanned), "the data directory was empty: nothing tested"
