"""The `lab` fixture tears its lab down whatever happens to the test: failure or SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshcloud.lab import netns, plan
from meshcloud.lab.pytest_plugin import lab_unavailable
from meshcloud.lab.wait import wait_for

pytestmark = pytest.mark.root

INNER = """
import time
import pytest

@pytest.mark.lab(racks=1, standin=True)
def test_inner(lab):
    print("LABNAME", lab.name, flush=True)
    if MODE == "fail":
        assert False, "the test fails"
    time.sleep(120)
"""


def _run_inner(tmp_path: Path, mode: str) -> tuple[str, subprocess.Popen[str]]:
    if lab_unavailable():
        pytest.skip(lab_unavailable())
    (tmp_path / "test_inner.py").write_text(f"MODE = {mode!r}\n" + INNER)
    out = tmp_path / "out.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "meshcloud.lab.pytest_plugin",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )  # fmt: skip

    def name() -> str | None:
        for line in out.read_text().splitlines():
            if line.startswith("LABNAME "):
                return line.split()[1]
        if proc.poll() is not None:
            raise AssertionError(f"inner pytest ended early:\n{out.read_text()}")
        return None

    return wait_for(name, 60, "the inner test's lab to come up"), proc


def _gone(lab_name: str) -> bool:
    pattern = plan.netns_pattern(lab_name)
    return not any(pattern.match(ns) for ns in netns.list_netns())


def test_a_failing_test_still_tears_its_lab_down(tmp_path: Path) -> None:
    lab_name, proc = _run_inner(tmp_path, "fail")
    assert proc.wait(timeout=60) == 1
    assert _gone(lab_name)
    out = (tmp_path / "out.txt").read_text()
    assert f"lab {lab_name}" in out and "standin: rack r1" in out  # logs attached to the report


def test_sigterm_still_tears_the_lab_down(tmp_path: Path) -> None:
    lab_name, proc = _run_inner(tmp_path, "hang")
    assert not _gone(lab_name)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert _gone(lab_name)
