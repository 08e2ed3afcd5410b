"""The dry run's bounds (issue 11, #4): rendered Parameters per Marble, template actions per manifest."""

from __future__ import annotations

import base64
import json
from typing import Any

from manifest_support import base, check, dumps

from hostile_manifests import explode_manifest
from marblekeep.manifest import load_manifest
from marblekeep.manifest.dryrun import dry_run
from marblekeep.manifest.limits import MAX_PARAMETERS_BYTES, MAX_TEMPLATE_ACTIONS
from marblekeep.manifest.model import Secret, SecretType


def _files(**files: Any) -> dict[str, Any]:
    m = base()
    m["Marbles"]["m"]["Parameters"] = {"Files": files}
    return m


def test_explode_manifest_is_invalid_naming_limit_and_marble() -> None:
    result = check(explode_manifest())
    assert not result.valid
    [problem] = result.problems
    assert problem.path == "Marbles.explode.Parameters"
    assert str(MAX_PARAMETERS_BYTES) in problem.message and "'explode'" in problem.message


def test_placeholders_have_realistic_sizes() -> None:
    # ~1 KB per PEM certificate: 3,000 fit, 5,000 do not (4 MiB / 1 KB ≈ 4,000).
    action = "{{pem .MarbleRun.MarbleCert.Cert}}"
    assert check(_files(a=action * 3000)).valid
    assert not check(_files(a=action * 5000)).valid


def test_limit_counts_all_entries_of_a_marble_together() -> None:
    half = "x" * (MAX_PARAMETERS_BYTES // 2)
    m = _files(a=half, b=half)
    result = check(m)
    assert [p.path for p in result.problems] == ["Marbles.m.Parameters"]
    m["Marbles"]["m"]["Parameters"] = {"Files": {"a": half}, "Env": {"B": half}}
    assert not check(m).valid
    # ... but each Marble has its own budget
    m = base()
    m["Marbles"]["m"]["Parameters"] = {"Files": {"a": half}}
    m["Marbles"]["n"] = {"Package": "pkg", "Parameters": {"Files": {"a": half}}}
    assert check(m).valid


def test_no_templates_entries_count_too() -> None:
    data = base64.b64encode(b"\x00" * (MAX_PARAMETERS_BYTES + 1)).decode()
    m = _files(a={"Encoding": "base64", "Data": data, "NoTemplates": True})
    assert [p.path for p in check(m).problems] == ["Marbles.m.Parameters"]


def test_template_actions_are_capped_per_manifest() -> None:
    action = "{{hex .MarbleRun.SealKey}}"
    m = base()
    m["Marbles"]["m"]["Parameters"] = {"Env": {"A": action * (MAX_TEMPLATE_ACTIONS // 2)}}
    assert check(m).valid
    m["Marbles"]["n"] = {
        "Package": "pkg",
        "Parameters": {"Env": {"B": action * (MAX_TEMPLATE_ACTIONS // 2 + 1)}},
    }
    result = check(m)
    [problem] = result.problems
    assert problem.path == "Marbles.n.Parameters.Env.B"
    assert str(MAX_TEMPLATE_ACTIONS) in problem.message


def test_syntax_errors_are_still_reported_first() -> None:
    m = _files(a="{{pem .Secrets.nope.Cert}} {{ bad")
    [problem] = check(m).problems
    assert "template:" in problem.message and "nope" not in problem.message


def test_upload_dry_run_uses_real_sizes() -> None:
    m = base()
    m["Secrets"] = {"blob": {"Type": "plain", "UserDefined": True}}
    m["Marbles"]["m"]["Parameters"] = {"Files": {"a": "{{raw .Secrets.blob}}" * 100}}
    manifest = load_manifest(dumps(m))  # placeholder: 1 byte per use
    small = Secret(type=SecretType.PLAIN, user_defined=True, private=b"s" * 1000, public=b"s" * 1000)
    assert dry_run(manifest, {"blob": small}) == []
    big = Secret(type=SecretType.PLAIN, user_defined=True, private=b"s" * 50_000, public=b"s" * 50_000)
    [problem] = dry_run(manifest, {"blob": big})
    assert problem.path == "Marbles.m.Parameters" and str(MAX_PARAMETERS_BYTES) in problem.message
    assert "sss" not in problem.message  # never the value


def test_explode_sized_json_is_ordinary_json() -> None:
    doc = json.loads(explode_manifest(10_000))
    assert set(doc["Marbles"]) == {"small", "explode"}
