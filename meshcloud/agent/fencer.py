"""The fencing helper: kills this host's (or this namespace's) QEMU when not re-armed in time.

A software stand-in for a hardware watchdog, used in the lab (one per rack)
and available on racks without one. It is a separate process, so a hung or
frozen daemon cannot keep appliances running: the daemon arms it with a
deadline (CLOCK_BOOTTIME seconds: its lease expiry) whenever it may run
appliances; when a deadline passes without a newer one, every QEMU process
in scope is killed with SIGKILL.

Protocol: datagrams on a unix socket, ``arm <deadline>`` or ``disarm``.
Only processes of the same user may write to the socket (mode 0600).

Run: ``python -m meshcloud.agent.fencer --socket PATH [--scope netns|host]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path

from meshcloud import clock

log = logging.getLogger("meshcloud.fencer")

QEMU_PREFIX = "qemu-system-"
MAX_DATAGRAM = 128


def parse_message(data: bytes) -> float | None:
    """``arm <deadline>`` → deadline; ``disarm`` → None; anything else raises ValueError."""
    text = data.decode("ascii", errors="strict").strip()
    if text == "disarm":
        return None
    verb, _, value = text.partition(" ")
    if verb != "arm":
        raise ValueError(f"unknown message {text[:40]!r}")
    deadline = float(value)
    if deadline != deadline or deadline in (float("inf"), float("-inf")):
        raise ValueError("deadline must be finite")
    return deadline


def _netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def qemu_pids(scope: str) -> list[int]:
    """PIDs of QEMU processes in scope: this network namespace, or the whole host."""
    mine = _netns_inode("self")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if not comm.startswith(QEMU_PREFIX):
            continue
        if scope == "netns" and _netns_inode(entry) != mine:
            continue
        pids.append(int(entry))
    return pids


def fence(scope: str) -> list[int]:
    """SIGKILL every QEMU in scope; return the PIDs signalled."""
    killed = []
    for pid in qemu_pids(scope):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def raise_priority() -> str:
    """Run ahead of the workloads: a real-time class if allowed, else the top nice level.

    The helper sleeps almost all the time; when its deadline passes it must
    act at once even on a rack whose CPUs are saturated (its lateness is
    logged with every kill, and the leader's ``margin_s`` must cover it).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return "SCHED_FIFO"
    except (OSError, AttributeError):
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except OSError:
        return "default"


def serve(sock_path: Path, scope: str) -> None:
    """Run until SIGTERM: arm, disarm, and fence when the deadline passes."""
    if sock_path.exists():
        sock_path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(sock_path))
    finally:
        os.umask(old_umask)

    def stop(_sig: int, _frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    priority = raise_priority()
    log.info("fencer ready on %s (scope %s, scheduling %s)", sock_path, scope, priority)
    try:
        _loop(sock, scope)
    except _Stop:
        log.info("fencer stopping")
    finally:
        sock.close()
        sock_path.unlink(missing_ok=True)


class _Stop(Exception):
    """Raised by the signal handler to leave the loop (select is restarted otherwise)."""


def _loop(sock: socket.socket, scope: str) -> None:
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - clock.now())
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if readable:
            data = sock.recv(MAX_DATAGRAM)
            try:
                new = parse_message(data)
            except ValueError as exc:
                log.warning("ignoring a bad message: %s", exc)
                continue
            if new is None:
                deadline = None
            elif deadline is None or new > deadline:
                deadline = new
            continue
        if deadline is not None and clock.now() >= deadline:
            late = clock.now() - deadline
            killed = fence(scope)
            log.warning(
                "deadline passed without re-arming: killed QEMU %s (%.3f s after the deadline)",
                killed or "(none)",
                late,
            )
            deadline = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshcloud-fencer", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--scope", choices=("netns", "host"), default="netns")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fencer %(levelname)s %(message)s")
    serve(args.socket, args.scope)
    return 0


if __name__ == "__main__":
    sys.exit(main())
