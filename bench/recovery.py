"""Recovery uploads that no recovery key signed, against a real Coordinator in Recovery (issue 11, finding 2).

A ``marblekeep coordinator --simulation`` subprocess on loopback gets a manifest with one recovery
key (``POST /api/v2/manifest``), is stopped, loses its key-encryption key (the simulation key file is
deleted) and starts again in Recovery. Then:

1. ``--uploads`` junk uploads (random 32-byte secret, random signature), one after the other; the
   time of each answer is printed. Meanwhile a second thread polls ``GET /api/v2/status`` and the
   slowest status answer is reported.
2. The owner's genuine upload (the decrypted recovery secret, signed with the owner's key), which
   must answer ``Recovery successful.``.

Run:

    .venv/bin/python bench/recovery.py [--uploads 24] [--give-up 60]

``--give-up`` stops the junk phase once one upload took longer than that many seconds (the code
before the fix needs 2^n work for upload n). Target (issue 11): each of 24 junk uploads answered
within 2 s, status responsive throughout, the genuine recovery still works.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from marblekeep.recovery.keys import oaep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def marblekeep() -> str:
    beside = Path(sys.executable).with_name("marblekeep")
    return str(beside) if beside.exists() else (shutil.which("marblekeep") or "marblekeep")


class Coordinator:
    def __init__(self, seal_dir: Path, log: Path) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.log = log
        out = log.open("wb")
        argv = [marblekeep(), "coordinator", "--simulation", "--client-addr", self.addr]
        argv += ["--mesh-addr", f"127.0.0.1:{free_port()}", "--seal-dir", str(seal_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDG_", "MARBLEKEEP_"))}
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while "coordinator started" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Coordinator did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"https://{self.addr}{path}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=24)
    parser.add_argument("--give-up", type=float, default=60.0)
    parser.add_argument(
        "--encrypted",
        action="store_true",
        help="encrypt every junk secret for the Coordinator's ephemeral RSA-4096 key (the decryption path)",
    )
    args = parser.parse_args()

    owner = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        owner.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    manifest = {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {"worker": {"Package": "app"}},
        "RecoveryKeys": {"owner": public_pem},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seal = work / "seal"
        first = Coordinator(seal, work / "first.log")
        try:
            body = {"manifest": base64.b64encode(json.dumps(manifest).encode()).decode()}
            answer = httpx.post(first.url("/api/v2/manifest"), json=body, verify=False, timeout=60)
            answer.raise_for_status()
            encrypted = base64.b64decode(answer.json()["data"]["RecoverySecrets"]["owner"])
        finally:
            first.stop()
        (seal / "simulation-kek.key").unlink()
        coord = Coordinator(seal, work / "recovery.log")
        try:
            assert httpx.get(coord.url("/api/v2/status"), verify=False).json()["data"]["code"] == 1
            stop = threading.Event()
            status_times: list[float] = []
            status_failures: list[str] = []

            def poll() -> None:
                with httpx.Client(verify=False, timeout=300) as client:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            client.get(coord.url("/api/v2/status")).raise_for_status()
                        except httpx.HTTPError as exc:
                            status_failures.append(type(exc).__name__)
                        status_times.append(time.perf_counter() - t0)
                        stop.wait(0.05)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            upload_times: list[float] = []
            codes: list[int] = []
            with httpx.Client(verify=False, timeout=max(300.0, 4 * args.give_up)) as client:
                ephemeral = None
                if args.encrypted:
                    doc = client.get(coord.url("/api/v2/recover/public-key")).json()["data"]
                    ephemeral = serialization.load_der_public_key(base64.b64decode(doc["ephemeralPublicKey"]))
                    assert isinstance(ephemeral, rsa.RSAPublicKey)
                for i in range(args.uploads):
                    secret = os.urandom(32)
                    if ephemeral is not None:
                        secret = ephemeral.encrypt(secret, oaep())
                    junk = {
                        "recoverySecret": base64.b64encode(secret).decode(),
                        "recoverySecretSignature": base64.b64encode(os.urandom(256)).decode(),
                    }
                    t0 = time.perf_counter()
                    response = client.post(coord.url("/api/v2/recover"), json=junk)
                    upload_times.append(time.perf_counter() - t0)
                    codes.append(response.status_code)
                    ms = upload_times[-1] * 1000
                    print(f"junk upload {i + 1:2d}: {ms:9.1f} ms  HTTP {response.status_code}")
                    if upload_times[-1] > args.give_up:
                        print(f"giving up: upload {i + 1} took more than {args.give_up:g} s")
                        break
            stop.set()
            poller.join(timeout=600)
            plain = owner.decrypt(encrypted, oaep())
            signature = owner.sign(plain, padding.PKCS1v15(), hashes.SHA256())
            genuine = {
                "recoverySecret": base64.b64encode(plain).decode(),
                "recoverySecretSignature": base64.b64encode(signature).decode(),
            }
            t0 = time.perf_counter()
            done = httpx.post(coord.url("/api/v2/recover"), json=genuine, verify=False, timeout=600)
            genuine_time = time.perf_counter() - t0
            print()
            print(f"junk uploads answered: {len(upload_times)}, HTTP codes {sorted(set(codes))}")
            print(f"slowest junk upload:   {max(upload_times) * 1000:9.1f} ms")
            slowest = max(status_times) * 1000
            polls, failures = len(status_times), len(status_failures)
            print(f"status polls:          {polls}, slowest {slowest:9.1f} ms, failures {failures}")
            print(f"genuine upload:        {genuine_time * 1000:9.1f} ms  -> {done.json().get('data')}")
        finally:
            coord.stop()


if __name__ == "__main__":
    main()
