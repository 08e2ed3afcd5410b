"""Issue 4 end to end: the state survives restarts, resists tampering and rollback.

One deployment (module fixture) runs as real ``marblekeep coordinator --simulation`` subprocesses
on loopback: the manifest is set and user-defined secrets are uploaded with the CLI, Marbles run
with ``marblekeep marble run``; then the Coordinator is stopped with SIGTERM and started again,
and later killed with SIGKILL and started again, on the same seal directory. Everything a user
can observe must be the same afterwards.

The tamper and rollback tests work on copies of that seal directory: flipped bytes in the
database (in-process ``Coordinator.open`` over many positions, plus a subprocess start on a
damaged record), an old wrapped DEK paired with newer data, and an older database restored.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_state_support import (
    STATUS_3,
    CoordinatorProcess,
    Site,
    User,
    cli,
    make_user,
    marble,
    recovery_secrets,
    refused_start,
    rsa_owner,
    run_marble,
)

from marblekeep.core.deployment import CoordinatorState
from marblekeep.core.records import deployment_to_records
from marblekeep.errors import IntegrityError, MarbleKeepError, RollbackError
from marblekeep.recovery import decrypt_recovery_secret, load_private_key, sign_recovery_secret
from marblekeep.service import Coordinator, CoordinatorConfig

pytestmark = pytest.mark.slow

WORKER_ENV = {
    "MK_SEAL_KEY": "{{ hex .MarbleRun.SealKey }}",
    "MK_SHARED_KEY": "{{ hex .Secrets.shared_key }}",
    "MK_OWN_KEY": "{{ hex .Secrets.own_key }}",
    "MK_USER_KEY": "{{ hex .Secrets.user_key }}",
    "MK_TOKEN": "{{ string .Secrets.token }}",
}
USER_KEY = bytes(range(16))
TOKEN = b"token-before-any-restart"
NEW_TOKEN = b"token-written-after-the-backup"


def manifest(admin: User, recovery_pem: str) -> dict[str, Any]:
    return {
        "Packages": {"app": {"Debug": True}},
        "Marbles": {
            "worker": {"Package": "app", "Parameters": {"Env": WORKER_ENV}},
            "limited": {
                "Package": "app",
                "MaxActivations": 2,
                "Parameters": {"Env": {"MK_SEAL_KEY": "{{ hex .MarbleRun.SealKey }}"}},
            },
        },
        "Secrets": {
            "shared_key": {"Type": "symmetric-key", "Size": 256, "Shared": True},
            "own_key": {"Type": "symmetric-key", "Size": 256},
            "user_key": {"Type": "symmetric-key", "Size": 128, "UserDefined": True},
            "token": {"Type": "plain", "UserDefined": True},
        },
        "Users": {"admin": {"Certificate": admin.cert_pem, "Roles": ["secrets", "updater"]}},
        "Roles": {
            "secrets": {
                "ResourceType": "Secrets",
                "ResourceNames": ["user_key", "token"],
                "Actions": ["ReadSecret", "WriteSecret"],
            },
            "updater": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
        },
        "RecoveryKeys": {"owner": recovery_pem},
    }


def upload_secrets(site: Site, admin: User, values: Mapping[str, bytes], name: str) -> None:
    body = {k: {"Key": base64.b64encode(v).decode()} for k, v in values.items()}
    site.path(name).write_text(json.dumps(body))
    cli(site, "secret", "set", str(site.path(name)), site.client_addr, *admin.args, *pin_args(site))


def pin_args(site: Site) -> tuple[str, str]:
    return ("--coordinator-cert", str(site.pin))


def read_secrets(site: Site, admin: User) -> dict[str, Any]:
    out = site.path("secrets-read.json")
    cli(
        site,
        "secret",
        "get",
        "user_key",
        "token",
        site.client_addr,
        *admin.args,
        *pin_args(site),
        "-o",
        str(out),
    )
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@dataclass
class Observed:
    """What the user saw at one moment."""

    status: str = ""
    root: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, Any] = field(default_factory=dict)


def observe(site: Site, admin: User) -> Observed:
    return Observed(
        status=cli(site, "status", site.client_addr, *pin_args(site)).stdout,  # pinned: no --insecure
        root=cli(site, "certificate", "root", site.client_addr, *pin_args(site)).stdout,
        manifest=json.loads(cli(site, "manifest", "get", "-s", site.client_addr, *pin_args(site)).stdout),
        secrets=read_secrets(site, admin),
    )


@dataclass
class Scenario:
    site: Site
    admin: User
    owner_key: Path
    manifest_raw: bytes
    before: Observed
    after_sigterm: Observed
    after_sigkill: Observed
    marbles: dict[str, dict[str, str]]
    limited_refused_after_restart: str
    exit_codes: list[int]
    coordinator_logs: list[str]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    site = Site(tmp_path_factory.mktemp("state"))
    admin = make_user(site, "admin")
    owner_key, owner_pub = rsa_owner(site, "owner")
    manifest_file = site.path("manifest.json")
    manifest_file.write_text(json.dumps(manifest(admin, owner_pub), indent=2))
    marbles: dict[str, dict[str, str]] = {}
    logs: list[str] = []
    codes: list[int] = []

    first = CoordinatorProcess(site, "1")
    try:
        cli(
            site,
            "manifest",
            "set",
            str(manifest_file),
            site.client_addr,
            "--insecure",
            *pin_args(site),
            "-r",
            str(site.path("recovery.json")),
        )
        upload_secrets(site, admin, {"user_key": USER_KEY, "token": TOKEN}, "secrets.json")
        before = observe(site, admin)
        marbles["a"] = run_marble(site, "worker", "uuid-a")
        marbles["b"] = run_marble(site, "worker", "uuid-b")
        marbles["l1"] = run_marble(site, "limited", "uuid-l1")
        marbles["l2"] = run_marble(site, "limited", "uuid-l2")
    finally:
        codes.append(first.stop())
        logs.append(first.output)

    second = CoordinatorProcess(site, "2")
    try:
        after_sigterm = observe(site, admin)
        marbles["a-after-sigterm"] = run_marble(site, "worker", "uuid-a")
        refused = marble(site, "limited", "uuid-l3")
        assert refused.returncode != 0, "the activation counter was reset by the restart"
    finally:
        second.kill()  # SIGKILL: no clean shutdown, the WAL is left as it was
        logs.append(second.output)

    third = CoordinatorProcess(site, "3")
    try:
        after_sigkill = observe(site, admin)
        marbles["a-after-sigkill"] = run_marble(site, "worker", "uuid-a")
    finally:
        codes.append(third.stop())
        logs.append(third.output)

    yield Scenario(
        site=site,
        admin=admin,
        owner_key=owner_key,
        manifest_raw=manifest_file.read_bytes(),
        before=before,
        after_sigterm=after_sigterm,
        after_sigkill=after_sigkill,
        marbles=marbles,
        limited_refused_after_restart=refused.stderr,
        exit_codes=codes,
        coordinator_logs=logs,
    )


# ---------------------------------------------------------------------------------------- restart


def test_restart_keeps_status_root_certificate_manifest_and_signature(scenario: Scenario) -> None:
    assert scenario.exit_codes == [0, 0]  # SIGTERM stops gracefully
    before = scenario.before
    assert before.status == f"3: {STATUS_3}\n"
    assert "BEGIN CERTIFICATE" in before.root
    for after in (scenario.after_sigterm, scenario.after_sigkill):
        assert after.status == before.status
        assert after.root == before.root
        assert after.manifest == before.manifest
    doc = before.manifest
    assert doc["Manifest"] == json.loads(scenario.manifest_raw)
    assert len(base64.b64decode(doc["ManifestSignatureRootECDSA"])) > 64


def test_restart_keeps_user_defined_secrets(scenario: Scenario) -> None:
    before = scenario.before.secrets
    assert base64.b64decode(before["user_key"]["Private"]) == USER_KEY
    assert base64.b64decode(before["token"]["Private"]) == TOKEN
    assert scenario.after_sigterm.secrets == before
    assert scenario.after_sigkill.secrets == before


def test_restart_keeps_every_marbles_keys_and_the_user_secrets_they_get(scenario: Scenario) -> None:
    m = scenario.marbles
    a = m["a"]
    assert len(bytes.fromhex(a["MK_SEAL_KEY"])) == 32
    assert a["MK_USER_KEY"] == USER_KEY.hex() and a["MK_TOKEN"] == TOKEN.decode()
    for name in ("a-after-sigterm", "a-after-sigkill"):
        for var in ("MK_SEAL_KEY", "MK_SHARED_KEY", "MK_OWN_KEY", "MK_USER_KEY", "MK_TOKEN"):
            assert m[name][var] == a[var], f"{var} changed for the same UUID after a restart ({name})"
        assert m[name]["MARBLE_PREDEFINED_ROOT_CA"] == a["MARBLE_PREDEFINED_ROOT_CA"]
        assert m[name]["MARBLE_PREDEFINED_PRIVATE_KEY"] != a["MARBLE_PREDEFINED_PRIVATE_KEY"]  # fresh TLS key
    assert m["b"]["MK_SEAL_KEY"] != a["MK_SEAL_KEY"] and m["b"]["MK_SHARED_KEY"] == a["MK_SHARED_KEY"]


def test_restart_keeps_activation_counters(scenario: Scenario) -> None:
    # MaxActivations 2: two before the restart, so the third (after it) is refused
    assert "l1" in scenario.marbles and "l2" in scenario.marbles
    message = scenario.limited_refused_after_restart
    assert "limited" in message and "activation" in message.lower(), message


def test_coordinator_logs_never_contain_secret_values(scenario: Scenario) -> None:
    secrets = [TOKEN.decode(), USER_KEY.hex(), base64.b64encode(USER_KEY).decode()]
    for values in scenario.marbles.values():
        secrets += [values[k] for k in ("MK_SEAL_KEY", "MK_SHARED_KEY", "MK_OWN_KEY") if k in values]
    for log in scenario.coordinator_logs:
        assert "sealed state loaded" in log or "manifest set" in log
        for secret in secrets:
            assert secret not in log


# ----------------------------------------------------------------------------------------- tamper


def copy_site(scenario: Scenario, tmp_path: Path, name: str) -> Site:
    site = Site(tmp_path / name)
    shutil.copytree(scenario.site.seal_dir, site.seal_dir)
    shutil.copy(scenario.site.pin, site.pin)
    return site


async def open_in_process(seal_dir: Path, *, allow_rollback: bool = False) -> Coordinator:
    config = CoordinatorConfig(seal_dir=seal_dir, simulation=True, allow_rollback=allow_rollback)
    return await Coordinator.open(config)


async def records_of(seal_dir: Path) -> dict[str, bytes]:
    coordinator = await open_in_process(seal_dir)
    try:
        assert coordinator.state is CoordinatorState.ACCEPTING_MARBLES
        return deployment_to_records(coordinator.deployment)
    finally:
        await coordinator.close()


def value_offsets(db: Path) -> dict[str, int]:
    """Where each record's stored value sits in the database file (name → an offset inside its first
    64 bytes; a long value continues on overflow pages)."""
    data = db.read_bytes()
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT key, value FROM records").fetchall()
    offsets: dict[str, int] = {}
    for key, value in rows:
        name = key.decode() if isinstance(key, bytes) else str(key)
        head = bytes(value[:64])
        at = data.find(head)
        assert at >= 0 and head, f"record {name} not found in the file"
        offsets[name] = at + len(head) // 2
    return offsets


async def test_flipped_bytes_lead_to_recovery_or_a_clear_refusal_never_other_values(
    scenario: Scenario, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Flip one bit in the middle of every stored record value, and at random places of the file.
    A flipped record never loads; anywhere else the Coordinator refuses, enters Recovery, or loads
    exactly the original values (a flip in unused space)."""
    pristine = tmp_path / "pristine"
    shutil.copytree(scenario.site.seal_dir, pristine)
    assert not (pristine / "state.db-wal").exists() or (pristine / "state.db-wal").stat().st_size == 0
    expected = await records_of(pristine)
    data = (pristine / "state.db").read_bytes()
    in_records = value_offsets(pristine / "state.db")
    assert {"data:manifest", "data:secret:token", "meta:wrapped_dek", "sys:state"} <= set(in_records)
    rnd = random.Random(4)
    cases = [(f"record {name}", pos) for name, pos in sorted(in_records.items())]
    cases += [
        (f"byte {pos}", pos) for pos in sorted({*rnd.sample(range(len(data)), 40), 0, 50, len(data) - 1})
    ]
    outcomes: dict[str, int] = {}
    secret_values = [TOKEN.decode(), USER_KEY.hex()]
    for where, pos in cases:
        case = tmp_path / "case"
        shutil.copytree(pristine, case)
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rnd.randrange(8)
        (case / "state.db").write_bytes(bytes(damaged))
        try:
            coordinator = await open_in_process(case)
        except MarbleKeepError as exc:
            message = exc.diagnostics()
            assert message.strip(), f"{where}: refusal without a message"
            assert not any(v in message for v in secret_values)
            if isinstance(exc, IntegrityError):
                assert "record" in message, f"{where}: the refusal does not name the record: {message}"
            if where.startswith("record data:"):
                name = where.removeprefix("record data:")
                assert isinstance(exc, IntegrityError) and name in message, f"{where}: {message}"
            outcome = type(exc).__name__
        else:
            try:
                if coordinator.state is CoordinatorState.RECOVERY:
                    assert where != "record sys:state", "a damaged index must be refused, not recovered"
                    outcome = "Recovery"
                else:
                    got = deployment_to_records(coordinator.deployment)
                    assert got == expected, f"{where}: the Coordinator loaded different values"
                    assert not where.startswith("record "), f"{where}: a damaged record was accepted"
                    outcome = "loaded, unchanged"
            finally:
                await coordinator.close()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(case)
    assert outcomes.get("IntegrityError", 0) >= len(in_records) - 1, outcomes
    assert outcomes.get("Recovery", 0) >= 1, outcomes  # the flipped wrapped DEK


