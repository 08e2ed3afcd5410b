"""Prometheus metrics of one Coordinator (exposed on ``--prometheus-addr`` at ``/metrics``).

Labels are bounded: Marble types come from the manifest (an unknown type is counted as
``unknown``), refusal reasons are a closed set, routes are the registered route templates. There is
no per-UUID label (MarbleRun's has unbounded cardinality).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CollateralStatus = Callable[[], list[dict[str, object]]]


class _CollateralCollector(Collector):
    """Age and remaining validity of each cached collateral entry, read at scrape time."""

    def __init__(self, status: CollateralStatus) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "coordinator_collateral_age_seconds", "Seconds since the collateral was fetched", labels=["key"]
        )
        expires = GaugeMetricFamily(
            "coordinator_collateral_expires_in_seconds",
            "Seconds until the collateral expires (negative: expired, no longer used)",
            labels=["key"],
        )
        for entry in self._status():
            key = str(entry.get("key", ""))
            age_value = entry.get("age_seconds", 0)
            expires_value = entry.get("expires_in_seconds", 0)
            age.add_metric([key], float(age_value) if isinstance(age_value, int | float) else 0.0)
            expires.add_metric([key], float(expires_value) if isinstance(expires_value, int | float) else 0.0)
        yield age
        yield expires

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, state: Callable[[], float], collateral: CollateralStatus | None = None) -> None:
        self.registry = CollectorRegistry()
        if collateral is not None:
            self.registry.register(_CollateralCollector(collateral))
        self.state = Gauge(
            "coordinator_state",
            "The Coordinator's state: 1 recovery, 2 accepting a manifest, 3 accepting Marbles",
            registry=self.registry,
        )
        self.state.set_function(state)
        self.activation_attempts = Counter(
            "coordinator_marble_activation_attempts",
            "Marble activation requests, by Marble type",
            ["type"],
            registry=self.registry,
        )
        self.activation_successes = Counter(
            "coordinator_marble_activation_successes",
            "Successful Marble activations, by Marble type",
            ["type"],
            registry=self.registry,
        )
        self.activation_refusals = Counter(
            "coordinator_marble_activation_refusals",
            "Refused Marble activations, by Marble type and reason",
            ["type", "reason"],
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "coordinator_grpc_requests",
            "gRPC calls on the Marble API (MarbleRun's protocol), by method and gRPC status",
            ["method", "status"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "coordinator_http_requests",
            "HTTP requests, by API, route, method and status code",
            ["api", "route", "method", "code"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "coordinator_http_request_duration_seconds",
            "HTTP request latency, by API and route",
            ["api", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=self.registry,
        )
