"""The governance CLI against an in-process Coordinator: secret get/set, manifest update
apply/acknowledge/cancel/get, manifest get --display-update, log get and log verify (detecting
deleted, reordered and edited entries, in an exported file and in the Coordinator's store)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import RunningCoordinator, b64, changed, governance_manifest_bytes, make_user, user
from marblekeep.cli.main import main
from marblekeep.store.kek import SimulationKeyFileProvider
from marblekeep.store.sealed import Opened, open_sealed_store
from marblekeep.store.sqlite import SQLiteStore

KEY16 = bytes(range(16))


class Cli:
    """Runs ``marblekeep`` commands against one Coordinator, trusting it with --insecure (it runs
    in simulation) and pinning its root in a file under the test's directory."""

    def __init__(self, rc: RunningCoordinator, tmp: Path) -> None:
        self.rc = rc
        self.tmp = tmp
        self.pin = tmp / "pinned-root.pem"
        self.users = tmp / "users"
        self.users.mkdir(exist_ok=True)

    def trust(self) -> list[str]:
        return ["--insecure", "--coordinator-cert", str(self.pin)]

    def who(self, name: str) -> list[str]:
        cert, key = user(name).files(self.users)
        return ["-c", str(cert), "-k", str(key)]

    def __call__(self, *args: str, ok: bool = True) -> Result:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output + result.stderr
        return result

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture
def cli(running: RunningCoordinator, tmp_path: Path) -> Cli:
    return Cli(running, tmp_path)


def test_secret_set_and_get(cli: Cli) -> None:
    addr = cli.rc.addr
    upload = cli.file(
        "s.json", json.dumps({"user_key": {"Key": b64(KEY16)}, "user_plain": {"Key": b64(b"hi")}}).encode()
    )
    result = cli("secret", "set", upload, addr, *cli.who("alice"), *cli.trust())
    assert "Secrets set: user_key, user_plain" in result.stdout
    shown = cli("secret", "get", "user_key", "user_plain", addr, *cli.who("bob"), *cli.trust()).stdout
    assert f"Value (hex): {KEY16.hex()}" in shown and "Value:       hi" in shown
    out = cli.tmp / "out.json"
    cli("secret", "get", "user_key", addr, *cli.who("alice"), *cli.trust(), "-o", str(out))
    assert json.loads(out.read_text())["user_key"]["Private"] == b64(KEY16)
    assert out.stat().st_mode & 0o077 == 0