def read_row(db: Path, key: str) -> tuple[Any, bytes]:
    """(the stored key as the backend wrote it, the stored value) of record ``key``."""
    with closing(sqlite3.connect(db)) as conn:
        for candidate in (key.encode(), key):
            row = conn.execute("SELECT key, value FROM records WHERE key = ?", (candidate,)).fetchone()
            if row is not None:
                return row[0], bytes(row[1])
    raise AssertionError(f"no record {key} in {db}")


def write_row(db: Path, stored_key: Any, value: bytes) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE records SET value = ? WHERE key = ?", (value, stored_key))


def flip_record(db: Path, key: str) -> None:
    """Flip one bit in the stored (sealed) value of ``key`` directly in the database file."""
    stored_key, value = read_row(db, key)
    damaged = bytearray(value)
    damaged[-5] ^= 0x10
    write_row(db, stored_key, bytes(damaged))


def test_a_damaged_record_stops_the_coordinator_with_a_message_naming_it(
    scenario: Scenario, tmp_path: Path
) -> None:
    site = copy_site(scenario, tmp_path, "damaged")
    flip_record(site.db, "data:secret:token")
    code, output = refused_start(site, "damaged")
    assert code == 1, output
    assert "secret:token" in output and "restore" in output, output
    assert "Traceback" not in output
    assert TOKEN.decode() not in output


