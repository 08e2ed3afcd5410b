"""Issue 12 item 11: the OpenAPI document is true to the routes, valid, served, and its examples are
valid instances of their own schemas.

The routes are read from the applications a running Coordinator actually serves (its listeners'
runners), not from a list kept beside the code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from schemathesis.specs.openapi import definitions

from harness import RunningCoordinator
from marblekeep.api.openapi import OPENAPI_PATH, document
from marblekeep.api.server import API_NAME_KEY
from testsupport import REPO_ROOT

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    rc = RunningCoordinator(tmp_path_factory.mktemp("openapi") / "seal", prometheus=True)
    try:
        yield rc
    finally:
        rc.stop()


def _listener_of(path_item: dict[str, Any]) -> str:
    """Which listener serves a documented path: its path-level ``servers`` (default: Client API)."""
    servers = path_item.get("servers")
    if not servers:
        return "client"
    url = servers[0]["url"]
    port = servers[0]["variables"]["port"]["default"]
    if url.startswith("http://"):
        return "metrics"
    assert port == "2001", f"unexpected path-level server {servers}"
    return "marble"


def documented_operations() -> set[tuple[str, str, str]]:
    ops = set()
    for path, item in document()["paths"].items():
        for method in METHODS:
            if method in item:
                ops.add((_listener_of(item), method.upper(), path))
    return ops


def served_routes(rc: RunningCoordinator) -> set[tuple[str, str, str]]:
    routes = set()
    for runner in rc.listeners.runners:
        app = runner.app
        listener = app.get(API_NAME_KEY, "metrics")
        for route in app.router.routes():
            assert route.resource is not None
            routes.add((listener, route.method, route.resource.canonical))
    return routes


def test_every_served_route_is_documented_and_every_documented_operation_is_served(
    running: RunningCoordinator,
) -> None:
    served = served_routes(running)
    assert {listener for listener, _, _ in served} == {"client", "marble", "metrics"}
    # aiohttp answers HEAD for every GET route (HTTP semantics; the document's description says so).
    heads = {(listener, path) for listener, method, path in served if method == "HEAD"}
    gets = {(listener, path) for listener, method, path in served if method == "GET"}
    assert heads == gets
    served_without_head = {r for r in served if r[1] != "HEAD"}
    documented = documented_operations()
    assert served_without_head - documented == set(), "served but not in openapi.json"
    assert documented - served_without_head == set(), "in openapi.json but not served"
    assert len(documented) == 33


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    errors = [str(e) for e in definitions.OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert errors == []
    schemathesis.openapi.from_dict(doc).validate()
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def test_a_broken_document_is_caught_by_the_validity_check() -> None:
    # The check above can fail: a parameter without "in" is not OpenAPI.
    doc = document()
    del doc["paths"]["/api/v2/quote"]["get"]["parameters"][0]["in"]
    assert list(definitions.OPENAPI_31_VALIDATOR.iter_errors(doc))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_resolves_and_every_component_is_used() -> None:
    doc = document()
    refs = set(_refs(doc))
    for ref in refs:
        assert ref.startswith("#/components/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]
    components = doc["components"]
    defined = {f"#/components/{kind}/{n}" for kind in ("schemas", "responses") for n in components[kind]}
    assert defined - refs == set(), "unused components"


def _examples(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, schema, example) for every media-type example of a request or response."""
    for path, item in doc["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            bodies = [("request", op.get("requestBody", {}))]
            bodies += [(f"response {code}", resp) for code, resp in op["responses"].items()]
            for what, given in bodies:
                body = given
                if "$ref" in given:
                    body = doc["components"]["responses"][given["$ref"].rsplit("/", 1)[1]]
                for media_type, media in body.get("content", {}).items():
                    where = f"{method.upper()} {path} {what} {media_type}"
                    if "example" in media:
                        yield where, media["schema"], media["example"]
                    for name, example in media.get("examples", {}).items():
                        yield f"{where} ({name})", media["schema"], example["value"]
            for param in op.get("parameters", []):
                if "example" in param:
                    where = f"{method.upper()} {path} parameter {param['name']}"
                    yield where, param["schema"], param["example"]


def test_every_example_is_an_instance_of_its_schema() -> None:
    doc = document()
    examples = list(_examples(doc))
    assert len(examples) > 40
    for where, schema, example in examples:
        validator = jsonschema_rs.Draft202012Validator(
            {"components": doc["components"], "allOf": [schema]}, validate_formats=True
        )
        errors = [e.message for e in validator.iter_errors(example)]
        assert errors == [], f"{where}: {errors}"


def test_the_document_is_served_without_a_client_certificate(running: RunningCoordinator) -> None:
    with running.client() as c:
        r = c.get(OPENAPI_PATH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == document()
    shipped = (REPO_ROOT / "src" / "marblekeep" / "api" / "openapi.json").read_bytes()
    assert r.content == shipped


def test_the_document_covers_what_a_new_user_asks_about() -> None:
    doc = document()
    secrets_post = doc["paths"]["/api/v2/secrets"]["post"]
    example = next(iter(secrets_post["requestBody"]["content"]["application/json"]["examples"].values()))
    assert set(example["value"]) == {"secrets"}  # the body shape that confused a new user
    for path in ("manifest", "status", "update", "recover", "secrets"):
        assert f"/api/v2/{path}" in doc["paths"]


def test_the_docs_link_the_reference() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "docs/api.md" in readme
    api_md = (REPO_ROOT / "docs" / "api.md").read_text()
    assert "../src/marblekeep/api/openapi.json" in api_md
    assert "/api/v2/openapi.json" in api_md


def test_documented_curl_paths_exist() -> None:
    """Every ``/api/...`` path that docs/api.md shows is a documented path."""
    api_md = (REPO_ROOT / "docs" / "api.md").read_text()
    shown = set(re.findall(r"(/api/v2/[a-z/.-]*[a-z])", api_md))
    assert shown
    assert shown <= set(document()["paths"]), shown - set(document()["paths"])


def test_shipped_as_package_data() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"api/openapi.json"' in pyproject
    shipped = Path(__file__).resolve().parents[2] / "src" / "marblekeep" / "api" / "openapi.json"
    assert json.loads(shipped.read_text())["openapi"] == "3.1.0"


def test_a_405_lists_the_documented_methods_in_allow(running: RunningCoordinator) -> None:
    """Found by schemathesis (check ``unsupported_method``): 405 answers had no ``Allow`` header
    (RFC 9110 §15.5.6). A wrong method on a documented path lists exactly the documented methods
    (and HEAD for GET); an unknown path, where every method is 405 for MarbleRun's clients, an
    empty list."""
    doc = document()
    with running.client() as client:
        for path, item in doc["paths"].items():
            if item.get("servers"):
                continue  # other listeners; the Marble API is checked below
            documented = {m.upper() for m in METHODS if m in item}
            if "GET" in documented:
                documented.add("HEAD")
            wrong = "PUT"
            r = client.request(wrong, path)
            assert r.status_code == 405, path
            assert {m.strip() for m in r.headers["allow"].split(",")} == documented, path
            assert r.json() == {"status": "error", "data": None}
        r = client.get("/api/v2/does-not-exist")
        assert r.status_code == 405
        assert r.headers["allow"] == ""
    with running.marble() as marble:
        r = marble.http.get("/marble/v1/activate")
        assert r.status_code == 405
        assert r.headers["allow"] == "POST"
