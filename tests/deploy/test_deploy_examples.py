"""Issue 12 item 13: the deployment templates under examples/deploy/ parse, agree with each other
and with the Coordinator's command line, and keep their security decisions.

Nothing here runs on SGX hardware (there is none on this machine): the Gramine manifest template is
rendered with simple substitution and parsed as TOML; the systemd unit is checked by
``systemd-analyze verify`` (Debian package ``systemd``, installed by .ci/run) and by a small parser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from marblekeep.cli.coordinator_cmd import coordinator
from testsupport import REPO_ROOT

DEPLOY = REPO_ROOT / "examples" / "deploy"
TEMPLATE = DEPLOY / "marblekeep-coordinator.manifest.template"
UNIT = DEPLOY / "marblekeep-coordinator.service"
GUIDE = REPO_ROOT / "docs" / "deployment.md"

#: Values for the template's expressions (what gramine-manifest's Jinja2 would produce).
VALUES = {
    "log_level": "error",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "python_executable": "/usr/bin/python3.11",
    "python_stdlib": "/usr/lib/python3.11",
    "venv": "/opt/marblekeep/venv",
    "site_packages": "/opt/marblekeep/venv/lib/python3.11/site-packages",
    "seal_dir": "/var/lib/marblekeep",
    "isvprodid": "1",
    "isvsvn": "1",
    "gramine.runtimedir()": "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
    "gramine.libos": "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
}


def render(text: str, values: dict[str, str]) -> str:
    assert "{%" not in text, "the template must stay renderable by simple substitution"

    def value(match: re.Match[str]) -> str:
        expr = match.group(1)
        assert expr in values, f"unknown template expression {{{{ {expr} }}}}"
        return values[expr]

    return re.sub(r"\{\{\s*(.+?)\s*\}\}", value, text)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return tomllib.loads(render(TEMPLATE.read_text(), VALUES))


def _envvars_of_coordinator() -> dict[str, click.Option]:
    options = [p for p in coordinator.params if isinstance(p, click.Option)]
    return {p.envvar: p for p in options if isinstance(p.envvar, str)}


def test_the_template_renders_to_valid_toml_with_every_expression_known(manifest: dict[str, Any]) -> None:
    used = set(re.findall(r"\{\{\s*(.+?)\s*\}\}", TEMPLATE.read_text()))
    assert used == set(VALUES), "VALUES and the template's expressions differ"
    assert manifest["libos"]["entrypoint"] == VALUES["python_executable"]


def test_production_settings(manifest: dict[str, Any]) -> None:
    sgx = manifest["sgx"]
    assert sgx["debug"] is False
    assert sgx["remote_attestation"] == "dcap"  # the Coordinator's own quote and /dev/attestation/keys
    assert sgx["isvprodid"] == 1 and sgx["isvsvn"] == 1
    assert manifest["sys"]["enable_sigterm_injection"] is True  # systemd's stop reaches the Coordinator
    argv = manifest["loader"]["argv"]
    assert argv[-1] == "coordinator"
    assert not any(a.startswith("--") for a in argv), "argv is fixed: no --simulation, --allow-rollback"
    assert "insecure__use_cmdline_argv" not in manifest["loader"]
    assert "insecure__use_host_env" not in manifest["loader"]


def test_the_environment_passes_through_only_harmless_coordinator_options(manifest: dict[str, Any]) -> None:
    env = manifest["loader"]["env"]
    passthrough = {name for name, v in env.items() if isinstance(v, dict) and v.get("passthrough")}
    options = _envvars_of_coordinator()
    assert passthrough <= set(options), passthrough - set(options)
    assert passthrough == {
        "EDG_COORDINATOR_CLIENT_ADDR",
        "EDG_COORDINATOR_MESH_ADDR",
        "EDG_COORDINATOR_DNS_NAMES",
        "EDG_COORDINATOR_PROMETHEUS_ADDR",
        "EDG_LOG_FORMAT",
        "MARBLEKEEP_PCCS_URL",
    }
    for forbidden in ("MARBLEKEEP_SIMULATION", "EDG_DEBUG_LOGGING", "EDG_COORDINATOR_SEAL_DIR"):
        assert forbidden in options  # real options of the command ...
        assert forbidden not in passthrough  # ... that the host must not choose
    assert not any(name.startswith("PYTHON") for name in passthrough)
    # The seal directory is fixed and is the mount point of the host state directory.
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    seal = mounts[env["EDG_COORDINATOR_SEAL_DIR"]]
    assert seal["uri"] == f"file:{VALUES['seal_dir']}"


def test_state_and_temporary_files(manifest: dict[str, Any]) -> None:
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    seal = mounts[manifest["loader"]["env"]["EDG_COORDINATOR_SEAL_DIR"]]
    assert seal.get("type", "chroot") == "chroot"  # the store encrypts itself (guide: why not "encrypted")
    assert mounts["/tmp"]["type"] == "tmpfs"  # temporary files stay in enclave memory
    trusted = manifest["sgx"]["trusted_files"]
    allowed = manifest["sgx"]["allowed_files"]
    assert allowed == [f"file:{VALUES['seal_dir']}/"]
    for needed in ("python_executable", "venv", "python_stdlib", "gramine.libos"):
        assert any(t.startswith(f"file:{VALUES[needed]}") for t in trusted), needed
    assert not any(t.startswith(f"file:{VALUES['seal_dir']}") for t in trusted)


def test_the_fixed_command_line_runs_the_coordinator_and_refuses_without_a_tee(
    manifest: dict[str, Any], tmp_path: Path
) -> None:
    """The manifest's argv and environment, run with this machine's Python: the real
    ``coordinator`` command starts, finds no /dev/attestation and refuses (no silent simulation)."""
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    values = dict(VALUES, site_packages=site_packages, seal_dir=str(tmp_path / "state"))
    rendered = tomllib.loads(render(TEMPLATE.read_text(), values))
    env = {k: v for k, v in rendered["loader"]["env"].items() if isinstance(v, str)}
    env.pop("LD_LIBRARY_PATH")
    env["EDG_COORDINATOR_SEAL_DIR"] = str(tmp_path / "state")
    env["PATH"] = os.environ.get("PATH", "/usr/bin")
    argv = [sys.executable, *rendered["loader"]["argv"][1:]]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "no TEE found" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ systemd


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None and "=" in line, f"not a unit line: {line!r}"
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def test_the_unit_is_hardened_and_agrees_with_the_manifest(manifest: dict[str, Any]) -> None:
    unit = parse_unit(UNIT.read_text())
    service = dict(unit["Service"])
    for key, value in {
        "DynamicUser": "yes",
        "StateDirectory": "marblekeep",
        "StateDirectoryMode": "0700",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "KillSignal": "SIGTERM",
        "RestartPreventExitStatus": "2",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == value, key
    devices = [v for k, v in unit["Service"] if k == "DeviceAllow"]
    assert devices == ["/dev/sgx_enclave rw", "/dev/sgx_provision rw"]
    assert service["ExecStart"].split()[0] == "/usr/bin/gramine-sgx"
    # The unit's Environment= names are exactly the manifest's passthrough variables.
    names = {v.split("=", 1)[0] for k, v in unit["Service"] if k == "Environment"}
    env = manifest["loader"]["env"]
    assert names == {n for n, v in env.items() if isinstance(v, dict) and v.get("passthrough")}
    # StateDirectory=marblekeep is /var/lib/marblekeep: the host side of the seal mount.
    assert VALUES["seal_dir"] == "/var/lib/" + service["StateDirectory"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run installs it)")
    # verify also checks that ExecStart's binary exists: point it at one that does (gramine-sgx is
    # not installed here); every other line is verified as written.
    text = UNIT.read_text().replace("/usr/bin/gramine-sgx", shutil.which("true") or "/bin/true")
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert complaints == []


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run installs it)")
    text = UNIT.read_text().replace("/usr/bin/gramine-sgx", shutil.which("true") or "/bin/true")
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=stricter"))
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert any(UNIT.name in line for line in result.stderr.splitlines())


def test_the_guide_names_the_files_and_what_was_not_tested() -> None:
    guide = GUIDE.read_text()
    for name in (TEMPLATE.name, UNIT.name, "/dev/attestation/keys", "configfs-tsm"):
        assert name in guide, name
    assert "What has been tested" in guide
    readme = (REPO_ROOT / "README.md").read_text()
    assert "docs/deployment.md" in readme
