"""Premain: configuration, UUID file, activation with retries (in-process transport), applying Parameters."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import secrets
import stat
import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from marble_fake_coordinator import FakeMarbleApi

from marblekeep.cli.main import main
from marblekeep.errors import ActivationRefused, ConfigError, SealError, StateError
from marblekeep.marble import premain
from marblekeep.marble.evidence import SimulationIssuer
from marblekeep.marble.premain import (
    MarbleConfig,
    activate,
    apply_parameters,
    config_from_env,
    coordinator_url,
    load_or_create_uuid,
    make_config,
    resolve_command,
)
from marblekeep.marble.protocol import (
    ActivationRequest,
    MarbleParameters,
    parse_activation_request,
    seal_parameters,
)

SECRET = b"s3cr3t-VALUE-that-must-never-be-logged"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- configuration


def test_config_defaults_from_env() -> None:
    cfg = config_from_env({"EDG_MARBLE_TYPE": "backend"})
    assert cfg == MarbleConfig(marble_type="backend")
    assert cfg.coordinator_addr == "localhost:2001"
    assert cfg.dns_names == ("localhost",)
    assert cfg.uuid_file == Path("uuid")
    assert cfg.activation_timeout == 120
    assert cfg.attestation_root == Path("/dev/attestation")
    assert cfg.coordinator_ca_file is None


def test_config_all_variables() -> None:
    cfg = config_from_env({
        "EDG_MARBLE_TYPE": "frontend",
        "EDG_MARBLE_COORDINATOR_ADDR": "coordinator-mesh-api.ns:2001",
        "EDG_MARBLE_DNS_NAMES": "frontend, frontend.ns,,frontend.ns.svc.cluster.local",
        "EDG_MARBLE_UUID_FILE": "/frontend-uid/uuid-file",
        "MARBLEKEEP_ACTIVATION_TIMEOUT": "2.5",
        "MARBLEKEEP_ATTESTATION_ROOT": "/tmp/att",
        "MARBLEKEEP_COORDINATOR_CA_FILE": "/etc/ca.pem",
    })
    assert cfg.dns_names == ("frontend", "frontend.ns", "frontend.ns.svc.cluster.local")
    assert cfg.uuid_file == Path("/frontend-uid/uuid-file")
    assert cfg.activation_timeout == 2.5
    assert cfg.attestation_root == Path("/tmp/att")
    assert cfg.coordinator_ca_file == Path("/etc/ca.pem")


def test_missing_marble_type_is_a_clear_usage_error() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env({})
    assert "EDG_MARBLE_TYPE is not set" in info.value.message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf"])
def test_bad_timeout(value: str) -> None:
    with pytest.raises(ConfigError, match="MARBLEKEEP_ACTIVATION_TIMEOUT must be a positive number"):
        make_config(marble_type="t", activation_timeout=value)


@pytest.mark.parametrize(
    ("addr", "url"),
    [
        ("localhost:2001", "https://localhost:2001"),
        ("10.0.0.1:9", "https://10.0.0.1:9"),
        ("[::1]:2001", "https://[::1]:2001"),
        ("coordinator", "https://coordinator:2001"),
        ("https://c.example:7000/", "https://c.example:7000"),
    ],
)
def test_coordinator_url(addr: str, url: str) -> None:
    assert coordinator_url(addr) == url


@pytest.mark.parametrize("addr", ["http://c:2001", "c:notaport", "c:2001/path", ":2001"])
def test_bad_coordinator_addr(addr: str) -> None:
    with pytest.raises(ConfigError, match="EDG_MARBLE_COORDINATOR_ADDR"):
        coordinator_url(addr)


# --------------------------------------------------------------------------- UUID file


def test_uuid_created_0600_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deep" / "uuid"
    first = load_or_create_uuid(path)
    assert first.version == 4
    assert path.read_text() == str(first)
    assert mode(path) == 0o600
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / "deep") == 0o700
    assert load_or_create_uuid(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["uuid"]  # no temporary file left behind


def test_uuid_file_written_by_others_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "uuid"
    pod_uid = "6B1E3F2A-0C4D-4E5F-8A9B-0C1D2E3F4A5B"
    path.write_text(pod_uid + "\n")
    assert load_or_create_uuid(path) == uuid.UUID(pod_uid)


@pytest.mark.parametrize("content", [b"", b"not-a-uuid", b"\xff\xfe", b"1234"])
def test_malformed_uuid_file_is_a_clear_error_and_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "uuid"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"does not hold a UUID; fix or delete it.*new seal key") as info:
        load_or_create_uuid(path)
    assert info.value.exit_code == 2
    assert path.read_bytes() == content


def test_concurrent_first_start_agrees_on_one_uuid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "uuid"
    winner = uuid.uuid4()
    real_link = os.link

    def racing_link(src: object, dst: object) -> None:
        path.write_text(str(winner))  # another process finished first
        real_link(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(premain.os, "link", racing_link)
    assert load_or_create_uuid(path) == winner
    assert path.read_text() == str(winner)


def test_uuid_without_hard_links_falls_back_to_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(premain.os, "link", no_link)
    path = tmp_path / "uuid"
    value = load_or_create_uuid(path)
    assert path.read_text() == str(value)
    assert mode(path) == 0o600


def test_unreadable_or_unwritable_uuid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot read the UUID file .*Not a directory"):
        load_or_create_uuid(blocker / "uuid")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(premain.os, "fsync", failing_fsync)
    with pytest.raises(ConfigError, match=r"cannot create the UUID file .*Input/output error"):
        load_or_create_uuid(tmp_path / "uuid")
    assert list(tmp_path.iterdir()) == [blocker]  # the temporary file is cleaned up


# --------------------------------------------------------------------------- activation (in-process)


class Recorder:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run_activate(
    api: FakeMarbleApi, tmp_path: Path, *, timeout: float = 60, failures: int = 0, jitter: float = 1.0
) -> tuple[MarbleParameters, Recorder]:
    rec = Recorder()
    left = [failures]

    def handler(request: httpx.Request) -> httpx.Response:
        if left[0] > 0:
            left[0] -= 1
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        status, body = api.handle(request.method, request.url.path, request.content)
        return httpx.Response(status, content=body)

    cfg = MarbleConfig(
        marble_type="backend", coordinator_addr="coordinator:2001", dns_names=("backend", "10.0.0.7"),
        uuid_file=tmp_path / "uuid", activation_timeout=timeout, attestation_root=tmp_path / "no-tee",
    )
    params = activate(
        cfg, transport=httpx.MockTransport(handler), sleep=rec.sleep, clock=rec.clock, jitter=lambda: jitter
    )
    return params, rec


def secret_params(_req: ActivationRequest) -> MarbleParameters:
    return MarbleParameters(files={"key.pem": SECRET}, env={"API_KEY": SECRET}, argv=("app", "--flag"))


def test_activate_success(tmp_path: Path) -> None:
    api = FakeMarbleApi(params=secret_params)
    params, rec = run_activate(api, tmp_path)
    assert params == secret_params(api.activations[0])
    assert rec.sleeps == []
    req = api.activations[0]
    assert req.marble_type == "backend"
    assert req.dns_names == ("backend", "10.0.0.7")
    assert str(req.uuid) == (tmp_path / "uuid").read_text()


def test_retries_while_not_ready_then_succeeds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeMarbleApi(params=secret_params, not_ready=3)
    with caplog.at_level(logging.INFO, logger="marblekeep.marble"):
        params, rec = run_activate(api, tmp_path, failures=2)
    assert params.env == {"API_KEY": SECRET}
    assert rec.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0]  # 2 connection errors, then 3 × 503; jitter fixed at 1
    assert api.challenges == 4
    assert caplog.text.count("Coordinator not ready") == 5
    assert "ConnectError: [Errno 111] Connection refused" in caplog.text
    assert "HTTP 503: cannot accept marbles in current state" in caplog.text
    assert "activated after 6 attempt(s)" in caplog.text


def test_every_attempt_uses_a_fresh_nonce_and_key(tmp_path: Path) -> None:
    api = FakeMarbleApi()
    run_activate(api, tmp_path)
    run_activate(api, tmp_path)
    a, b = api.activations
    assert a.uuid == b.uuid
    assert a.nonce != b.nonce
    assert a.hpke_public_key != b.hpke_public_key


def test_backoff_is_capped_jittered_and_bounded_by_the_timeout(tmp_path: Path) -> None:
    api = FakeMarbleApi(status_override=503)
    with pytest.raises(StateError) as info:
        run_activate(api, tmp_path, timeout=40, jitter=0.0)
    assert "attempts; last:" in info.value.message
    assert "did not activate this Marble within 40 s" in info.value.message
    assert "last: HTTP 503: scripted status 503" in info.value.message
    assert "MARBLEKEEP_ACTIVATION_TIMEOUT" in info.value.message
    assert info.value.exit_code == 1


def test_backoff_sequence(tmp_path: Path) -> None:
    api = FakeMarbleApi(status_override=409)
    rec = Recorder()

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = api.handle(request.method, request.url.path, request.content)
        return httpx.Response(status, content=body)

    cfg = MarbleConfig(marble_type="t", uuid_file=tmp_path / "uuid", activation_timeout=40,
                       attestation_root=tmp_path / "none")
    with pytest.raises(StateError):
        activate(cfg, transport=httpx.MockTransport(handler), sleep=rec.sleep, clock=rec.clock,
                 jitter=lambda: 0.0)
    # half of 0.25·2^n (jitter 0), capped at 8 s → 4 s after the cap; the last wait ends at the deadline
    assert rec.sleeps[:7] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert max(rec.sleeps) <= 8.0
    assert sum(rec.sleeps) == pytest.approx(40)


@pytest.mark.parametrize(
    ("api", "error", "needle"),
    [
        (FakeMarbleApi(refuse="reached max activations count"), ActivationRefused,
         "refused to activate this Marble: HTTP 403: reached max activations count"),
        (FakeMarbleApi(status_override=400), ActivationRefused, "HTTP 400: scripted status 400"),
        (FakeMarbleApi(status_override=500), ActivationRefused, "failed to activate this Marble: HTTP 500"),
        (FakeMarbleApi(status_override=405), ConfigError, "Marble API listens on port 2001"),
    ],
)
def test_refusals_fail_at_once(
    tmp_path: Path, api: FakeMarbleApi, error: type[Exception], needle: str
) -> None:
    rec = Recorder()

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = api.handle(request.method, request.url.path, request.content)
        return httpx.Response(status, content=body)

    cfg = MarbleConfig(marble_type="t", uuid_file=tmp_path / "uuid", attestation_root=tmp_path / "none")
    with pytest.raises(error) as info:
        activate(cfg, transport=httpx.MockTransport(handler), sleep=rec.sleep, clock=rec.clock)
    assert needle in str(info.value)
    assert rec.sleeps == []


def test_coordinator_reason_is_sanitised(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"status": "fail", "message": "no\n\x1b[31mway" + "x" * 1000})

    cfg = MarbleConfig(marble_type="t", uuid_file=tmp_path / "uuid", attestation_root=tmp_path / "none")
    with pytest.raises(ActivationRefused) as info:
        activate(cfg, transport=httpx.MockTransport(handler))
    assert "\n" not in info.value.message
    assert "\x1b" not in info.value.message
    assert len(info.value.message) < 450


def test_malformed_answers(tmp_path: Path) -> None:
    cfg = MarbleConfig(marble_type="t", uuid_file=tmp_path / "uuid", attestation_root=tmp_path / "none")

    def bad_challenge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>hello</html>")

    with pytest.raises(StateError, match="malformed challenge"):
        activate(cfg, transport=httpx.MockTransport(bad_challenge))

    api = FakeMarbleApi()

    def no_sealed(request: httpx.Request) -> httpx.Response:
        status, body = api.handle(request.method, request.url.path, request.content)
        if request.url.path.endswith("activate"):
            return httpx.Response(200, json={"status": "success", "data": {}})
        return httpx.Response(status, content=body)

    with pytest.raises(StateError, match=r"without 'data\.sealedParameters'"):
        activate(cfg, transport=httpx.MockTransport(no_sealed))


def test_parameters_sealed_for_someone_else_are_refused(tmp_path: Path) -> None:
    """An answer sealed for another request (another nonce: a relayed or replayed answer) is refused."""
    api = FakeMarbleApi(params=secret_params)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("activate"):
            req = parse_activation_request(request.content)
            other = dataclasses.replace(req, nonce=secrets.token_bytes(32))  # right key, wrong nonce
            sealed = seal_parameters(secret_params(other), other)
            body = {"status": "success", "data": {"sealedParameters": base64.b64encode(sealed).decode()}}
            return httpx.Response(200, json=body)
        status, body_bytes = api.handle(request.method, request.url.path, request.content)
        return httpx.Response(status, content=body_bytes)

    cfg = MarbleConfig(marble_type="t", uuid_file=tmp_path / "uuid", attestation_root=tmp_path / "none")
    with pytest.raises(SealError, match="cannot be opened") as info:
        activate(cfg, transport=httpx.MockTransport(handler))
    assert info.value.exit_code == 1


def test_no_secret_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeMarbleApi(params=secret_params, not_ready=1)
    with caplog.at_level(logging.DEBUG):
        params, _ = run_activate(api, tmp_path)
        apply_parameters(params, base_dir=tmp_path, environ={})
    assert caplog.records
    text = caplog.text
    assert SECRET.decode() not in text
    assert base64.b64encode(SECRET).decode() not in text


def test_simulation_issuer_is_used_without_tee(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeMarbleApi()
    with caplog.at_level(logging.WARNING, logger="marblekeep.marble"):
        run_activate(api, tmp_path)
    assert api.activations[0].evidence_type == SimulationIssuer.evidence_type
    assert "no TEE: sending simulation evidence" in caplog.text


# --------------------------------------------------------------------------- applying


def test_apply_writes_files_and_env(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    absolute = tmp_path / "abs" / "cert.pem"
    existing = work / "existing.txt"
    existing.write_bytes(b"old content that is longer")
    existing.chmod(0o644)
    environ: dict[bytes, bytes] = {b"KEEP": b"1", b"OVERRIDE": b"old"}
    params = MarbleParameters(
        files={"a/b/c.txt": b"\x00\x01binary", str(absolute): b"PEM", "existing.txt": b"new"},
        env={"OVERRIDE": b"new", "LATIN1": b"caf\xe9"},
    )
    apply_parameters(params, base_dir=work, environ=environ)
    assert (work / "a" / "b" / "c.txt").read_bytes() == b"\x00\x01binary"
    assert mode(work / "a" / "b" / "c.txt") == 0o600
    assert mode(work / "a") == 0o700
    assert mode(work / "a" / "b") == 0o700
    assert mode(work) == 0o755  # existing directories are left alone
    assert absolute.read_bytes() == b"PEM"
    assert mode(absolute.parent) == 0o700
    assert existing.read_bytes() == b"new"
    assert mode(existing) == 0o600
    assert environ == {b"KEEP": b"1", b"OVERRIDE": b"new", b"LATIN1": b"caf\xe9"}


def test_apply_sets_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MARBLEKEEP_TEST_VAR", "before")
    apply_parameters(MarbleParameters(env={"MARBLEKEEP_TEST_VAR": b"after"}), base_dir=tmp_path)
    assert os.environ["MARBLEKEEP_TEST_VAR"] == "after"
    assert os.environb[b"MARBLEKEEP_TEST_VAR"] == b"after"


def test_apply_writes_attestation_keys_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "attestation"
    order: list[str] = []
    monkeypatch.setattr(premain, "_write_file", lambda target, data, name: order.append(name))
    files = {"z.conf": b"1", f"{root}/keys/_sgx_mrenclave": b"k" * 16, "a.conf": b"2",
             f"{root}/protected_files_key": b"p"}
    apply_parameters(MarbleParameters(files=files), base_dir=tmp_path, environ={}, attestation_root=root)
    assert set(order[:2]) == {f"{root}/keys/_sgx_mrenclave", f"{root}/protected_files_key"}
    assert order[2:] == ["z.conf", "a.conf"]


def test_apply_reports_unwritable_files(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write the manifest's Files entry 'blocker/f'"):
        apply_parameters(MarbleParameters(files={"blocker/f": SECRET}), base_dir=tmp_path, environ={})


@pytest.mark.parametrize(
    ("argv", "command", "expected"),
    [
        ((), ["prog", "-x"], ("prog", ["prog", "-x"])),
        (("./marble", "serve", "--port=1"), ["python3", "ignored"],
         ("python3", ["python3", "serve", "--port=1"])),
        (("./marble", "serve"), ["python3"], ("python3", ["python3", "serve"])),
        (("/usr/bin/app", "serve"), [], ("/usr/bin/app", ["/usr/bin/app", "serve"])),
    ],
)
def test_resolve_command(argv: tuple[str, ...], command: list[str], expected: tuple[str, list[str]]) -> None:
    assert resolve_command(MarbleParameters(argv=argv), command) == expected


def test_nothing_to_run() -> None:
    with pytest.raises(ConfigError, match="nothing to run"):
        resolve_command(MarbleParameters(), [])


# --------------------------------------------------------------------------- CLI (in-process)


def test_cli_help_names_the_variables() -> None:
    result = CliRunner().invoke(main, ["marble", "run", "--help"])
    assert result.exit_code == 0
    for var in ("EDG_MARBLE_COORDINATOR_ADDR", "EDG_MARBLE_TYPE", "EDG_MARBLE_DNS_NAMES",
                "EDG_MARBLE_UUID_FILE", "MARBLEKEEP_ACTIVATION_TIMEOUT", "MARBLEKEEP_ATTESTATION_ROOT",
                "MARBLEKEEP_COORDINATOR_CA_FILE"):
        assert var in result.output
    assert "[-- CMD [ARGS...]]" in result.output


def test_cli_missing_type_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDG_MARBLE_TYPE", raising=False)
    result = CliRunner().invoke(main, ["marble", "run", "--", "true"])
    assert result.exit_code == 2
    assert "EDG_MARBLE_TYPE is not set" in result.output


def test_unknown_or_expired_challenge_is_retried_with_a_fresh_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The Coordinator forgets two challenges (as after a restart): it refuses those activations
    # with 403 and the reason "replay"; the premain starts over instead of failing (issue 11, #6).
    api = FakeMarbleApi(params=secret_params, forget_challenges=2)
    with caplog.at_level(logging.INFO, logger="marblekeep.marble"):
        params, rec = run_activate(api, tmp_path)
    assert params.env == {"API_KEY": SECRET}
    assert api.refusals == ["nonce unknown", "nonce unknown"]
    assert api.challenges == 3
    assert rec.sleeps == [0.25, 0.5]  # the usual backoff
    assert "activated after 3 attempt(s)" in caplog.text


def test_other_403_refusals_still_fail_at_once(tmp_path: Path) -> None:
    api = FakeMarbleApi(refuse="marble verification failed: unknown marble type")
    with pytest.raises(ActivationRefused, match="unknown marble type"):
        run_activate(api, tmp_path)
    assert api.challenges == 1