def test_secret_set_from_pem(cli: Cli) -> None:
    owner = make_user("webserver")
    key = serialization.load_pem_private_key(owner.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pem = cli.file("tls.pem", owner.cert_pem + sec1)
    cli("secret", "set", pem, cli.rc.addr, "--from-pem", "user_cert", *cli.who("alice"), *cli.trust())
    shown = cli("secret", "get", "user_cert", cli.rc.addr, *cli.who("alice"), *cli.trust()).stdout
    assert owner.cert_pem.decode().strip() in shown
    assert "-----BEGIN PRIVATE KEY-----" in shown


def test_secret_errors_are_one_line_with_exit_codes(cli: Cli) -> None:
    addr = cli.rc.addr
    upload = cli.file("s.json", json.dumps({"user_key": {"Key": b64(b"short")}}).encode())
    bad = cli("secret", "set", upload, addr, *cli.who("alice"), *cli.trust(), ok=False)
    assert bad.exit_code == 1 and "user_key.Key" in bad.stderr and "Traceback" not in bad.output
    denied = cli("secret", "get", "user_key", addr, *cli.who("dave"), *cli.trust(), ok=False)
    assert denied.exit_code == 1 and "403" in denied.stderr
    usage = cli("secret", "get", "user_key", addr, *cli.trust(), ok=False)
    assert usage.exit_code == 2 and "-c/--cert" in usage.stderr


def test_two_party_update_with_the_cli(cli: Cli) -> None:
    addr = cli.rc.addr
    doc = changed()
    doc["Marbles"]["backend"]["Parameters"]["Env"]["VERSION"] = "2"
    proposal = cli.file("update.json", governance_manifest_bytes(doc))
    applied = cli("manifest", "update", "apply", proposal, addr, *cli.who("alice"), *cli.trust()).stdout
    assert (
        "Update proposed." in applied and "2 acknowledgement(s) missing; waiting for: bob, carol" in applied
    )
    missing = cli("manifest", "update", "get", addr, "--missing", *cli.trust()).stdout
    assert "2 users still need to acknowledge the update manifest" in missing and "bob, carol" in missing
    pending = cli.tmp / "pending.json"
    cli("manifest", "update", "get", addr, "-o", str(pending), *cli.trust())
    assert pending.read_bytes() == governance_manifest_bytes(doc)
    step = cli("manifest", "update", "acknowledge", str(pending), addr, *cli.who("bob"), *cli.trust()).stdout
    assert "1 user(s) still need(s) to acknowledge" in step and "not yet accepted: carol" in step
    # a file that differs by one byte is refused
    near = cli.file("near.json", governance_manifest_bytes(doc) + b"\n")
    bad = cli("manifest", "update", "acknowledge", near, addr, *cli.who("carol"), *cli.trust(), ok=False)
    assert bad.exit_code == 1 and "differs from the pending update manifest" in bad.stderr
    done = cli(
        "manifest", "update", "acknowledge", str(pending), addr, *cli.who("carol"), *cli.trust()
    ).stdout
    assert "All users have acknowledged the update manifest. Update successfully applied" in done
    got = cli.tmp / "current.json"
    cli("manifest", "get", addr, "-o", str(got), *cli.trust())
    assert got.read_bytes() == governance_manifest_bytes(doc)


def test_cancel_with_the_cli(cli: Cli) -> None:
    addr = cli.rc.addr
    doc = changed()
    doc["Config"]["RotateRootSecret"] = True
    cli(
        "manifest",
        "update",
        "apply",
        cli.file("u.json", governance_manifest_bytes(doc)),
        addr,
        *cli.who("bob"),
        *cli.trust(),
    )
    denied = cli("manifest", "update", "cancel", addr, *cli.who("dave"), *cli.trust(), ok=False)
    assert denied.exit_code == 1
    assert (
        "Update successfully cancelled"
        in cli("manifest", "update", "cancel", addr, *cli.who("carol"), *cli.trust()).stdout
    )
    none = cli("manifest", "update", "get", addr, *cli.trust(), ok=False)
    assert none.exit_code == 1 and "no pending update" in none.stderr


def test_package_update_and_display_update(cli: Cli) -> None:
    addr = cli.rc.addr
    svn = cli.file("svn.json", b'{"Packages": {"pkg": {"SecurityVersion": 5}}}')
    out = cli("manifest", "update", "apply", svn, addr, *cli.who("alice"), *cli.trust()).stdout
    assert "Update applied." in out
    raw = cli("manifest", "get", addr, *cli.trust()).stdout
    assert json.loads(raw)["Packages"]["pkg"]["SecurityVersion"] == 2  # the raw manifest as set
    shown = cli("manifest", "get", addr, "--display-update", *cli.trust()).stdout
    assert json.loads(shown)["Packages"]["pkg"]["SecurityVersion"] == 5
    log = cli("manifest", "log", addr, *cli.trust()).stdout.splitlines()
    assert json.loads(log[-1])["update"] == "SecurityVersion increased"


def _activity(cli: Cli) -> None:
    """A few logged operations: a secret write, a read (not logged), another write, a package update."""
    addr = cli.rc.addr
    cli(
        "secret",
        "set",
        cli.file("s.json", json.dumps({"user_key": {"Key": b64(KEY16)}}).encode()),
        addr,
        *cli.who("alice"),
        *cli.trust(),
    )
    cli("secret", "get", "user_key", addr, *cli.who("bob"), *cli.trust())
    cli(
        "secret",
        "set",
        cli.file("p.json", json.dumps({"user_plain": {"Key": b64(b"plain")}}).encode()),
        addr,
        *cli.who("alice"),
        *cli.trust(),
    )
    cli(
        "manifest",
        "update",
        "apply",
        cli.file("svn.json", b'{"Packages":{"pkg":{"SecurityVersion":3}}}'),
        addr,
        *cli.who("alice"),
        *cli.trust(),
    )


def _tampered(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    lines = list(doc["updateLog"])
    if kind == "delete":
        del lines[1]
    elif kind == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif kind == "edit":
        lines[2] = lines[2].replace('"user_plain"', '"user_key"')
    else:  # drop the newest entry
        lines.pop()
    return {**doc, "updateLog": lines}


@pytest.mark.parametrize(("kind", "entry"), [("delete", 2), ("reorder", 2), ("edit", 3), ("truncate", 4)])
def test_log_verify_detects_a_tampered_export(cli: Cli, kind: str, entry: int) -> None:
    addr = cli.rc.addr
    _activity(cli)
    assert cli("log", "verify", addr, *cli.trust()).stdout.startswith("ok: 4 entries")
    export = cli.tmp / "log.json"
    cli("log", "get", addr, "-o", str(export), *cli.trust())
    root = cli.file("root.pem", cli.rc.coord.deployment.ca.root.cert_pem)
    assert cli("log", "verify", "--file", str(export), "--root-cert", root).stdout.startswith("ok")
    bad = cli.file("bad.json", json.dumps(_tampered(json.loads(export.read_text()), kind)).encode())
    result = cli("log", "verify", "--file", bad, "--root-cert", root, ok=False)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"BROKEN: entry {entry}:")
    # the root can also come from the Coordinator, or from the pinned root file
    assert cli("log", "verify", addr, "--file", bad, *cli.trust(), ok=False).exit_code == 1
    assert cli("log", "verify", "--file", str(export), "--coordinator-cert", str(cli.pin)).exit_code == 0


@pytest.mark.parametrize("kind", ["delete", "reorder", "edit"])
def test_log_verify_detects_tampering_in_the_coordinators_store(cli: Cli, kind: str) -> None:
    _activity(cli)
    rc = cli.rc

    async def tamper() -> None:
        inner = await SQLiteStore.open(rc.seal_dir / "state.db")
        opened = await open_sealed_store(inner, SimulationKeyFileProvider(rc.seal_dir / "simulation-kek.key"))
        assert isinstance(opened, Opened)
        store = opened.store
        try:
            stored = await store.list("updateLog:")
            keys = sorted(stored)
            if kind == "delete":
                change: dict[str, bytes | None] = {keys[2]: None}
            elif kind == "reorder":
                change = {keys[2]: stored[keys[3]], keys[3]: stored[keys[2]]}
            else:
                change = {keys[1]: stored[keys[1]].replace(b'"Secret set"', b'"Secret read"')}
            await store.commit(change, expected_revision=await store.revision())
        finally:
            await store.close()

    rc.restart(tamper)
    result = cli("log", "verify", rc.addr, *cli.trust(), ok=False)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"BROKEN: entry {3 if kind != 'edit' else 2}:")


