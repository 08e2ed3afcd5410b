"""Public surface, caching, limits, bad arguments, and MarbleRun's sample manifests."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from templating_support import BYTES_0_15, make_data

import marblekeep.templating as templating
from marblekeep.errors import ManifestError, TemplateError
from marblekeep.manifest.model import Secret, SecretType
from marblekeep.templating import FunctionSet, ReservedSecret, Template, TemplateData, parse_template, render
from marblekeep.templating import engine as engine_module
from testsupport import VECTORS_DIR


def test_public_exports() -> None:
    assert sorted(templating.__all__) == sorted(
        [
            "FunctionSet",
            "ReservedSecret",
            "SecretValue",
            "RenderBudget",
            "Template",
            "TemplateData",
            "parse_template",
            "render",
            "render_size",
        ]
    )
    assert FunctionSet("files") is FunctionSet.FILES
    assert FunctionSet("env") is FunctionSet.ENV


def test_template_error_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError) as info:
        parse_template(b"{{ nope }}", FunctionSet.FILES)
    assert isinstance(info.value, TemplateError)
    assert info.value.code == "template_invalid"
    assert info.value.http_status == 400


def test_parse_once_execute_many_with_different_data() -> None:
    template = parse_template(b"k={{ hex .Secrets.symKey }} s={{ hex .MarbleRun.SealKey }}", FunctionSet.ENV)
    first = template.execute(make_data())
    other_key = bytes(range(32, 48))
    second = template.execute(
        make_data(
            secrets={"symKey": Secret(SecretType.SYMMETRIC_KEY, 128, public=other_key)}, seal_key=b"\x01" * 32
        )
    )
    assert first.startswith(b"k=" + BYTES_0_15.hex().encode())
    assert second == b"k=" + other_key.hex().encode() + b" s=" + b"01" * 32
    assert template.functions is FunctionSet.ENV


def test_render_caches_parsed_templates() -> None:
    engine_module._parse_cached.cache_clear()
    source = b"cached {{ hex .Secrets.symKey }}"
    data = make_data()
    assert render(source, FunctionSet.FILES, data) == render(source, FunctionSet.FILES, data)
    info = engine_module._parse_cached.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    # the function set is part of the key
    render(source, FunctionSet.ENV, data)
    assert engine_module._parse_cached.cache_info().misses == 2
    assert engine_module._parse_cached.cache_info().maxsize == engine_module.CACHE_SIZE


def test_render_does_not_cache_huge_sources() -> None:
    engine_module._parse_cached.cache_clear()
    source = b"x" * (engine_module.CACHE_MAX_SOURCE_BYTES + 1) + b"{{ hex .Secrets.symKey }}"
    assert render(source, FunctionSet.FILES, make_data()).endswith(BYTES_0_15.hex().encode())
    assert engine_module._parse_cached.cache_info().currsize == 0


def test_render_caches_parse_errors_not_at_all_but_reports_them_each_time() -> None:
    for _ in range(2):
        with pytest.raises(TemplateError, match="not defined"):
            render(b"{{ raw .Secrets.symKey }}", FunctionSet.ENV, make_data())


def test_bytearray_and_memoryview_sources_are_accepted() -> None:
    assert render(bytearray(b"{{ hex .Secrets.symKey }}"), FunctionSet.FILES, make_data()) == b"%s" % (
        BYTES_0_15.hex().encode()
    )
    assert parse_template(memoryview(b"a{{/*x*/}}b"), FunctionSet.FILES).execute(make_data()) == b"ab"


@pytest.mark.parametrize("bad", ["{{ hex .Secrets.symKey }}", None, 42])
def test_non_bytes_source_is_a_template_error(bad: object) -> None:
    with pytest.raises(TemplateError, match="template source must be bytes"):
        parse_template(bad, FunctionSet.FILES)  # type: ignore[arg-type]


def test_bad_function_set_and_bad_data_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="FunctionSet"):
        parse_template(b"x", "files")  # type: ignore[arg-type]
    template = parse_template(b"{{ hex .Secrets.symKey }}", FunctionSet.FILES)
    with pytest.raises(TemplateError, match="must be a TemplateData"):
        template.execute({"Secrets": {}})  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match="seal_key must be bytes"):
        make_data(seal_key="not bytes")
    with pytest.raises(TemplateError, match="root_ca must be a ReservedSecret"):
        make_data(root_ca=b"der")
    with pytest.raises(TemplateError, match="secrets must be a mapping"):
        make_data(secrets=[("symKey", None)])


def test_malformed_secret_values_are_template_errors() -> None:
    data = make_data(secrets={"symKey": "not a Secret"})
    with pytest.raises(TemplateError, match="unexpected shape"):
        parse_template(b"{{ hex .Secrets.symKey }}", FunctionSet.FILES).execute(data)


def test_text_only_template_returns_the_text() -> None:
    assert parse_template(b"just text\n", FunctionSet.ENV).execute(make_data()) == b"just text\n"


def test_paren_depth_limit() -> None:
    ok = b"{{ hex " + b"(" * 32 + b".Secrets.symKey" + b")" * 32 + b" }}"
    assert render(ok, FunctionSet.FILES, make_data()) == BYTES_0_15.hex().encode()
    too_deep = b"{{ hex " + b"(" * 33 + b".Secrets.symKey" + b")" * 33 + b" }}"
    with pytest.raises(TemplateError, match="nested too deeply"):
        parse_template(too_deep, FunctionSet.FILES)


def test_long_pipelines_are_limited_not_crashing() -> None:
    one = b'{{ "symKey" | index .Secrets | hex }}'
    assert render(one, FunctionSet.FILES, make_data()) == BYTES_0_15.hex().encode()
    stage = b" | index .Secrets | hex"
    ten = parse_template(b'{{ "symKey"' + stage * 10 + b" }}", FunctionSet.FILES)
    with pytest.raises(TemplateError, match="empty value"):  # "000102..." is no secret's name
        ten.execute(make_data())
    with pytest.raises(TemplateError, match="nested too deeply"):
        parse_template(b'{{ "symKey"' + stage * 400 + b" }}", FunctionSet.FILES)


def test_templates_are_shared_safely_between_threads() -> None:
    template = parse_template(b"{{ hex .Secrets.symKey }}-{{ base64 .MarbleRun.SealKey }}", FunctionSet.ENV)
    datas = [make_data(seal_key=bytes([i]) * 32) for i in range(8)]
    expected = [template.execute(d) for d in datas]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(300):
                for d, want in zip(datas, expected, strict=True):
                    assert template.execute(d) == want
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_data_accepts_reserved_secrets_without_keys() -> None:
    data = TemplateData(
        root_ca=ReservedSecret(),
        marble_cert=ReservedSecret(),
        coordinator_root=ReservedSecret(),
        coordinator_intermediate=ReservedSecret(),
        seal_key=b"\x00" * 32,
        secrets={},
        previous_secrets={},
    )
    assert isinstance(parse_template(b"{{ hex .MarbleRun.SealKey }}", FunctionSet.ENV), Template)
    assert render(b"{{ hex .MarbleRun.SealKey }}", FunctionSet.ENV, data) == b"00" * 32
    with pytest.raises(TemplateError, match="empty value"):
        render(b"{{ pem .MarbleRun.RootCA.Cert }}", FunctionSet.ENV, data)


# -- MarbleRun's sample manifests ---------------------------------------------------------------------


def _sample_templates(path: Path) -> list[tuple[str, FunctionSet, bytes]]:
    manifest = json.loads(path.read_text())
    found = []
    for marble_name, marble in manifest.get("Marbles", {}).items():
        params = marble.get("Parameters") or {}
        for kind, functions in (("Files", FunctionSet.FILES), ("Env", FunctionSet.ENV)):
            for name, entry in (params.get(kind) or {}).items():
                if isinstance(entry, str):
                    data = entry.encode()
                elif entry.get("NoTemplates") or (entry.get("Encoding") or "string").lower() != "string":
                    continue
                else:
                    data = entry.get("Data", "").encode()
                found.append((f"{path.name}:{marble_name}.{kind}.{name}", functions, data))
    return found


def test_sample_manifest_templates_parse_as_marblerun_judges_them() -> None:
    samples = VECTORS_DIR / "marblerun-samples"
    accepted = [
        "helloworld.json", "helloc++.json", "estore.json", "gramine-hello.json", "gramine-nginx.json",
        "gramine-redis.json", "occlum-hello.json",
    ]  # fmt: skip
    count = 0
    for name in accepted:
        for _where, functions, data in _sample_templates(samples / name):
            parse_template(data, functions)  # must not raise
            count += 1
    assert count > 5
    # sample-manifest.json is refused by MarbleRun, among other reasons for `raw` in an Env value
    refused = [
        where
        for where, functions, data in _sample_templates(samples / "sample-manifest.json")
        if _parse_fails(data, functions)
    ]
    assert any(".Env." in where for where in refused)


def _parse_fails(data: bytes, functions: FunctionSet) -> bool:
    try:
        parse_template(data, functions)
    except TemplateError as exc:
        return 'function "raw" not defined' in str(exc)
    return False


# -- the examples in docs/templates.md ------------------------------------------------------------------


def test_documented_examples_hold() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "templates.md"
    lines = doc.read_text().splitlines()
    start = lines.index("| Template | Output |")
    data = make_data(
        secrets={"k": Secret(SecretType.SYMMETRIC_KEY, 128, public=BYTES_0_15, private=BYTES_0_15)}
    )
    checked = 0
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        template_cell, output_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        source = template_cell.split("`")[1].encode()
        functions = (
            FunctionSet.FILES if "raw" in template_cell or "Files" in template_cell else FunctionSet.ENV
        )
        if output_cell.startswith("error"):
            with pytest.raises(TemplateError):
                render(source, functions, data)
        elif output_cell.startswith("`"):
            expected = output_cell.strip("`").replace("\\n", "\n").encode()
            assert render(source, functions, data) == expected, template_cell
        elif output_cell == "the 16 bytes":
            assert render(source, functions, data) == BYTES_0_15
        else:
            continue
        checked += 1
    assert checked >= 6
