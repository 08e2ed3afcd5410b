"""Issue 4 "Done when": SIGKILL a real Coordinator at random moments, 200 times, during a loop of
writes; after every kill the state loads and every write the API acknowledged is present.

The Coordinator serves HTTPS on loopback (Client API and Marble API) over the sealed SQLite
state; it is started by a fork server (e2e_crash_server.py) so that 200 starts stay quick, and
each start is a real one (the state is opened and verified, TLS credentials made,
listeners bound). The test process writes through the APIs as fast as it can:

* activations of a ``MaxActivations`` Marble type (each success increments a persisted counter),
  spoken with the protocol module directly (challenge, binding, simulation evidence);
* user-defined secret uploads (``POST /api/v2/secrets`` with a manifest user's certificate).

A timer SIGKILLs the Coordinator at a random moment after the round's first acknowledged write, so
that every kill hits a busy Coordinator however loaded the machine is (10 % of the kills land during
its start-up instead). The test waits on events (the log line, the first acknowledgement), never
on a time budget. Then:

1. the state on disk opens (sealed store verified, deployment decoded) and the counter equals the
   acknowledged activations, or that plus the one in flight; each secret holds its acknowledged
   value, or the value of the upload in flight;
2. the Coordinator is started again on it and must come up; its API then returns exactly the
   acknowledged secret values.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2e_state_support import Site, make_user

from harness import simulation_activation_request, writer_manifest_doc
from marblekeep.core.records import deployment_from_records
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    encode_activation_request,
    parse_challenge_response,
)
from marblekeep.store import Opened, SimulationKeyFileProvider, SQLiteStore, open_sealed_store

pytestmark = pytest.mark.slow

SERVER = Path(__file__).with_name("e2e_crash_server.py")
KILLS = 200
SECRETS = ("s0", "s1", "s2", "s3")
COUNTED = "counted"


def manifest(admin_pem: str) -> dict[str, object]:
    return writer_manifest_doc(admin_pem, COUNTED, SECRETS)


@dataclass
class Acknowledged:
    """What the API acknowledged, and the one write that may be in flight when the kill lands."""

    activations: int = 0
    activation_in_flight: bool = False
    secrets: dict[str, bytes] = field(default_factory=dict)
    secret_in_flight: tuple[str, bytes] | None = None
    writes: int = 0
    landed_in_flight: int = 0  # writes that committed although the kill came before the answer


class ForkServer:
    def __init__(self, site: Site) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(site.seal_dir), site.client_addr, site.mesh_addr],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=site.env,
            cwd=site.workdir,
        )

    def start(self, out: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"run {out}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def reaped(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "done\n"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=20)


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_started(out: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace") if out.exists() else ""
        if "coordinator started" in text:
            return
        if "Traceback" in text:
            raise AssertionError(f"the Coordinator did not start:\n{text}")
        time.sleep(0.002)
    raise AssertionError(f"the Coordinator did not start in time:\n{out.read_text(errors='replace')}")


def activate(mesh: httpx.Client, ack: Acknowledged) -> None:
    nonce = parse_challenge_response(mesh.post(CHALLENGE_PATH, content=b"{}").content)
    request = simulation_activation_request(COUNTED, nonce)
    ack.activation_in_flight = True
    response = mesh.post(ACTIVATE_PATH, content=encode_activation_request(request))
    assert response.status_code == 200, response.text
    ack.activations += 1
    ack.activation_in_flight = False


def write_secret(api: httpx.Client, ack: Acknowledged, rnd: random.Random) -> None:
    name = rnd.choice(SECRETS)
    value = f"{name}-{ack.writes}-{rnd.randrange(1 << 30)}".encode()
    ack.secret_in_flight = (name, value)
    body = {"secrets": {name: {"Key": base64.b64encode(value).decode()}}}
    response = api.post("/api/v2/secrets", json=body)
    assert response.status_code == 200, response.text
    ack.secrets[name] = value
    ack.secret_in_flight = None


def user_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS as the manifest user (client certificate); the test does not authenticate its own server."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx


def write_until_killed(
    site: Site, user_tls: ssl.SSLContext, ack: Acknowledged, rnd: random.Random, first_ack: Callable[[], None]
) -> None:
    """Write until the Coordinator is gone; ``first_ack`` runs once the first write was acknowledged."""
    armed = False
    with (
        httpx.Client(base_url=f"https://{site.client_addr}", verify=user_tls, timeout=60) as api,
        httpx.Client(base_url=f"https://{site.mesh_addr}", verify=False, timeout=60) as mesh,
    ):
        while True:
            try:
                if rnd.random() < 0.5:
                    activate(mesh, ack)
                else:
                    write_secret(api, ack, rnd)
            except httpx.TransportError:
                return  # the Coordinator is gone (the kill landed)
            ack.writes += 1
            if not armed:
                armed = True
                first_ack()


async def check_state_on_disk(site: Site, ack: Acknowledged, kill: int) -> None:
    """The state opens, and holds every acknowledged write (plus, at most, the one in flight)."""
    result = await open_sealed_store(
        await SQLiteStore.open(site.db), SimulationKeyFileProvider(site.kek_file)
    )
    assert isinstance(result, Opened), f"kill {kill}: the state does not load: {result.reason.message}"
    try:
        dep = deployment_from_records(await result.store.list(""))
    finally:
        await result.store.close()
    assert dep is not None, f"kill {kill}: the deployment is gone"
    counter = dep.activations.get(COUNTED, 0)
    allowed = {ack.activations, ack.activations + 1} if ack.activation_in_flight else {ack.activations}
    assert counter in allowed, f"kill {kill}: counter {counter}, acknowledged {ack.activations}"
    ack.landed_in_flight += counter - ack.activations
    ack.activations, ack.activation_in_flight = counter, False
    for name in SECRETS:
        stored = dep.secrets[name].private
        acknowledged = ack.secrets.get(name, b"")
        if stored != acknowledged:
            assert ack.secret_in_flight == (name, stored), (
                f"kill {kill}: secret {name} lost its acknowledged value"
            )
            ack.secrets[name] = stored
            ack.landed_in_flight += 1
    ack.secret_in_flight = None


def api_secrets(site: Site, user_tls: ssl.SSLContext) -> dict[str, bytes]:
    params = [("s", name) for name in SECRETS]
    url = f"https://{site.client_addr}/api/v2/secrets"
    response = httpx.get(url, params=params, verify=user_tls, timeout=10)
    assert response.status_code == 200, response.text
    data = response.json()["data"]["secrets"]
    return {name: base64.b64decode(data[name]["Private"] or "") for name in SECRETS}


async def test_sigkill_at_random_moments_never_loses_an_acknowledged_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="marblekeep")
    site = Site(tmp_path / "crash")
    admin = make_user(site, "admin")
    user_tls = user_context(admin.cert, admin.key)
    rnd = random.Random(20261127)
    ack = Acknowledged()
    server = ForkServer(site)
    startup_kills = busy_kills = 0
    try:
        out = site.path("coordinator-0.log")
        pid = server.start(out)
        wait_started(out, time.monotonic() + 30)
        body = {"manifest": base64.b64encode(json.dumps(manifest(admin.cert_pem)).encode()).decode()}
        response = httpx.post(
            f"https://{site.client_addr}/api/v2/manifest", json=body, verify=False, timeout=30
        )
        assert response.status_code == 200, response.text
        for kill in range(KILLS):
            if kill > 0:
                out = site.path(f"coordinator-{kill % 2}.log")
                out.unlink(missing_ok=True)  # wait_started must not see the last run's output
                pid = server.start(out)
                if rnd.random() < 0.1:  # somewhere in start-up: opening the state, TLS, listeners
                    time.sleep(rnd.uniform(0.0, 0.08))
                    os.kill(pid, signal.SIGKILL)
                    server.reaped()
                    startup_kills += 1
                    await check_state_on_disk(site, ack, kill)
                    continue
                wait_started(out, time.monotonic() + 30)
                assert api_secrets(site, user_tls) == {n: ack.secrets.get(n, b"") for n in SECRETS}, (
                    f"kill {kill}: the restarted Coordinator serves other secret values"
                )
            timer = threading.Timer(rnd.uniform(0.0, 0.12), sigkill, (pid,))
            write_until_killed(site, user_tls, ack, rnd, timer.start)
            if timer.ident is None:  # gone before acknowledging anything (not expected): end the round
                sigkill(pid)
            else:
                timer.join()
            busy_kills += 1
            server.reaped()
            await check_state_on_disk(site, ack, kill)
    finally:
        sigkill(pid)
        server.close()
    print(
        f"{KILLS} kills ({startup_kills} during start-up), {ack.writes} acknowledged writes,"
        f" {ack.landed_in_flight} unacknowledged writes that landed"
    )
    assert startup_kills + busy_kills == KILLS and ack.writes >= busy_kills  # each busy kill followed an ack
    assert ack.activations > KILLS // 4 and len(ack.secrets) == len(SECRETS)
