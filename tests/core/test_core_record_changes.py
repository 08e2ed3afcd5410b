"""``deployment_changes`` (what a commit writes) equals the diff of the full record sets.

The service commits only what changed; if the shortcut ever missed a change, a restart would load
old values. Every transition the Coordinator makes is checked against the slow, obvious diff.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json

from marblekeep.core import governance
from marblekeep.core.deployment import Deployment, new_deployment, set_manifest
from marblekeep.core.records import deployment_changes, deployment_to_records, record_changes
from marblekeep.manifest import load_manifest
from testsupport import self_signed_user_cert

NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _user_cert() -> str:
    return self_signed_user_cert()[0]


USER_CERT = _user_cert()


def _manifest(secrets: dict[str, dict[str, object]], svn: int = 1) -> bytes:
    names = sorted(n for n, s in secrets.items() if s.get("UserDefined"))
    return json.dumps(
        {
            "Packages": {"p": {"SignerID": "ab" * 32, "ProductID": 1, "SecurityVersion": svn}},
            "Marbles": {"m": {"Package": "p", "MaxActivations": 10}},
            "Secrets": secrets,
            "Users": {"admin": {"Certificate": USER_CERT, "Roles": ["rw", "up", "svn"]}},
            "Roles": {
                "rw": {
                    "ResourceType": "Secrets",
                    "ResourceNames": names,
                    "Actions": ["ReadSecret", "WriteSecret"],
                },
                "up": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
                "svn": {
                    "ResourceType": "Packages",
                    "ResourceNames": ["p"],
                    "Actions": ["UpdateSecurityVersion"],
                },
            },
        }
    ).encode()


SECRETS: dict[str, dict[str, object]] = {
    **{f"u{i}": {"Type": "plain", "UserDefined": True} for i in range(20)},
    "shared": {"Type": "symmetric-key", "Size": 128, "Shared": True},
    "cert": {"Type": "cert-ecdsa", "Size": 256, "Shared": True},
}


def _check(old: Deployment | None, new: Deployment) -> None:
    before = deployment_to_records(old) if old is not None else {}
    assert deployment_changes(old, new) == record_changes(before, deployment_to_records(new))


def _put(names: list[str], value: str) -> dict[str, dict[str, str]]:
    return {n: {"Key": base64.b64encode(value.encode()).decode()} for n in names}


def test_every_transition_writes_exactly_what_changed() -> None:
    fresh = new_deployment(["localhost"], NOW)
    dep = set_manifest(fresh, load_manifest(_manifest(SECRETS)), NOW)
    _check(None, dep)
    _check(fresh, dep)

    steps = [
        lambda d: governance.write_secrets(d, "admin", _put(["u1", "u2"], "one"), NOW),
        lambda d: governance.write_secrets(d, "admin", _put(["u2"], "two"), NOW),  # overwrite
        lambda d: governance.write_secrets(d, "admin", _put(["u2"], "two"), NOW),  # same value again
        lambda d: governance.write_secrets(d, "admin", _put(["u1"], "three"), NOW),
        lambda d: dataclasses.replace(d, activations={**d.activations, "m": d.activations.get("m", 0) + 1}),
        lambda d: (
            governance.update_manifest(
                d, "admin", json.dumps({"Packages": {"p": {"SecurityVersion": 3}}}).encode(), NOW
            ).deployment
        ),
    ]
    for step in steps:
        new = step(dep)
        changes = deployment_changes(dep, new)
        _check(dep, new)
        assert changes, "every step changes at least the log or a record"
        dep = new

    # a full update that removes secrets and adds one (names removed and added)
    smaller = {k: v for k, v in SECRETS.items() if k not in ("u1", "u2", "cert")}
    smaller["added"] = {"Type": "symmetric-key", "Size": 256, "Shared": True}
    outcome = governance.update_manifest(dep, "admin", _manifest(smaller, svn=3), NOW)
    _check(dep, outcome.deployment)
    removed = {k for k, v in deployment_changes(dep, outcome.deployment).items() if v is None}
    assert {"secret:u1", "secret:u2", "secret:cert"} <= removed
