"""The demo's bookkeeping: its state file and ending only the processes it started."""

import subprocess
import sys
from pathlib import Path

from meshcloud.demo import DemoState, end_process, process_start_ticks, rack_netns


def test_state_round_trip(tmp_path: Path) -> None:
    state = DemoState(state_dir=str(tmp_path), netns=["mcdemo-r1"], forwarder_pid=12)
    state.libvirt_roots["mcdemo-r1"] = "/x/libvirt"
    state.save()
    assert DemoState.load(tmp_path) == state
    assert DemoState.load(tmp_path / "missing") is None


def test_end_process_checks_the_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_ticks(proc.pid)
        assert start is not None
        assert not end_process(proc.pid, start + 1)  # a reused PID is left alone
        assert proc.poll() is None
        assert end_process(proc.pid, start)
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert process_start_ticks(proc.pid) is None
    assert not end_process(proc.pid, start)


def test_rack_namespaces_are_prefixed() -> None:
    assert rack_netns("r1") == "mcdemo-r1"
