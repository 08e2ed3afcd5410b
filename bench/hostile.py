"""Hostile clients against a real Coordinator process (issue 11): what one client costs the others.

    .venv/bin/python bench/hostile.py [--case explode|challenges|secret-reads|all]

Starts ``marblekeep coordinator --simulation`` as a subprocess on free loopback ports (state in a
temporary directory) and, meanwhile, polls ``GET /api/v2/status`` on its own connection every
50 ms, reporting the slowest answer while the hostile requests ran. Cases:

- ``explode`` (finding 4): ``POST /api/v2/manifest`` with the 3.5 MB "explode" manifest
  (tests/hostile_manifests.py): time to the answer and its status. If a Coordinator accepts it
  (before the fix), one activation of the explode Marble follows: its time and the size of the
  answer.
- ``challenges`` (finding 6): a Marble takes a challenge, then 12,000 unauthenticated challenges
  are requested, then the Marble activates with its (older) nonce: accepted or refused.
- ``secret-reads`` (finding 8): one user reads a secret as fast as it can for ``--seconds``:
  reads/s, the Coordinator's resident memory before and after, the length of the public update log
  and of the audit trail.

To measure code other than this checkout's (e.g. before a fix), put its ``src`` first on
PYTHONPATH: ``PYTHONPATH=/path/to/other/src .venv/bin/python bench/hostile.py``. Nothing asserts on
time; the figures are printed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from activation import free_port, supervised

import marblekeep
from hostile_manifests import explode_manifest
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    ActivationRequest,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
    parse_challenge_response,
)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    client_url: str
    marble_url: str
    log_path: Path

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def hwm_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@contextlib.contextmanager
def coordinator(workdir: Path) -> Iterator[Server]:
    client_port, marble_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "coordinator.log"
    cmd = [
        sys.executable, "-c", "import sys; from marblekeep.cli.main import main; sys.exit(main())",
        "coordinator", "--simulation",
        "--client-addr", f"127.0.0.1:{client_port}",
        "--mesh-addr", f"127.0.0.1:{marble_port}",
        "--seal-dir", str(workdir / "state"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDG_", "MARBLEKEEP_"))}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"https://127.0.0.1:{client_port}", f"https://127.0.0.1:{marble_port}", log_path)
    with supervised(proc, log_path, "the Coordinator"):
        yield server


@dataclass
class StatusProbe:
    """Polls GET /api/v2/status every ``interval`` s on its own connection; keeps the latencies."""

    url: str
    interval: float = 0.05
    latencies: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> StatusProbe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with httpx.Client(verify=False, trust_env=False, timeout=120) as c:
            while not self._stop.is_set():
                start = time.perf_counter()
                c.get(f"{self.url}/api/v2/status")
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(self.interval)

    def summary(self) -> str:
        if not self.latencies:
            return "status: no answer at all"
        ordered = sorted(self.latencies)
        p50 = ordered[len(ordered) // 2]
        slowest = ordered[-1]
        n = len(ordered)
        return f"status meanwhile: {n} answers, p50 {p50 * 1e3:.1f} ms, slowest {slowest * 1e3:.1f} ms"


def post_manifest(server: Server, raw: bytes, timeout: float = 600) -> httpx.Response:
    body = {"manifest": base64.b64encode(raw).decode()}
    return httpx.post(f"{server.client_url}/api/v2/manifest", json=body, verify=False, timeout=timeout)


def activation_request(client: httpx.Client, marble_type: str) -> tuple[ActivationRequest, bytes]:
    nonce = parse_challenge_response(client.post(CHALLENGE_PATH, content=b"{}").content)
    req = ActivationRequest(
        marble_type=marble_type,
        uuid=uuid.uuid4(),
        dns_names=("localhost",),
        hpke_public_key=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        nonce=nonce,
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    req = replace(req, evidence=expected_report_data(req))
    return req, encode_activation_request(req)


# --------------------------------------------------------------------------- cases


def case_explode(workdir: Path) -> None:
    raw = explode_manifest()
    print(f"explode manifest: {len(raw)} bytes, {raw.count(b'{{')} template actions")
    with coordinator(workdir / "explode") as server, StatusProbe(server.client_url) as probe:
        time.sleep(0.3)
        start = time.perf_counter()
        r = post_manifest(server, raw)
        elapsed = time.perf_counter() - start
        message = r.json().get("message", "") if r.status_code != 200 else ""
        print(f"  set manifest: HTTP {r.status_code} after {elapsed:.2f} s {message[:110]!r}")
        if r.status_code == 200:
            with httpx.Client(base_url=server.marble_url, verify=False, trust_env=False, timeout=600) as c:
                _req, body = activation_request(c, "explode")
                start = time.perf_counter()
                answer = c.post(ACTIVATE_PATH, content=body, headers={"Content-Type": "application/json"})
                elapsed = time.perf_counter() - start
            print(
                f"  one activation of the explode Marble: HTTP {answer.status_code} after {elapsed:.2f} s, "
                f"{len(answer.content) / 1e6:.1f} MB answer; Coordinator peak RSS {server.hwm_mib():.0f} MiB"
            )
        else:
            print(f"  Coordinator peak RSS {server.hwm_mib():.0f} MiB")
    print(f"  {probe.summary()}")


SIMPLE_MANIFEST = {
    "Packages": {"pkg": {"UniqueID": "c2720445a45267813688ff73fa188aa060c1b661aefaf1650d42f690697b5ab3"}},
    "Marbles": {"backend": {"Package": "pkg", "Parameters": {"Env": {"K": "{{ hex .MarbleRun.SealKey }}"}}}},
}


def case_challenges(workdir: Path, flood: int) -> None:
    with coordinator(workdir / "challenges") as server, StatusProbe(server.client_url) as probe:
        r = post_manifest(server, json.dumps(SIMPLE_MANIFEST).encode())
        assert r.status_code == 200, r.text
        with httpx.Client(base_url=server.marble_url, verify=False, trust_env=False, timeout=60) as c:
            _req, body = activation_request(c, "backend")
            start = time.perf_counter()
            for _ in range(flood):
                c.post(CHALLENGE_PATH, content=b"{}")
            elapsed = time.perf_counter() - start
            answer = c.post(ACTIVATE_PATH, content=body, headers={"Content-Type": "application/json"})
        print(
            f"challenge flood: {flood} challenges from one client in {elapsed:.1f} s "
            f"({flood / elapsed:.0f}/s)"
        )
        verdict = (
            "activated"
            if answer.status_code == 200
            else f"refused: {answer.json().get('message', '')[:90]!r}"
        )
        print(
            "  the Marble's activation with its nonce from before the flood: "
            f"HTTP {answer.status_code}, {verdict}"
        )
        print(f"  Coordinator RSS {server.rss_mib():.0f} MiB")
    print(f"  {probe.summary()}")


def _user_cert() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reader")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def case_secret_reads(workdir: Path, seconds: float) -> None:
    cert_pem, key_pem = _user_cert()
    (workdir / "reader.crt").write_bytes(cert_pem)
    (workdir / "reader.key").write_bytes(key_pem)
    manifest: dict[str, Any] = json.loads(json.dumps(SIMPLE_MANIFEST))
    manifest["Secrets"] = {"shared": {"Type": "symmetric-key", "Size": 128, "Shared": True}}
    manifest["Users"] = {"reader": {"Certificate": cert_pem.decode(), "Roles": ["read"]}}
    manifest["Roles"] = {
        "read": {"ResourceType": "Secrets", "ResourceNames": ["shared"], "Actions": ["ReadSecret"]}
    }
    with coordinator(workdir / "reads") as server, StatusProbe(server.client_url) as probe:
        r = post_manifest(server, json.dumps(manifest).encode())
        assert r.status_code == 200, r.text
        rss_before = server.rss_mib()
        cert = (str(workdir / "reader.crt"), str(workdir / "reader.key"))
        reads = 0
        with httpx.Client(
            base_url=server.client_url, verify=False, cert=cert, trust_env=False, timeout=60
        ) as c:
            deadline = time.perf_counter() + seconds
            start = time.perf_counter()
            while time.perf_counter() < deadline:
                assert c.get("/api/v2/secrets", params={"s": "shared"}).status_code == 200
                reads += 1
            elapsed = time.perf_counter() - start
            log = c.get("/api/v2/update").json()["data"]["updateLog"]
            kept, since, audit_status = 0, 0, 0
            while True:
                audit = c.get("/api/v2/audit/secret-reads", params={"since": since})
                audit_status = audit.status_code
                if audit_status != 200 or not audit.json()["data"]["entries"]:
                    break
                kept += len(audit.json()["data"]["entries"])
                since = audit.json()["data"]["nextSeq"]
        trail = f"{kept} entries" if audit_status == 200 else f"n/a (HTTP {audit_status})"
        print(f"secret reads: {reads} reads in {elapsed:.1f} s ({reads / elapsed:.0f}/s) by one user")
        print(f"  public update log: {len(log)} lines; authenticated audit trail kept in memory: {trail}")
        print(f"  Coordinator RSS {rss_before:.0f} MiB before, {server.rss_mib():.0f} MiB after")
    print(f"  {probe.summary()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["explode", "challenges", "secret-reads", "all"], default="all")
    parser.add_argument("--flood", type=int, default=12_000, help="challenges in the flood (12000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the secret-read case (10)")
    args = parser.parse_args()
    print(f"marblekeep from {Path(marblekeep.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="marblekeep-hostile-") as tmp:
        workdir = Path(tmp)
        if args.case in ("explode", "all"):
            case_explode(workdir)
        if args.case in ("challenges", "all"):
            case_challenges(workdir, args.flood)
        if args.case in ("secret-reads", "all"):
            case_secret_reads(workdir, args.seconds)


if __name__ == "__main__":
    main()
