"""Bounded rendering and CPU work off the event loop (issue 11, #4).

- The 3.5 MB "explode" manifest (a PEM expanded ~116,000 times) is refused with a 4xx that names
  the limit and the Marble, and nothing is set.
- While a manifest is validated or a Marble's Parameters are rendered, ``/api/v2/status`` answers.
  The tests hold the CPU work in its worker until status has answered: were it on the event loop,
  status could not answer and the test would fail (no timing is measured).
- The activation backstop: Parameters that pass the dry run with placeholder sizes but exceed the
  limit with the real values are refused, naming the limit.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

import marblekeep.activations as activations_module
import marblekeep.service as service_module
from harness import STATUS_2, STATUS_3, RunningCoordinator, activation_manifest_bytes
from hostile_manifests import explode_manifest
from marblekeep.manifest.limits import MAX_PARAMETERS_BYTES

GATE_TIMEOUT = 60.0


def _post_manifest(rc: RunningCoordinator, raw: bytes) -> httpx.Response:
    with rc.client() as c:
        return c.post("/api/v2/manifest", json={"manifest": base64.b64encode(raw).decode()}, timeout=120)


def test_explode_manifest_is_refused_naming_the_limit_and_the_marble(coordinator: RunningCoordinator) -> None:
    raw = explode_manifest()
    assert 3_400_000 < len(raw) < 3_600_000
    r = _post_manifest(coordinator, raw)
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["status"] == "fail"
    assert str(MAX_PARAMETERS_BYTES) in doc["message"] and "'explode'" in doc["message"]
    [problem] = doc["data"]["problems"]
    assert problem["path"] == "Marbles.explode.Parameters"
    with coordinator.client() as c:
        assert c.get("/api/v2/status").json()["data"]["message"] == STATUS_2


class Gate:
    """Wraps a function so that each call waits (in its thread) until :meth:`open` is called."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.opened.wait(GATE_TIMEOUT):
            raise AssertionError("the gate was never opened: status did not answer meanwhile")
        return self.inner(*args, **kwargs)


def _status_while_held(
    rc: RunningCoordinator, gate: Gate, request: Callable[[], httpx.Response]
) -> httpx.Response:
    """Start ``request``; once it holds ``gate``, ask for the status, then let it go on."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(request)
        try:
            assert gate.entered.wait(GATE_TIMEOUT), "the request never reached the gated work"
            with rc.client() as c:
                status = c.get("/api/v2/status", timeout=20)
            assert status.status_code == 200
        finally:
            gate.opened.set()
        return future.result(timeout=120)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Gate]]:
    """``gated("load_manifest")`` holds manifest validation; ``gated("activate")`` the activation core."""

    def install(name: str) -> Gate:
        module = activations_module if name == "activate" else service_module
        gate = Gate(getattr(module, name))
        monkeypatch.setattr(module, name, gate)
        return gate

    yield install


def test_status_answers_while_a_manifest_is_validated(
    coordinator: RunningCoordinator, gated: Callable[[str], Gate]
) -> None:
    gate = gated("load_manifest")
    raw = activation_manifest_bytes()
    r = _status_while_held(coordinator, gate, lambda: _post_manifest(coordinator, raw))
    assert r.status_code == 200, r.text
    with coordinator.client() as c:
        assert c.get("/api/v2/status").json()["data"]["message"] == STATUS_3


def test_status_answers_while_an_explode_manifest_is_refused(
    coordinator: RunningCoordinator, gated: Callable[[str], Gate]
) -> None:
    gate = gated("load_manifest")
    r = _status_while_held(coordinator, gate, lambda: _post_manifest(coordinator, explode_manifest()))
    assert r.status_code == 400 and str(MAX_PARAMETERS_BYTES) in r.json()["message"]


@pytest.mark.parametrize("marble_type", ["backend", "once"])  # without and with MaxActivations
def test_status_answers_while_an_activation_renders(
    deployed: RunningCoordinator, gated: Callable[[str], Gate], marble_type: str
) -> None:
    gate = gated("activate")
    with deployed.marble() as marble:
        prepared = marble.prepare(marble_type)
        r = _status_while_held(deployed, gate, lambda: marble.post(prepared.body()))
        params = marble.open(prepared, r)
    assert params.env


def _big_leaf_manifest(actions: int) -> bytes:
    doc: dict[str, Any] = json.loads(activation_manifest_bytes())
    doc["Marbles"]["bigleaf"] = {
        "Package": "pkg",
        "Parameters": {"Files": {"/leaf.pem": "{{pem .MarbleRun.MarbleCert.Cert}}" * actions}},
    }
    return json.dumps(doc).encode()


def test_activation_backstop_refuses_parameters_over_the_limit(coordinator: RunningCoordinator) -> None:
    # The dry run counts ~1 KB per leaf PEM: 3,000 of them pass. A Marble asking for 64 long DNS
    # names gets a ~16 KB leaf, so the real Parameters would be ~60 MB: refused at activation.
    assert _post_manifest(coordinator, _big_leaf_manifest(3000)).status_code == 200
    names = tuple(f"{i:02d}-" + "a" * 59 + "." + "b" * 63 + "." + "c" * 63 + ".example" for i in range(64))
    with coordinator.marble() as marble:
        ok = marble.prepare("bigleaf")
        assert marble.open(ok, marble.post(ok.body())).files["/leaf.pem"].count(b"BEGIN CERTIFICATE") == 3000
        big = marble.prepare("bigleaf", dns_names=names)
        r = marble.post(big.body())
    assert r.status_code == 403, r.text
    message = r.json()["message"]
    assert str(MAX_PARAMETERS_BYTES) in message and "Marbles.bigleaf.Parameters" in message