async def test_an_old_wrapped_dek_with_newer_data_enters_recovery_and_never_serves_values(
    scenario: Scenario, tmp_path: Path
) -> None:
    """A full update that changes the recovery keys re-keys the state (new DEK). Pairing the
    wrapped DEK of a backup taken before it with the newer data must not load; the new recovery
    secret brings the newer state back. The reverse pairing (new wrapped DEK, old data) must not
    load either, and recovering the old data is refused as a rollback."""
    site = copy_site(scenario, tmp_path, "rekey")
    backup = tmp_path / "backup-before-rekey.db"
    shutil.copy(site.db, backup)
    new_owner_key, new_owner_pub = rsa_owner(site, "new-owner")
    updated = manifest(scenario.admin, new_owner_pub)
    raw = json.dumps(updated).encode()

    coordinator = await open_in_process(site.seal_dir)
    try:
        outcome, new_secrets = await coordinator.update_manifest("admin", raw)
        assert outcome.applied and new_secrets is not None and set(new_secrets) == {"owner"}
        await coordinator.write_secrets("admin", {"token": {"Key": base64.b64encode(NEW_TOKEN).decode()}})
    finally:
        await coordinator.close()
    assert not Path(f"{site.db}-wal").exists() or Path(f"{site.db}-wal").stat().st_size == 0

    old_key, old_wrapped = read_row(backup, "meta:wrapped_dek")
    new_key, new_wrapped = read_row(site.db, "meta:wrapped_dek")
    assert old_wrapped != new_wrapped
    newer = tmp_path / "newer.db"
    shutil.copy(site.db, newer)

    # 1. old wrapped DEK + newer data → Recovery (temporary root, no values served)
    write_row(site.db, new_key, old_wrapped)
    coordinator = await open_in_process(site.seal_dir)
    try:
        assert coordinator.state is CoordinatorState.RECOVERY
        assert "does not belong to the stored data" in coordinator.recovery_reason
        assert coordinator.deployment.manifest is None and not coordinator.deployment.secrets
        root_pem = coordinator.deployment.ca.root.cert_pem.decode()
        assert root_pem != scenario.before.root
        # the *new* owner's secret recovers the newer state
        owner = load_private_key(new_owner_key.read_bytes())
        secret = decrypt_recovery_secret(new_secrets["owner"], owner)
        remaining, message = await coordinator.recover(secret, sign_recovery_secret(secret, owner))
        assert (remaining, message) == (0, "Recovery successful.")
        assert coordinator.deployment.ca.root.cert_pem.decode() == scenario.before.root
        assert coordinator.deployment.secrets["token"].private == NEW_TOKEN  # the newer value
    finally:
        await coordinator.close()

    # 2. new wrapped DEK + the old data (a rolled-back database with today's key record)
    shutil.copy(backup, site.db)
    for suffix in ("-wal", "-shm"):
        Path(f"{site.db}{suffix}").unlink(missing_ok=True)
    write_row(site.db, old_key, read_row(newer, "meta:wrapped_dek")[1])
    coordinator = await open_in_process(site.seal_dir)
    try:
        assert coordinator.state is CoordinatorState.RECOVERY
        assert coordinator.deployment.manifest is None
        # the old owner's secret (from the original manifest set) opens the old data, but the
        # rollback anchor knows that a newer epoch was sealed: refused
        old_owner = load_private_key(scenario.owner_key.read_bytes())
        old_secret = decrypt_recovery_secret(
            recovery_secrets(scenario.site.path("recovery.json"))["owner"], old_owner
        )
        with pytest.raises(RollbackError) as refused:
            await coordinator.recover(old_secret, sign_recovery_secret(old_secret, old_owner))
        assert "epoch" in refused.value.message and "allow_rollback" in refused.value.message
        assert coordinator.state is CoordinatorState.RECOVERY
    finally:
        await coordinator.close()


