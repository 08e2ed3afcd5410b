"""The template dry run (reference §2.5, §11 item 2)."""

from __future__ import annotations

import dataclasses

import pytest
from manifest_support import base, check, dumps, paths, problem_at

from marblekeep.errors import ManifestError
from marblekeep.manifest import dry_run, load_manifest
from marblekeep.manifest.dryrun import placeholder
from marblekeep.manifest.model import Manifest, Secret, SecretType

SECRETS = {
    "sym": {"Type": "symmetric-key", "Size": 128, "Shared": True},
    "perm": {"Type": "symmetric-key", "Size": 256},
    "cert": {"Type": "cert-ed25519", "Shared": True},
    "plain": {"Type": "plain", "UserDefined": True},
    "usersym": {"Type": "symmetric-key", "Size": 128, "UserDefined": True},
}


def _manifest(files: dict[str, object] | None = None, env: dict[str, object] | None = None) -> bytes:
    m = base()
    m["Secrets"] = SECRETS
    m["Marbles"]["m"]["Parameters"] = {"Files": files or {}, "Env": env or {}}
    return dumps(m)


FILE_F = "Marbles.m.Parameters.Files./f"

PASSING_FILES = [
    "{{ raw .Secrets.sym }}",
    "{{ hex .Secrets.perm }}",
    "{{ raw .Previous.Secrets.sym }}",
    "{{ hex .Previous.Secrets.perm }}",
    "{{ pem .MarbleRun.RootCA.Cert }}",
    "{{ pem .MarbleRun.MarbleCert.Cert }}",
    "{{ pem .MarbleRun.MarbleCert.Private }}",
    "{{ pem .MarbleRun.CoordinatorRoot.Cert }}",
    "{{ pem .MarbleRun.CoordinatorIntermediate.Cert }}",
    "{{ pem .Secrets.cert.Cert }}{{ pem .Secrets.cert.Private }}",
    "{{ pem .Secrets.sym.Private }}",
    "{{ hex .MarbleRun.SealKey }}",
    "{{ hex .Marblerun.SealKey }}",
    "{{ pem .Secrets.cert.Public }}",
    "{{ pem .Secrets.perm.Private }}{{ hex .Secrets.perm.Public }}",
    # User-defined secrets may be uploaded with a certificate: their placeholder has one.
    "{{ pem .Secrets.plain.Cert }}{{ pem .Secrets.usersym.Cert }}",
]


@pytest.mark.parametrize("template", PASSING_FILES)
def test_dry_run_passes_in_files(template: str) -> None:
    result = check(_manifest(files={"/f": template}))
    assert result.valid, [str(p) for p in result.problems]


@pytest.mark.parametrize(
    ("files", "env", "path"),
    [
        ({"/f": "{{ raw .Secrets.missing }}"}, None, "Marbles.m.Parameters.Files./f"),
        ({"/f": "{{ pem .Secrets.sym }}"}, None, "Marbles.m.Parameters.Files./f"),
        (None, {"E": "{{ raw .Secrets.sym }}"}, "Marbles.m.Parameters.Env.E"),
        (None, {"E": "{{ string .Secrets.sym }}"}, "Marbles.m.Parameters.Env.E"),
        ({"/f": "{{ string .Secrets.plain }}"}, None, "Marbles.m.Parameters.Files./f"),
        ({"/f": "{{ pem .MarbleRun.RootCA.Private }}"}, None, "Marbles.m.Parameters.Files./f"),
        ({"/f": "{{ pem .MarbleRun.RootCA.Public }}"}, None, "Marbles.m.Parameters.Files./f"),
        ({"/f": "{{ pem .MarbleRun.CoordinatorRoot.Private }}"}, None, "Marbles.m.Parameters.Files./f"),
        ({"/f": "{{ pem .MarbleRun.CoordinatorIntermediate.Public }}"}, None, FILE_F),
        ({"/f": "{{ raw .Secrets.sym "}, None, "Marbles.m.Parameters.Files./f"),
        # A symmetric key has no certificate (MarbleRun refuses these at manifest set too).
        ({"/f": "{{ pem .Secrets.sym.Cert }}"}, None, FILE_F),
        ({"/f": "{{ pem .Secrets.perm.Cert }}"}, None, FILE_F),
        ({"/f": "{{ hex .Secrets.sym.Cert }}"}, None, FILE_F),
        (None, {"E": "{{ base64 .Previous.Secrets.perm.Cert }}"}, "Marbles.m.Parameters.Env.E"),
    ],
)
def test_dry_run_failures_name_marble_and_entry(
    files: dict[str, object] | None, env: dict[str, object] | None, path: str
) -> None:
    result = check(_manifest(files=files, env=env))
    assert paths(result) == [path]
    assert problem_at(result, path).startswith("template: ")


