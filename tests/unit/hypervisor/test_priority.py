"""Guests yield the CPU: nice values of every thread and of the autogroup."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.hypervisor.priority import check_nice, deprioritise, qemu_pid_file, read_pid

THREADS = """
import sys, threading
stop = threading.Event()
for _ in range(3):
    threading.Thread(target=stop.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def guest() -> Iterator[subprocess.Popen[str]]:
    """A stand-in QEMU: four threads, in a session (and so an autogroup) of its own."""
    proc = subprocess.Popen(
        [sys.executable, "-c", THREADS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def test_every_thread_and_the_autogroup_get_the_nice_value(
    guest: subprocess.Popen[str],
) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    done = deprioritise(guest.pid, 7)
    tids = [int(t) for t in os.listdir(f"/proc/{guest.pid}/task")]
    assert done.threads == len(tids) >= 4
    assert all(os.getpriority(os.PRIO_PROCESS, tid) == 7 for tid in tids)
    autogroup = Path(f"/proc/{guest.pid}/autogroup")
    if autogroup.exists():
        assert done.autogroup and autogroup.read_text().split()[-1] == "7"
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the daemon itself is untouched


def test_a_gone_process_and_bad_values_are_refused(guest: subprocess.Popen[str]) -> None:
    with pytest.raises(InvalidInput, match="between 0 and 19"):
        check_nice(20)
    with pytest.raises(InvalidInput, match="between 0 and 19"):
        deprioritise(guest.pid, -5)
    with pytest.raises(InvalidInput, match="not a guest"):
        deprioritise(1, 5)
    guest.kill()
    guest.wait(timeout=10)
    with pytest.raises(ProcessLookupError):
        deprioritise(guest.pid, 5)


def test_pid_files(tmp_path: Path) -> None:
    path = qemu_pid_file(tmp_path, "mc-voip")
    assert path == tmp_path / "qemu" / "mc-voip.pid"
    assert read_pid(path) is None
    path.parent.mkdir()
    path.write_text("4242\n")
    assert read_pid(path) == 4242
    path.write_text("garbage")
    assert read_pid(path) is None
    for hostile in ("../x", "a/b", "..", ""):
        with pytest.raises(InvalidInput):
            qemu_pid_file(tmp_path, hostile)
