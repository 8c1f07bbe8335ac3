"""pytest fixtures for the lab: a Lab that is always torn down, and waiting helpers.

Registered in tests/conftest.py (``pytest_plugins = ["meshcloud.lab.pytest_plugin"]``).

- ``lab_factory``: ``make(racks=3, **up_kwargs) -> Lab`` brings up a lab with a
  unique name; every lab it made is torn down after the test, also when the
  test fails or is interrupted (Ctrl-C, SIGTERM). On failure the racks' logs
  are copied to the test's tmp_path and their tails attached to the report.
- ``lab``: a lab brought up from the ``@pytest.mark.lab(...)`` marker's
  keyword arguments (same as :meth:`Lab.up`, plus ``standin=True`` for the
  stand-in daemon); default 3 racks with the real daemon.
- ``wait_for``: :func:`meshcloud.lab.wait.wait_for`.

Labs made here record the pytest process as their owner; at the start of a
session, labs whose owner has died (a killed test run) are removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshcloud.lab import procs
from meshcloud.lab.lab import Lab, labs, standin_daemon_argv
from meshcloud.lab.network import REQUIRED_TOOLS
from meshcloud.lab.state import LabStateError, default_root, load_state
from meshcloud.lab.wait import wait_for as _wait_for

TEST_LAB_PREFIX = "t"
MakeLab = Callable[..., Lab]
_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()


def lab_unavailable() -> str | None:
    """Why the lab cannot run here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    missing = [t for t in (*REQUIRED_TOOLS, "sshd", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        return f"the lab needs {', '.join(missing)} (make bootstrap)"
    return None


def reap_orphan_labs(root: Path | None = None) -> list[str]:
    """Tear down labs whose owner process is gone; returns their names."""
    reaped = []
    root = root if root is not None else default_root()
    for name in labs(root):
        try:
            state = load_state(root, name)
        except LabStateError:
            continue
        if state is None or state.owner_pid is None:
            continue
        stat = procs.proc_stat(state.owner_pid)
        if stat is None or (state.owner_starttime is not None and stat[1] != state.owner_starttime):
            Lab(name, root).down()
            reaped.append(name)
    return reaped


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab(**kwargs): arguments for the `lab` fixture (see Lab.up; standin=True)"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    if lab_unavailable() is None:
        reap_orphan_labs()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _teardown_on_sigterm() -> None:
    """SIGTERM would end the run without teardown: make it a KeyboardInterrupt,
    which pytest answers by running fixture finalizers. Installed once a lab is made."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_report_key, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_report_key, {})
    return any(r.failed for r in reports.values())


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLab]:
    """``make(racks=3, standin=False, **up_kwargs)``: a fresh lab, always torn down."""
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made: list[Lab] = []
    _teardown_on_sigterm()

    def make(racks: int = 3, *, standin: bool = False, **kwargs: Any) -> Lab:
        lab = Lab(f"{TEST_LAB_PREFIX}{secrets.token_hex(3)}")
        made.append(lab)
        if standin:
            kwargs.setdefault("daemon_argv", standin_daemon_argv())
        lab.up(racks, owner_pid=os.getpid(), **kwargs)
        return lab

    try:
        yield make
    finally:
        failed = _failed(request.node)
        for lab in made:
            if failed and lab.dir.is_dir():
                logs = tmp_path / f"lab-{lab.name}-logs"
                try:
                    lab.down(keep_logs=logs)
                finally:
                    request.node.add_report_section("teardown", f"lab {lab.name}", _tails(logs))
            else:
                lab.down()


def _tails(logs: Path) -> str:
    parts = [f"logs copied to {logs}"]
    for log in sorted(logs.glob("*/*.log")):
        parts.append(f"--- {log.parent.name}/{log.name}\n{procs.tail(log, 20)}")
    return "\n".join(parts)


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_factory: MakeLab) -> Lab:
    """A lab made from the ``@pytest.mark.lab(...)`` arguments (default: 3 racks)."""
    marker = request.node.get_closest_marker("lab")
    kwargs = dict(marker.kwargs) if marker else {}
    return lab_factory(**kwargs)


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """:func:`meshcloud.lab.wait.wait_for`: poll a condition with a deadline."""
    return _wait_for
