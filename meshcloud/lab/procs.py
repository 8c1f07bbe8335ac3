"""Processes the lab starts inside namespaces, and how it stops them.

A process is identified by its pid *and* its kernel start time, so a
recycled pid is never signalled by mistake. Processes are started in a new
session so that they outlive the CLI call that started them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshcloud.lab import netns
from meshcloud.lab.state import ProcessRecord

# Popen objects of children this process started, so that they are reaped.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def is_alive(record: ProcessRecord | None) -> bool:
    """True when the recorded process still runs (or is stopped); zombies are dead."""
    if record is None:
        return False
    _reap()
    stat = proc_stat(record.pid)
    return stat is not None and stat[1] == record.starttime and stat[0] not in ("Z", "X")


def is_stopped(record: ProcessRecord | None) -> bool:
    """True when the recorded process is alive and stopped (SIGSTOP)."""
    if not is_alive(record):
        return False
    assert record is not None
    stat = proc_stat(record.pid)
    return stat is not None and stat[0] in ("T", "t")


def spawn(
    ns: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ProcessRecord:
    """Start ``argv`` inside namespace ``ns`` (``ip netns exec`` execs in place: same pid)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log:
        try:
            child = subprocess.Popen(
                netns.in_netns(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=full_env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise netns.NetnsError(f"cannot start {argv[0]} in {ns}: {exc}") from exc
    _children[child.pid] = child
    stat = proc_stat(child.pid)
    starttime = stat[1] if stat else 0
    return ProcessRecord(pid=child.pid, starttime=starttime, argv=list(argv), log=str(log_path))


def send(record: ProcessRecord | None, sig: int) -> bool:
    """Send ``sig`` to the recorded process if it is still the same process."""
    if record is None or not is_alive(record) or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(record: ProcessRecord, timeout: float) -> bool:
    """Poll until the recorded process is gone; True if it went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while is_alive(record):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def stop(record: ProcessRecord | None, timeout: float = 5.0) -> None:
    """SIGTERM (and SIGCONT, in case it is frozen), then SIGKILL after ``timeout``."""
    if record is None or not is_alive(record):
        return
    send(record, signal.SIGTERM)
    send(record, signal.SIGCONT)
    if not wait_gone(record, timeout):
        send(record, signal.SIGKILL)
        wait_gone(record, 5.0)


def kill_hard(record: ProcessRecord | None) -> None:
    """SIGKILL the recorded process and wait for it to go."""
    if record is not None and send(record, signal.SIGKILL):
        wait_gone(record, 5.0)


def kill_netns_processes(ns: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process inside ``ns`` until none is left; returns the pids killed.

    Repeats because a process may fork while the others die. Never signals
    the calling process.
    """
    if not netns.netns_exists(ns):
        return []
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    me = os.getpid()
    while True:
        pids = [p for p in netns.pids_in_netns(ns) if p != me]
        pids = [p for p in pids if (st := proc_stat(p)) is not None and st[0] not in ("Z", "X")]
        if not pids:
            break
        if time.monotonic() >= deadline:
            raise netns.NetnsError(
                f"processes {pids} in {ns} survived SIGKILL for {timeout} s"
                " (stuck in the kernel?); check them with `ps -o pid,stat,cmd -p ...`"
            )
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
            except ProcessLookupError:
                pass
        _reap()
        time.sleep(0.01)
    _reap()
    return killed


def tail(path: Path | str, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ("" when it does not exist)."""
    try:
        data = Path(path).read_bytes()[-8192:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
