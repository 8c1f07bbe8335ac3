import os
import subprocess
import sys
from pathlib import Path

from meshcloud.lab import procs
from meshcloud.lab.state import ProcessRecord


def _record(pid: int) -> ProcessRecord:
    stat = procs.proc_stat(pid)
    assert stat is not None
    return ProcessRecord(pid=pid, starttime=stat[1], argv=[], log="")


def test_a_live_process_is_alive_and_a_recycled_pid_is_not() -> None:
    me = _record(os.getpid())
    assert procs.is_alive(me)
    assert not procs.is_alive(ProcessRecord(me.pid, me.starttime + 1, [], ""))
    assert not procs.is_alive(None)


def test_stop_ends_a_process_and_zombies_count_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = _record(child.pid)
    procs.send(record, 19)  # SIGSTOP
    assert procs.wait_gone(record, 0.1) is False
    assert procs.is_stopped(record)
    procs.stop(record, timeout=5)  # SIGTERM + SIGCONT
    assert not procs.is_alive(record)  # a zombie until reaped, and dead all the same
    child.wait()


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert procs.tail(log, 2) == "line 98\nline 99"
    assert procs.tail(tmp_path / "missing") == ""