def test_log_verify_needs_a_source(cli: Cli) -> None:
    assert cli("log", "verify", ok=False).exit_code == 2


def test_log_verify_file_in_a_subprocess(cli: Cli) -> None:
    """The installed entry point, end to end (no network: file and root given)."""
    lines, head = cli.rc.coord.update_log()
    assert head is not None
    export = cli.file(
        "log.json", json.dumps({"updateLog": list(lines), "updateLogHead": head.to_json()}).encode()
    )
    root = cli.file("root.pem", cli.rc.coord.deployment.ca.root.cert_pem)
    script = Path(sys.executable).parent / "marblekeep"
    if not script.exists():
        pytest.skip("the marblekeep console script is not installed next to this Python")
    ok = subprocess.run(
        [str(script), "log", "verify", "--file", export, "--root-cert", root],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 1 entry,")
    assert base64.b64decode(head.to_json()["signature"]) == head.signature


def test_json_output_of_the_governance_commands(cli: Cli) -> None:
    """--json on secret get, update get, log get, manifest get/log, status, certificate: the fields
    docs/cli.md lists."""
    addr = cli.rc.addr
    cli("secret", "set", cli.file("s.json", json.dumps({"user_key": {"Key": b64(KEY16)}}).encode()), addr,
        *cli.who("alice"), *cli.trust())  # fmt: skip
    secrets = json.loads(
        cli("secret", "get", "user_key", addr, "--json", *cli.who("bob"), *cli.trust()).stdout
    )
    assert set(secrets) == {"secrets"} and secrets["secrets"]["user_key"]["Type"] == "symmetric-key"
    assert secrets["secrets"]["user_key"]["Private"] == b64(KEY16)

    doc = changed()
    doc["Marbles"]["backend"]["Parameters"]["Env"]["VERSION"] = "2"
    cli("manifest", "update", "apply", cli.file("u.json", governance_manifest_bytes(doc)), addr,
        *cli.who("alice"), *cli.trust())  # fmt: skip
    pending = json.loads(cli("manifest", "update", "get", addr, "--json", *cli.trust()).stdout)
    assert set(pending) == {"message", "missingUsers", "fingerprint", "manifest"}
    assert pending["missingUsers"] == ["bob", "carol"]
    assert base64.b64decode(pending["manifest"]) == governance_manifest_bytes(doc)
    assert pending["fingerprint"] == hashlib.sha256(governance_manifest_bytes(doc)).hexdigest()

    status = json.loads(cli("status", addr, "--json", *cli.trust()).stdout)
    assert status == {"code": 3, "message": status["message"], "simulation": True}
    got = json.loads(cli("manifest", "get", addr, "--json", *cli.trust()).stdout)
    assert set(got) == {"fingerprint", "signatureRootECDSA", "manifest"}
    assert got["manifest"]["Secrets"]["user_key"]["UserDefined"] is True
    log = json.loads(cli("manifest", "log", addr, "--json", *cli.trust()).stdout)
    assert all(isinstance(e, dict) and "update" in e for e in log["entries"])
    assert [e["seq"] for e in log["entries"]] == list(range(1, len(log["entries"]) + 1))
    exported = json.loads(cli("log", "get", addr, "--json", *cli.trust()).stdout)
    assert set(exported) == {"updateLog", "updateLogHead"}
    chain = json.loads(cli("certificate", "chain", addr, "--json", *cli.trust()).stdout)
    assert [set(c) for c in chain["certificates"]] == [
        {"subject", "issuer", "serialNumber", "notBefore", "notAfter", "sha256", "pem"}
    ] * 2
    assert chain["certificates"][0]["issuer"] == chain["certificates"][1]["subject"]
