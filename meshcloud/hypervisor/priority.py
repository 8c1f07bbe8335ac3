"""Appliances yield the CPU to the control plane: the niceness of a QEMU process.

A rack's daemon renews its lease, answers Raft and the API, and ships
replicas; a guest that spins (under TCG, every guest instruction is host
work) must not starve it, or the rack loses its lease and fences its own
appliances. So every QEMU the agent starts runs at ``hypervisor.guest_nice``:

- each thread's nice value (``setpriority``), which orders the guest behind
  the daemon inside one scheduling group (a systemd unit's cgroup), and
- the nice value of the process's autogroup (``/proc/PID/autogroup``): libvirt
  starts QEMU in a session of its own, and with ``kernel.sched_autogroup_enabled``
  every session is a scheduling group that gets an equal share whatever the
  nice values of its threads. Without this, ten guests get ten shares and
  the daemon one.

Threads QEMU starts later inherit the nice value of the thread that starts
them. Neither setting limits a guest on an idle machine.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from meshcloud.core.errors import InvalidInput

PROC = Path("/proc")


@dataclass(frozen=True)
class Deprioritised:
    pid: int
    nice: int
    threads: int  # threads whose nice value was set
    autogroup: bool  # whether the autogroup's nice value was set


def check_nice(nice: int) -> int:
    if not 0 <= nice <= 19:
        raise InvalidInput(f"guest nice value {nice} must be between 0 and 19")
    return nice


def deprioritise(pid: int, nice: int, *, proc: Path = PROC) -> Deprioritised:
    """Set every thread of ``pid`` and its autogroup to ``nice``; threads that exit meanwhile are skipped.

    Raises ProcessLookupError if the process is gone.
    """
    check_nice(nice)
    if pid <= 1:
        raise InvalidInput(f"pid {pid} is not a guest process")
    task_dir = proc / str(pid) / "task"
    try:
        tids = [int(t) for t in os.listdir(task_dir) if t.isdigit()]
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    done = 0
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            done += 1
    autogroup = False
    with contextlib.suppress(OSError):  # absent when the kernel has no autogroups
        (proc / str(pid) / "autogroup").write_text(f"{nice}\n")
        autogroup = True
    return Deprioritised(pid, nice, done, autogroup)


def qemu_pid_file(run_dir: Path, domain: str) -> Path:
    """Where libvirt's QEMU driver records a running domain's PID (``RUN/qemu/NAME.pid``)."""
    if "/" in domain or domain in ("", ".", ".."):
        raise InvalidInput(f"domain name {domain!r} cannot name a file")
    return run_dir / "qemu" / f"{domain}.pid"


def read_pid(path: Path) -> int | None:
    """The PID in a pid file, or None if there is none (the guest is not running)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None
