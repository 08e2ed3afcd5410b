"""Shared settings for the robustness (fuzz) suite: property tests on every parser that takes input
from the network or from a user's file.

Each parser may only succeed or raise an error of the :class:`~marblekeep.errors.MarbleKeepError`
family (never an ``IndexError``, ``KeyError``, ``RecursionError`` …), and must not hang.

- ``MARBLEKEEP_FUZZ_EXAMPLES`` (default 150): examples per property. CI keeps the default and,
  with ``CI`` set, the repository's hypothesis profile ``ci`` (tests/conftest.py) makes the
  examples a fixed, reproducible set.
- ``MARBLEKEEP_FUZZ_SLOW=1``: also run the slow variants (larger inputs, more examples each), for
  a longer hunt: ``MARBLEKEEP_FUZZ_SLOW=1 MARBLEKEEP_FUZZ_EXAMPLES=5000 .venv/bin/pytest -q -k fuzz``.

"No hang" is checked per example with a generous watchdog (:func:`no_hang`, 20 s for calls that
take microseconds to milliseconds), so a hang fails with the input that caused it instead of
waiting for the suite's global timeout. Nothing here measures speed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import pytest
from hypothesis import HealthCheck, settings

__all__ = ["FUZZ", "HANG_SECONDS", "SLOW", "no_hang", "slow"]

EXAMPLES = int(os.environ.get("MARBLEKEEP_FUZZ_EXAMPLES", "150"))
SLOW_ENABLED = os.environ.get("MARBLEKEEP_FUZZ_SLOW", "") not in ("", "0")
HANG_SECONDS = 20.0

#: Settings for a fuzz property: bounded examples, no per-example deadline (no timing in tests).
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
#: The slow variants' settings (only used when MARBLEKEEP_FUZZ_SLOW is set).
SLOW = settings(FUZZ, max_examples=EXAMPLES * 10)

slow = pytest.mark.skipif(not SLOW_ENABLED, reason="slow fuzz variant: set MARBLEKEEP_FUZZ_SLOW=1")


class Hung(AssertionError):
    pass


@contextlib.contextmanager
def no_hang(what: str, seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail with :class:`Hung` if the body runs longer than ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hung(f"{what} did not return within {seconds:g} s: a hang on this input")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
