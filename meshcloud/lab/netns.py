"""Network namespace primitives: argv builders (pure) and one runner.

Everything the lab, the tests and the demo do to namespaces, bridges, veths
and addresses goes through here. Builders return argv lists; :func:`run`
executes them. Nothing builds a shell string.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from meshcloud.core.errors import MeshcloudError

IFNAME_MAX = 15
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class NetnsError(MeshcloudError):
    """A namespace or link operation failed."""


def check_ifname(name: str) -> str:
    """Return ``name`` if it is a valid Linux interface name, else raise."""
    if not _IFNAME_RE.match(name) or ".." in name:
        raise NetnsError(f"interface name {name!r} is invalid (1-{IFNAME_MAX} of [A-Za-z0-9_.-])")
    return name


def check_netns(name: str) -> str:
    """Return ``name`` if it is a valid namespace name, else raise."""
    if not _NETNS_RE.match(name) or ".." in name:
        raise NetnsError(f"namespace name {name!r} is invalid")
    return name


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so that it runs inside ``netns`` (unchanged when None)."""
    if netns is None:
        return list(argv)
    return ["ip", "netns", "exec", check_netns(netns), *argv]


def ip(*args: str, netns: str | None = None) -> list[str]:
    """An ``ip`` command, optionally inside a namespace (``ip -n NS ...``)."""
    if netns is None:
        return ["ip", *args]
    return ["ip", "-n", check_netns(netns), *args]


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one argv (never through a shell); raise NetnsError with stderr when it fails."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout} s") from exc
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]}: not installed (run `make bootstrap`)") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / check_netns(name)).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Names of existing namespaces that start with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def link_exists(name: str, netns: str | None = None) -> bool:
    return (
        run(ip("link", "show", "dev", check_ifname(name), netns=netns), check=False).returncode == 0
    )


def add_netns(name: str) -> None:
    """Create namespace ``name`` with its loopback up."""
    run(["ip", "netns", "add", check_netns(name)])
    run(ip("link", "set", "lo", "up", netns=name))


def delete_netns(name: str) -> None:
    """Delete namespace ``name`` if it exists (its links go with it)."""
    if netns_exists(name):
        run(["ip", "netns", "delete", check_netns(name)], check=False)


def pids_in_netns(name: str) -> list[int]:
    """PIDs of processes inside namespace ``name``."""
    proc = run(["ip", "netns", "pids", check_netns(name)], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def add_bridge(name: str, netns: str | None = None) -> None:
    """Create a Linux bridge (STP off, no forwarding delay) and bring it up."""
    run(ip("link", "add", check_ifname(name), "type", "bridge", "stp_state", "0",
           "forward_delay", "0", netns=netns))  # fmt: skip
    run(ip("link", "set", name, "up", netns=netns))


def add_veth(a: str, b: str, *, a_netns: str | None = None, b_netns: str | None = None) -> None:
    """Create a veth pair ``a``/``b`` and move each end to its namespace."""
    run(ip("link", "add", check_ifname(a), "type", "veth", "peer", "name", check_ifname(b)))
    if a_netns is not None:
        run(ip("link", "set", a, "netns", check_netns(a_netns)))
    if b_netns is not None:
        run(ip("link", "set", b, "netns", check_netns(b_netns)))


def set_master(link: str, bridge: str, netns: str | None = None) -> None:
    run(ip("link", "set", check_ifname(link), "master", check_ifname(bridge), netns=netns))


def set_up(link: str, netns: str | None = None, up: bool = True) -> None:
    run(ip("link", "set", check_ifname(link), "up" if up else "down", netns=netns))


def add_address(link: str, cidr: str, netns: str | None = None) -> None:
    run(ip("addr", "add", cidr, "dev", check_ifname(link), netns=netns))


def delete_link(name: str, netns: str | None = None) -> None:
    if link_exists(name, netns):
        run(ip("link", "delete", check_ifname(name), netns=netns), check=False)


_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


@contextmanager
def thread_in_netns(name: str) -> Iterator[None]:
    """Move the *calling thread* into namespace ``name`` for the block, then back.

    Linux namespaces are per thread: other threads of the process are not
    affected. Children forked by this thread (QEMU, for instance) are born in
    the namespace, and sockets or taps it creates live there.
    """
    target = NETNS_DIR / check_netns(name)
    with _setns_lock:
        home_fd = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        ns_fd = os.open(target, os.O_RDONLY)
    except OSError as exc:
        os.close(home_fd)
        raise NetnsError(f"network namespace {name} does not exist") from exc
    try:
        _setns(ns_fd)
        try:
            yield
        finally:
            _setns(home_fd)
    finally:
        os.close(ns_fd)
        os.close(home_fd)


def enter_netns_for_thread(name: str) -> None:
    """Move the calling thread into ``name`` for good (use as an executor initializer)."""
    target = NETNS_DIR / check_netns(name)
    fd = os.open(target, os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def add_veth_between(
    a: str, a_netns: str, b: str, b_netns: str, *, a_address: str | None = None
) -> None:
    """Create a veth pair with end ``a`` born in ``a_netns`` and ``b`` in ``b_netns``.

    Neither end ever exists in the root namespace, so names only need to be
    unique inside their own namespace (every rack can call its end ``mesh0``).
    ``a_address`` fixes the MAC address of end ``a`` (lowercase aa:bb:cc:dd:ee:ff).
    """
    argv = ["ip", "link", "add", check_ifname(a)]
    if a_address is not None:
        if not _MAC_RE.match(a_address):
            raise NetnsError(f"MAC address {a_address!r} is invalid")
        argv += ["address", a_address]
    run([*argv, "netns", check_netns(a_netns), "type", "veth",
         "peer", "name", check_ifname(b), "netns", check_netns(b_netns)])  # fmt: skip


def tc(*args: str, netns: str | None = None) -> list[str]:
    """A ``tc`` command, optionally inside a namespace (``tc -n NS ...``)."""
    if netns is None:
        return ["tc", *args]
    return ["tc", "-n", check_netns(netns), *args]
