"""Prometheus metrics on --prometheus-addr (reference §9.3, issue 3 item 6): state, activations by
type and reason with bounded labels (no UUID), HTTP request counts and latency per route."""

from __future__ import annotations

import json
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import RunningCoordinator


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[RunningCoordinator]:
    running = RunningCoordinator(tmp_path / "seal", prometheus=True)
    try:
        yield running
    finally:
        running.stop()


def scrape(running: RunningCoordinator) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The raw exposition text and {(sample name, labels): value}."""
    response = httpx.get(running.metrics_url, trust_env=False, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return response.text, samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_coordinator_state_follows_the_state_machine(monitored: RunningCoordinator) -> None:
    _, samples = scrape(monitored)
    assert value(samples, "coordinator_state") == 2
    monitored.set_manifest()
    _, samples = scrape(monitored)
    assert value(samples, "coordinator_state") == 3


def test_activation_metrics_by_type_and_reason_without_uuid(monitored: RunningCoordinator) -> None:
    monitored.set_manifest()
    uuids = [uuid_mod.uuid4() for _ in range(3)]
    with monitored.marble() as marble:
        marble.activate("backend", uuids[0])
        marble.activate("backend", uuids[1])
        marble.activate("once", uuids[2])
        # refusals: MaxActivations, unknown type, replay, altered binding
        assert marble.post(marble.prepare("once").body()).status_code == 403
        assert marble.post(marble.prepare("frontend").body()).status_code == 403
        replayed = marble.prepare("backend")
        assert marble.post(replayed.body()).status_code == 200
        assert marble.post(replayed.body()).status_code == 403
        altered = replayed.doc() | {"nonce": marble.prepare().doc()["nonce"]}
        assert marble.post(json.dumps(altered)).status_code == 403
        # an attacker-chosen type name never becomes a label
        assert marble.post(marble.prepare("x" * 200).body()).status_code == 403

    text, samples = scrape(monitored)
    attempts = "coordinator_marble_activation_attempts_total"
    successes = "coordinator_marble_activation_successes_total"
    refusals = "coordinator_marble_activation_refusals_total"
    assert value(samples, successes, type="backend") == 3
    assert value(samples, successes, type="once") == 1
    assert value(samples, refusals, type="once", reason="max_activations") == 1
    assert value(samples, refusals, type="unknown", reason="unknown_type") == 2
    assert value(samples, refusals, type="backend", reason="replay") == 1
    assert value(samples, refusals, type="backend", reason="binding") == 1
    assert value(samples, attempts, type="backend") == 5
    assert value(samples, attempts, type="once") == 2
    assert value(samples, attempts, type="unknown") == 2

    # Bounded labels: types from the manifest or "unknown"; no UUID anywhere.
    types = {dict(labels).get("type") for (name, labels) in samples if name.startswith("coordinator_marble_")}
    assert types == {"backend", "once", "unknown"}
    assert all("uuid" not in dict(labels) for (_, labels) in samples)
    for u in uuids:
        assert str(u) not in text
    assert "frontend" not in text
    assert "xxxx" not in text


def test_http_counts_and_latency_per_route(monitored: RunningCoordinator) -> None:
    with monitored.client() as client:
        for _ in range(3):
            assert client.get("/api/v2/status").status_code == 200
        assert client.get("/api/v2/quote?nonce=!").status_code == 400
        assert client.get("/status").status_code == 200
        for i in range(5):  # unknown paths must not create a label each
            assert client.get(f"/probe/{i}/{uuid_mod.uuid4()}").status_code == 405
    with monitored.marble() as marble:
        marble.challenge()

    text, samples = scrape(monitored)
    requests = "coordinator_http_requests_total"
    assert value(samples, requests, api="client", route="/api/v2/status", method="GET", code="200") == 3
    assert value(samples, requests, api="client", route="/api/v2/quote", method="GET", code="400") == 1
    assert value(samples, requests, api="client", route="/status", method="GET", code="200") == 1
    assert (
        value(samples, requests, api="marble", route="/marble/v1/challenge", method="POST", code="200") == 1
    )
    unmatched = [
        (dict(labels), v)
        for (name, labels), v in samples.items()
        if name == requests
        and dict(labels)["route"] not in {"/api/v2/status", "/api/v2/quote", "/status"}
        and dict(labels)["api"] == "client"
    ]
    assert len(unmatched) == 1, unmatched
    assert unmatched[0][1] == 5
    assert unmatched[0][0]["code"] == "405"
    assert "/probe/" not in text

    latency = "coordinator_http_request_duration_seconds"
    assert value(samples, f"{latency}_count", api="client", route="/api/v2/status") == 3
    total = value(samples, f"{latency}_sum", api="client", route="/api/v2/status")
    assert 0 < total < 30
    inf_bucket = value(samples, f"{latency}_bucket", api="client", route="/api/v2/status", le="+Inf")
    assert inf_bucket == 3
    assert value(samples, f"{latency}_count", api="marble", route="/marble/v1/challenge") == 1


def test_no_metrics_listener_without_address(coordinator: RunningCoordinator) -> None:
    assert coordinator.config.prometheus_addr == ""
    assert len(coordinator.listeners.runners) == 2  # client and Marble API only
