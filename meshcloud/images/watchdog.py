"""systemd notification and watchdog keep-alive, using the NOTIFY_SOCKET protocol directly.

On a rack the daemon runs as ``Type=notify`` with ``WatchdogSec=``: it must
say ``READY=1`` once it serves, then ``WATCHDOG=1`` at least every
``WatchdogSec``; if it hangs, systemd kills and restarts it (and after
repeated failures reboots the rack, see meshcloud.service).

Two ways to feed it:

- **in the daemon's event loop** (preferred): run
  :func:`async_feed_watchdog` as a task; a blocked loop stops the pings::

      notifier = SystemdNotifier.from_environ()
      tasks.add(asyncio.create_task(async_feed_watchdog(notifier, stopping, is_healthy)))

- **the rack image's wrapper** (what meshcloud.service runs today):
  ``python -m meshcloud.images.watchdog --config FILE`` runs the daemon and,
  in a thread of the same process, schedules a no-op on the daemon's event
  loop every half period; it pings only when the loop runs it in time, so a
  hung loop still stops the pings. It does not depend on the mesh link
  being up (the API binds the mesh address, which may come later).

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from meshcloud.aio import wait_event

log = logging.getLogger("meshcloud.watchdog")


class SystemdNotifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET``; does nothing without one."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path or None
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> SystemdNotifier:
        """The notifier systemd set up for this process (WATCHDOG_PID must be ours)."""
        env = os.environ if env is None else env
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of WatchdogSec, or None if the watchdog is off."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if sent."""
        if self.socket_path is None:
            return False
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("cannot notify systemd via %s: %s", self.socket_path, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


async def async_feed_watchdog(
    notifier: SystemdNotifier,
    stopping: asyncio.Event,
    is_healthy: Callable[[], bool] = lambda: True,
) -> None:
    """On the event loop: READY=1, then WATCHDOG=1 every half WatchdogSec while healthy."""
    notifier.ready("serving")
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while not stopping.is_set():
        if is_healthy():
            notifier.ping()
        await wait_event(stopping, interval)
    notifier.stopping()


async def _noop() -> None:
    return None


def feed_while_loop_alive(
    notifier: SystemdNotifier,
    loops: queue.Queue[asyncio.AbstractEventLoop],
    stop: threading.Event,
    startup_interval_s: float = 0.5,
) -> None:
    """Thread body: READY=1 once the daemon's event loop answers, then WATCHDOG=1 while it does.

    Each round trip schedules a no-op on the loop and waits at most half a
    ping period for it: a loop blocked by a hung call never answers, so
    systemd stops hearing from the daemon and kills it.
    """
    interval = notifier.watchdog_interval_s
    loop = loops.get()
    ready = False
    while not stop.is_set():
        period = interval if (ready and interval) else startup_interval_s
        try:
            asyncio.run_coroutine_threadsafe(_noop(), loop).result(timeout=max(0.2, period / 2))
        except RuntimeError:
            return  # the loop is closed: the daemon is stopping
        except TimeoutError:
            log.warning("the daemon's event loop did not answer within %.1f s", period / 2)
        else:
            if not ready:
                notifier.ready("event loop running")
                # on the console too (the unit logs at notice): systemd's own
                # "Started meshcloud.service" can be missing there when the
                # daemon's lines reach the console at the same moment
                log.info("told systemd the daemon is ready (READY=1)")
                ready = True
                if interval is None:
                    return  # no watchdog: READY was all systemd wanted
            else:
                notifier.ping()
        stop.wait(period)


class _LoopRecorder(asyncio.DefaultEventLoopPolicy):
    """An event loop policy that hands each new loop to the watchdog thread."""

    def __init__(self, loops: queue.Queue[asyncio.AbstractEventLoop]) -> None:
        super().__init__()
        self.loops = loops

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        self.loops.put(loop)
        return loop


def main(argv: list[str] | None = None) -> int:
    """``python -m meshcloud.images.watchdog --config FILE``: the daemon, with systemd pings."""
    parser = argparse.ArgumentParser(prog="python -m meshcloud.images.watchdog")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    from meshcloud.config import load_config
    from meshcloud.core.errors import MeshcloudError
    from meshcloud.daemon import run_daemon
    from meshcloud.log import setup_logging

    try:
        cfg = load_config(args.config)
    except MeshcloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    setup_logging(rack=cfg.rack.name, level=args.log_level)
    notifier = SystemdNotifier.from_environ()
    stop = threading.Event()
    if notifier.enabled:
        loops: queue.Queue[asyncio.AbstractEventLoop] = queue.Queue()
        asyncio.set_event_loop_policy(_LoopRecorder(loops))
        threading.Thread(
            target=feed_while_loop_alive,
            args=(notifier, loops, stop),
            name="sd-watchdog",
            daemon=True,
        ).start()
    try:
        run_daemon(cfg)
    except MeshcloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        notifier.stopping()
    return 0


if __name__ == "__main__":
    sys.exit(main())
