"""Real etcd processes for tests: one member or a cluster, on free loopback ports, in a temp directory.

Tests use Debian's ``etcd-server`` (``.ci/run`` installs it). ``etcd_binary()`` skips the test when
``etcd`` is not on PATH, except in CI (``CI`` set), where a missing etcd fails: the etcd tests must
run there.

The session-scoped ``etcd_server`` fixture (tests/conftest.py) starts one member for the whole run;
tests isolate themselves by key prefix (:func:`unique_prefix`). Tests that stop, kill or restore
etcd start their own :class:`EtcdMember` / :class:`EtcdCluster`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from marblekeep.store.etcd import EtcdConfig, EtcdEndpoint

_names = itertools.count()


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed: .ci/run must install Debian's etcd-server")
        pytest.skip("etcd is not installed (apt-get install etcd-server); the etcd tests need a real etcd")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/"


def wait_ready(endpoints: list[str], timeout: float = 30.0) -> None:
    """Until one of ``endpoints`` answers a linearizable read (the cluster has a leader)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for target in endpoints:
            channel = grpc.insecure_channel(target)
            try:
                rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"/ready"), timeout=1.0)
                return
            except grpc.RpcError as exc:
                last = exc
            finally:
                channel.close()
        time.sleep(0.1)
    raise AssertionError(f"etcd at {endpoints} did not become ready within {timeout} s: {last}")


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Until something accepts TCP connections on ``port`` (TLS members: the test then talks TLS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class EtcdMember:
    """One etcd process. ``start()`` (re)starts it with the same data dir and ports."""

    data_dir: Path
    name: str = field(default_factory=lambda: f"m{next(_names)}")
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    initial_cluster: str = ""
    cluster_token: str = "marblekeep-test"
    proc: subprocess.Popen[bytes] | None = None
    #: (CA file, server certificate file, server key file): clients must use TLS with a client
    #: certificate signed by that CA.
    tls: tuple[Path, Path, Path] | None = None

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, *, wait: bool = True) -> EtcdMember:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the process
        argv = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            ca, cert, key = self.tls
            argv += ["--cert-file", str(cert), "--key-file", str(key), "--client-cert-auth",
                     "--trusted-ca-file", str(ca)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait and self.tls is None:
            wait_ready([self.target])
        elif wait:
            wait_port(self.client_port)
        return self

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def config(self, prefix: str | None = None, **kwargs: object) -> EtcdConfig:
        return EtcdConfig(
            (EtcdEndpoint("127.0.0.1", self.client_port),),
            prefix=prefix or unique_prefix(),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    """``size`` members on loopback forming one cluster."""

    base: Path
    size: int = 3
    members: list[EtcdMember] = field(default_factory=list)

    def start(self) -> EtcdCluster:
        token = f"cluster-{uuid.uuid4().hex[:8]}"
        self.members = [EtcdMember(self.base / f"member{i}", cluster_token=token) for i in range(self.size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial
            member.start(wait=False)
        wait_ready([m.target for m in self.members], timeout=60)
        return self

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def config(self, prefix: str | None = None, **kwargs: object) -> EtcdConfig:
        return EtcdConfig(
            tuple(EtcdEndpoint("127.0.0.1", m.client_port) for m in self.members),
            prefix=prefix or unique_prefix(),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(m.target for m in self.members)


def raw_range(member: EtcdMember, prefix: str) -> dict[bytes, bytes]:
    """Everything etcd holds under ``prefix`` (keys without the prefix), read with a plain gRPC client."""
    channel = grpc.insecure_channel(member.target, options=[("grpc.max_receive_message_length", -1)])
    try:
        key = prefix.encode()
        end = key[:-1] + bytes([key[-1] + 1])
        response = rpc.KVStub(channel).Range(rpc.RangeRequest(key=key, range_end=end), timeout=10)
        return {bytes(kv.key)[len(key) :]: bytes(kv.value) for kv in response.kvs}
    finally:
        channel.close()