# --------------------------------------------------------------------------------------- rollback


def test_restoring_an_older_database_is_refused_and_allow_rollback_loads_it(
    scenario: Scenario, tmp_path: Path
) -> None:
    site = copy_site(scenario, tmp_path, "rollback")
    backup = tmp_path / "backup.db"
    shutil.copy(site.db, backup)

    newer = CoordinatorProcess(site, "newer")
    try:
        upload_secrets(site, scenario.admin, {"token": NEW_TOKEN}, "newer.json")
        assert base64.b64decode(read_secrets(site, scenario.admin)["token"]["Private"]) == NEW_TOKEN
    finally:
        assert newer.stop() == 0

    shutil.copy(backup, site.db)  # the host puts the old copy back
    for suffix in ("-wal", "-shm"):
        Path(f"{site.db}{suffix}").unlink(missing_ok=True)
    code, output = refused_start(site, "replayed")
    assert code != 0
    assert "refusing to load the stored state" in output and "epoch" in output, output
    assert "--allow-rollback" in output, output
    assert "Traceback" not in output

    override = CoordinatorProcess(site, "override", "--allow-rollback")
    try:
        assert "ROLLBACK OVERRIDE" in override.output
        old = read_secrets(site, scenario.admin)["token"]["Private"]
        assert base64.b64decode(old) == TOKEN  # the value of the restored backup
    finally:
        assert override.stop() == 0

    again = CoordinatorProcess(site, "after-override")  # the anchor now follows the restored state
    try:
        assert "ROLLBACK OVERRIDE" not in again.output
        assert cli(site, "status", site.client_addr, *pin_args(site)).stdout == f"3: {STATUS_3}\n"
    finally:
        again.stop()
