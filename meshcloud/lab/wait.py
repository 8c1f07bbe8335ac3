"""Wait for a condition with a deadline: the only way tests and the lab synchronise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from meshcloud.core.errors import MeshcloudError

T = TypeVar("T")


class WaitTimeout(MeshcloudError, TimeoutError):
    """A condition did not become true before its deadline."""


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value, and return that value.

    Raises WaitTimeout after ``timeout`` seconds; the message names ``what``
    was awaited and, if given, the current state from ``describe()``.
    Exceptions from ``condition`` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" ({describe()})" if describe is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def wait_until_false(
    condition: Callable[[], object], timeout: float, what: str, *, interval: float = 0.05
) -> None:
    """Poll until ``condition()`` is falsy; raises WaitTimeout after ``timeout`` seconds."""
    wait_for(lambda: not condition(), timeout, what, interval=interval)


def holds_for(condition: Callable[[], object], duration: float, *, interval: float = 0.05) -> bool:
    """True if ``condition()`` stays truthy for the whole of ``duration`` seconds.

    For negative checks ("no EOF arrives for 2 s"): the duration is a bound on
    how long we look, not a synchronisation.
    """
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return bool(condition())