def test_env_string_on_plain_secret_passes() -> None:
    assert check(_manifest(env={"TOKEN": "{{ string .Secrets.plain }}"})).valid


def test_no_templates_entries_are_not_rendered() -> None:
    result = check(_manifest(files={"/f": {"NoTemplates": True, "Data": "{{ raw .Secrets.missing }}"}}))
    assert result.valid


def test_problems_from_several_marbles_are_all_reported() -> None:
    m = base()
    m["Marbles"]["a"] = {"Package": "pkg", "Parameters": {"Files": {"/x": "{{ raw .Secrets.x }}"}}}
    m["Marbles"]["b"] = {"Package": "pkg", "Parameters": {"Env": {"Y": "{{ raw .Secrets.y }}"}}}
    assert paths(check(m)) == ["Marbles.a.Parameters.Files./x", "Marbles.b.Parameters.Env.Y"]


def _loaded(env: dict[str, object]) -> Manifest:
    return load_manifest(_manifest(env=env))


def test_dry_run_with_real_secret_values_for_upload() -> None:
    manifest = _loaded({"TOKEN": "{{ string .Secrets.plain }}"})
    assert dry_run(manifest) == []
    secret_value = b"s3cr3t\x00with-nul"
    uploaded = dataclasses.replace(manifest.secrets["plain"], private=secret_value, public=secret_value)
    problems = dry_run(manifest, {"plain": uploaded})
    assert [p.path for p in problems] == ["Marbles.m.Parameters.Env.TOKEN"]
    # The problem names the entry but never the secret value.
    assert b"s3cr3t" not in str(problems[0]).encode()
    clean = dataclasses.replace(uploaded, private=b"fine", public=b"fine")
    assert dry_run(manifest, {"plain": clean}) == []


def test_real_values_without_content_fall_back_to_dummies() -> None:
    manifest = _loaded({"TOKEN": "{{ string .Secrets.plain }}"})
    empty = Secret(type=SecretType.PLAIN, user_defined=True)
    assert dry_run(manifest, {"plain": empty}) == []


def test_dry_run_is_part_of_load() -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(_manifest(env={"E": "{{ raw .Secrets.sym }}"}))
    assert [p.path for p in info.value.problems] == ["Marbles.m.Parameters.Env.E"]


def test_placeholders_have_the_shape_of_the_real_values() -> None:
    manifest = load_manifest(_manifest())
    sym, cert, plain = (placeholder(manifest.secrets[n]) for n in ("sym", "cert", "plain"))
    assert sym.cert is None and sym.public and sym.private
    assert cert.cert and cert.public and cert.private
    assert plain.cert and plain.public and plain.private


def test_symmetric_key_cert_problem_says_empty_value() -> None:
    result = check(_manifest(files={"/f": "{{ pem .Secrets.sym.Cert }}"}))
    assert "tried to parse secret with empty value" in problem_at(result, FILE_F)


def test_string_reads_the_public_part() -> None:
    # MarbleRun's string encodes .Public; through the Python API the two parts may differ.
    manifest = _loaded({"TOKEN": "{{ string .Secrets.plain }}"})
    public_ok = dataclasses.replace(manifest.secrets["plain"], public=b"fine", private=b"bad\x00")
    assert dry_run(manifest, {"plain": public_ok}) == []
    public_bad = dataclasses.replace(manifest.secrets["plain"], public=b"bad\x00", private=b"fine")
    assert [p.path for p in dry_run(manifest, {"plain": public_bad})] == ["Marbles.m.Parameters.Env.TOKEN"]
