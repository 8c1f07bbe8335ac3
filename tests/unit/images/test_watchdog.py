"""sd_notify over a real datagram socket; the watchdog feeders."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcloud.images.watchdog import SystemdNotifier, async_feed_watchdog, feed_while_loop_alive


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_from_environ() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_environ(env)
    assert notifier.enabled and notifier.watchdog_interval_s == 10.0
    other_pid = SystemdNotifier.from_environ({**env, "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval_s is None  # the watchdog is meant for another process
    off = SystemdNotifier.from_environ({})
    assert not off.enabled and off.notify("READY=1") is False


def test_notify_sends_fields(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = SystemdNotifier(path)
    assert notifier.ready("serving")
    assert receive(sock) == "READY=1\nSTATUS=serving"
    assert notifier.ping()
    assert receive(sock) == "WATCHDOG=1"


def test_abstract_socket_names() -> None:
    name = f"meshcloud-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert SystemdNotifier("@" + name).notify("STATUS=x")
        assert receive(sock) == "STATUS=x"


async def test_async_feed_pings_until_stopped(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = SystemdNotifier(path, watchdog_usec=100_000)  # ping every 0.05 s
    stopping = asyncio.Event()
    task = asyncio.create_task(async_feed_watchdog(notifier, stopping))
    got = [await asyncio.to_thread(receive, sock) for _ in range(3)]
    stopping.set()
    await task
    assert got[0].startswith("READY=1") and got[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert await asyncio.to_thread(receive, sock) == "STOPPING=1"


def test_loop_feeder_pings_only_while_the_loop_runs(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, sock = notify_socket
    notifier = SystemdNotifier(path, watchdog_usec=200_000)
    loop = asyncio.new_event_loop()
    loops: queue.Queue[asyncio.AbstractEventLoop] = queue.Queue()
    loops.put(loop)
    stop = threading.Event()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    feeder = threading.Thread(target=feed_while_loop_alive, args=(notifier, loops, stop, 0.05))
    feeder.start()
    try:
        assert receive(sock).startswith("READY=1")
        assert receive(sock) == "WATCHDOG=1"
        # Block the loop: the pings stop.
        blocked = threading.Event()
        release = threading.Event()
        loop.call_soon_threadsafe(lambda: (blocked.set(), release.wait(10)))
        assert blocked.wait(10)
        while True:  # drain pings already sent before the loop blocked
            sock.settimeout(0.5)
            try:
                receive(sock)
            except TimeoutError:
                break
        with pytest.raises(TimeoutError):
            receive(sock)
        release.set()
        sock.settimeout(10)
        assert receive(sock) == "WATCHDOG=1"
    finally:
        stop.set()
        release.set()
        feeder.join(10)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
