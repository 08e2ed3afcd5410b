"""Marbles cannot take the Coordinator's own names (issue 11, #9); loopback stays shared."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from marblekeep.core.deployment import new_deployment
from marblekeep.core.marblenames import check_marble_names, coordinator_names
from marblekeep.errors import ActivationRefused

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ROOT = new_deployment(
    ("localhost", "coordinator.example.com", "10.1.2.3", "2001:db8::7"), NOW, os.urandom
).ca.root.cert
# configured later (EDG_COORDINATOR_DNS_NAMES changed after the root was made)
NAMES = coordinator_names(ROOT, ("coord.internal", "*.mesh.example.org", "localhost", "127.0.0.1"))


def test_names_come_from_the_configuration_and_the_root() -> None:
    assert NAMES.dns == {"coordinator.example.com", "coord.internal", "*.mesh.example.org"}
    assert {str(ip) for ip in NAMES.ips} == {"10.1.2.3", "2001:db8::7"}


@pytest.mark.parametrize(
    "name",
    [
        "coordinator.example.com",
        "Coordinator.Example.COM.",
        "*.example.com",
        "coord.internal",
        "*.internal",
        "api.mesh.example.org",  # matched by the Coordinator's wildcard
        "*.mesh.example.org",
        "10.1.2.3",
        "::ffff:10.1.2.3",
        "2001:db8:0:0:0:0:0:7",
    ],
)
def test_coordinator_names_are_refused(name: str) -> None:
    with pytest.raises(ActivationRefused) as err:
        check_marble_names(("backend.example.com", name), NAMES)
    assert err.value.reason == "dns_names"
    assert repr(name) in err.value.message and "EDG_MARBLE_DNS_NAMES" in err.value.message


@pytest.mark.parametrize(
    "name",
    [
        "localhost",
        "LOCALHOST.",
        "backend.localhost",
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "backend.example.com",
        "example.com",
        "x.coordinator.example.com",  # deeper than the name: no wildcard covers it
        "a.b.mesh.example.org",
        "10.1.2.4",
    ],
)
def test_other_names_and_loopback_are_allowed(name: str) -> None:
    check_marble_names((name,), NAMES)
