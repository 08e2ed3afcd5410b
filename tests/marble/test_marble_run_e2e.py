"""`marblekeep marble run` as a real subprocess against a fake Coordinator over HTTPS on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from marble_fake_coordinator import FakeCoordinatorServer, FakeMarbleApi

from marblekeep.marble.protocol import ActivationRequest, MarbleParameters

pytestmark = pytest.mark.slow

SECRET = b"e2e-SECRET-value-never-logged-42"
FILE_SECRET = b"-----BEGIN PRIVATE KEY-----\nZmFrZS1rZXk=\n-----END PRIVATE KEY-----\n"

# The workload: prints what it received as JSON on stdout.
CHILD = r"""
import json, os, stat, sys
out = {"argv": sys.argv, "env": {k: os.environ.get(k) for k in ("API_KEY", "GREETING", "KEEP_ME")},
       "files": {}}
for p in os.environ["CHECK_PATHS"].split(os.pathsep):
    st = os.stat(p)
    out["files"][p] = {"data": open(p, "rb").read().decode(), "mode": stat.S_IMODE(st.st_mode)}
print(json.dumps(out))
"""


def marblekeep_command() -> list[str]:
    script = Path(sys.executable).parent / "marblekeep"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from marblekeep.cli.main import main; sys.exit(main())"]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def server(ca: trustme.CA) -> AsyncIterator[FakeCoordinatorServer]:
    srv = FakeCoordinatorServer(FakeMarbleApi(), ca)
    yield srv
    await srv.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


#: Bound on a ``marble run`` subprocess: only a hung run hits it (the tests never measure time).
RUN_BOUND = 120.0


def marble_env(work: Path, addr: str, timeout: str, extra_env: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDG_", "MARBLEKEEP_"))}
    env.update(
        {
            "EDG_MARBLE_TYPE": "backend",
            "EDG_MARBLE_COORDINATOR_ADDR": addr,
            "EDG_MARBLE_UUID_FILE": str(work.parent / "state" / "uuid"),
            "MARBLEKEEP_ATTESTATION_ROOT": str(work.parent / "no-tee"),
            "MARBLEKEEP_ACTIVATION_TIMEOUT": timeout,
            "KEEP_ME": "host-value",
        }
    )
    env.update(extra_env or {})
    return env


async def start_marble(
    work: Path, addr: str, args: list[str], *, timeout: str = "20", extra_env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *marblekeep_command(), "marble", "run", *args,
        cwd=work, env=marble_env(work, addr, timeout, extra_env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run_marble(
    work: Path, addr: str, args: list[str], *, timeout: str = "20", extra_env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await start_marble(work, addr, args, timeout=timeout, extra_env=extra_env)
    out, err = await asyncio.wait_for(proc.communicate(), RUN_BOUND)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_no_secret(text: str) -> None:
    assert SECRET.decode() not in text
    assert "ZmFrZS1rZXk" not in text
    assert "PRIVATE KEY" not in text


async def test_run_applies_parameters_execs_and_reuses_the_uuid(
    server: FakeCoordinatorServer, ca: trustme.CA, work: Path, tmp_path: Path
) -> None:
    abs_file = tmp_path / "abs" / "dir" / "key.pem"
    argv_by_run: list[tuple[str, ...]] = [
        (),
        ("ignored-name", "-c", CHILD, "from-manifest"),
        (sys.executable, "-c", CHILD, "argv-only"),
    ]

    def params(_req: ActivationRequest) -> MarbleParameters:
        return MarbleParameters(
            files={"conf/app.conf": b"greeting = hello\n", str(abs_file): FILE_SECRET},
            env={"API_KEY": SECRET, "GREETING": b"hello"},
            argv=argv_by_run[len(server.api.activations) - 1],
        )

    server.api.params = params
    await server.start()
    check = {"CHECK_PATHS": os.pathsep.join([str(work / "conf" / "app.conf"), str(abs_file)])}

    # 1. no Argv in the manifest: the command line runs as given
    rc, out, err = await run_marble(
        work, server.addr, ["--", sys.executable, "-c", CHILD, "cli-arg"], extra_env=check
    )
    assert rc == 0, err
    got = json.loads(out)
    assert got["argv"] == ["-c", "cli-arg"]
    assert got["env"] == {"API_KEY": SECRET.decode(), "GREETING": "hello", "KEEP_ME": "host-value"}
    assert got["files"][str(work / "conf" / "app.conf")] == {"data": "greeting = hello\n", "mode": 0o600}
    assert got["files"][str(abs_file)] == {"data": FILE_SECRET.decode(), "mode": 0o600}
    assert stat.S_IMODE((work / "conf").stat().st_mode) == 0o700
    assert stat.S_IMODE(abs_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "abs").stat().st_mode) == 0o700
    uuid_file = tmp_path / "state" / "uuid"
    assert stat.S_IMODE(uuid_file.stat().st_mode) == 0o600
    assert str(server.api.activations[0].uuid) == uuid_file.read_text()
    assert "no TEE: sending simulation evidence" in err
    assert_no_secret(err)

    # 2. Argv in the manifest replaces the command line's arguments; CMD stays the program.
    #    This run also authenticates the Coordinator with its CA.
    ca_file = tmp_path / "coordinator-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    rc, out, err = await run_marble(
        work,
        server.addr,
        ["--", sys.executable, "-c", "raise SystemExit(9)", "cli-arg"],
        extra_env={**check, "MARBLEKEEP_COORDINATOR_CA_FILE": str(ca_file)},
    )
    assert rc == 0, err
    assert json.loads(out)["argv"] == ["-c", "from-manifest"]
    assert "not authenticating the Coordinator" not in err
    assert_no_secret(err)

    # 3. no command: Argv[0] is the program
    rc, out, err = await run_marble(work, server.addr, [], extra_env=check)
    assert rc == 0, err
    assert json.loads(out)["argv"] == ["-c", "argv-only"]

    assert len(server.api.activations) == 3
    assert len({a.uuid for a in server.api.activations}) == 1  # the UUID file is reused
    assert len({a.hpke_public_key for a in server.api.activations}) == 3


async def test_run_retries_until_the_coordinator_answers(server: FakeCoordinatorServer, work: Path) -> None:
    server.api.not_ready = 1  # after it starts listening, it is not ready once more
    proc = await start_marble(
        work, server.addr, ["--", sys.executable, "-c", "print('workload ran')"], timeout="600"
    )
    assert proc.stderr is not None and proc.stdout is not None
    seen: list[bytes] = []

    async def refused_once() -> None:  # nothing listens yet: the Marble's connection is refused
        while b"Coordinator not ready (ConnectError" not in (line := await proc.stderr.readline()):  # type: ignore[union-attr]
            assert line, b"".join(seen).decode()
            seen.append(line)
        seen.append(line)

    await asyncio.wait_for(refused_once(), RUN_BOUND)
    await server.start()  # only now (an event, not a sleep)
    out_b, err_rest = await asyncio.wait_for(proc.communicate(), RUN_BOUND)
    rc, out, err = proc.returncode, out_b.decode(), (b"".join(seen) + err_rest).decode()
    assert rc == 0, err
    assert out.strip() == "workload ran"
    assert "Coordinator not ready (ConnectError" in err
    assert "Coordinator not ready (HTTP 503: cannot accept marbles in current state)" in err
    assert "activated after" in err


async def test_run_gives_up_after_the_timeout(server: FakeCoordinatorServer, work: Path) -> None:
    rc, out, err = await run_marble(
        work, server.addr, ["--", sys.executable, "-c", "print('must not run')"], timeout="1.5"
    )
    assert rc == 1
    assert out == ""
    assert "did not activate this Marble within 1.5 s" in err
    assert "MARBLEKEEP_ACTIVATION_TIMEOUT" in err
    assert "Traceback" not in err


async def test_run_refusal_fails_at_once_with_the_reason(server: FakeCoordinatorServer, work: Path) -> None:
    server.api.refuse = "reached max activations count"
    await server.start()
    # a run that retried instead would wait out the 600 s activation timeout and hit RUN_BOUND
    rc, out, err = await run_marble(
        work, server.addr, ["--", sys.executable, "-c", "print('must not run')"], timeout="600"
    )
    assert rc == 1
    assert out == ""
    assert "refused to activate this Marble: HTTP 403: reached max activations count" in err
    assert "retry" not in err
    assert server.api.challenges == 1


async def test_run_with_the_wrong_coordinator_ca_fails_at_once(
    server: FakeCoordinatorServer, work: Path, tmp_path: Path
) -> None:
    await server.start()
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    rc, _, err = await run_marble(
        work, server.addr, ["--", sys.executable, "-c", "pass"], timeout="600",
        extra_env={"MARBLEKEEP_COORDINATOR_CA_FILE": str(other)},
    )  # fmt: skip
    assert rc == 1
    assert "does not verify against MARBLEKEEP_COORDINATOR_CA_FILE" in err
    assert "retry" not in err
    assert server.api.challenges == 0


async def test_run_command_not_found_and_usage(server: FakeCoordinatorServer, work: Path) -> None:
    await server.start()
    rc, _, err = await run_marble(work, server.addr, ["--", "/nonexistent/program"])
    assert rc == 127
    assert "command not found" in err
    rc, _, err = await run_marble(work, server.addr, [], extra_env={"EDG_MARBLE_TYPE": ""})
    assert rc == 2
    assert "EDG_MARBLE_TYPE is not set" in err
