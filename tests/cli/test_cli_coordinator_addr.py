"""Where ``marblekeep coordinator`` listens: loopback in simulation unless told otherwise."""

from __future__ import annotations

import logging

import pytest

from marblekeep.cli.coordinator_cmd import listen_addresses


def test_simulation_listens_on_loopback_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="marblekeep.coordinator"):
        assert listen_addresses(None, None, simulation=True) == ("127.0.0.1:4433", "127.0.0.1:2001")
    assert "listening on loopback only" in caplog.text and "0.0.0.0" in caplog.text


def test_flags_or_environment_still_choose_all_interfaces(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="marblekeep.coordinator"):
        assert listen_addresses("0.0.0.0:4433", "0.0.0.0:2001", simulation=True) == (
            "0.0.0.0:4433",
            "0.0.0.0:2001",
        )
    assert "loopback" not in caplog.text


def test_in_a_tee_the_default_is_all_interfaces() -> None:
    assert listen_addresses(None, None, simulation=False) == (":4433", ":2001")
