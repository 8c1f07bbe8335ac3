"""Watchdogs: what stops appliances when the daemon cannot.

The daemon calls ``arm(deadline)`` with its lease expiry (CLOCK_BOOTTIME)
whenever it may run appliances, and ``disarm()`` once none runs. If the
daemon hangs, the deadline passes and the watchdog acts on its own:

* :class:`FencerWatchdog` talks to the fencing helper (meshcloud.agent.fencer),
  a separate process that kills QEMU (the lab, racks without a device).
* :class:`DeviceWatchdog` pets ``/dev/watchdog`` (softdog or hardware) only
  while the deadline is ahead: the host reboots if it is not petted.
* :class:`NoWatchdog` does nothing (development only; logged loudly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path

from meshcloud import clock

log = logging.getLogger("meshcloud.watchdog")


class Watchdog(ABC):
    """Contract: after ``arm(d)``, appliances on this host die soon after ``d`` unless re-armed."""

    @abstractmethod
    def arm(self, deadline: float) -> None:
        """Appliances may run until ``deadline`` (CLOCK_BOOTTIME seconds)."""

    @abstractmethod
    def disarm(self) -> None:
        """No appliance runs here: nothing to guard."""

    def tick(self) -> None:  # noqa: B027 - optional hook
        """Called often by the daemon's loop (a device watchdog pets here)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (a device is closed with the magic character)."""


class NoWatchdog(Watchdog):
    def __init__(self) -> None:
        log.warning("no watchdog: a hung daemon could keep appliances running (development only)")

    def arm(self, deadline: float) -> None:
        pass

    def disarm(self) -> None:
        pass


class FencerWatchdog(Watchdog):
    """Sends deadlines to the fencing helper's unix socket; never blocks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self._warned = False

    def _send(self, text: str) -> None:
        try:
            self.sock.sendto(text.encode(), str(self.path))
            self._warned = False
        except OSError as exc:
            if not self._warned:
                log.error("fencing helper at %s unreachable: %s", self.path, exc)
                self._warned = True

    def arm(self, deadline: float) -> None:
        self._send(f"arm {deadline:.6f}")

    def disarm(self) -> None:
        self._send("disarm")

    def close(self) -> None:
        self.sock.close()


class DeviceWatchdog(Watchdog):
    """Pets a Linux watchdog device while the deadline is ahead."""

    def __init__(self, device: Path) -> None:
        self.fd = os.open(device, os.O_WRONLY)
        self.deadline: float | None = None
        self.armed = False

    def arm(self, deadline: float) -> None:
        self.deadline = deadline if self.deadline is None else max(self.deadline, deadline)
        self.armed = True
        self.tick()

    def disarm(self) -> None:
        self.armed = False
        self.tick()

    def tick(self) -> None:
        if not self.armed or (self.deadline is not None and clock.now() < self.deadline):
            os.write(self.fd, b"\0")

    def close(self) -> None:
        os.write(self.fd, b"V")  # magic close: stop the timer on a clean exit
        os.close(self.fd)


def make_watchdog(mode: str, socket_path: Path | None, device: Path) -> Watchdog:
    """The watchdog for the configured ``mode`` (auto, device, fencer, none)."""
    if mode == "fencer" or (mode == "auto" and socket_path is not None):
        if socket_path is None:
            raise ValueError("watchdog.mode fencer needs watchdog.socket")
        return FencerWatchdog(socket_path)
    if mode == "device" or (mode == "auto" and device.exists()):
        return DeviceWatchdog(device)
    return NoWatchdog()


async def keep_ticking(watchdog: Watchdog, period_s: float = 1.0) -> None:
    """Call ``watchdog.tick()`` every ``period_s`` for as long as the daemon's loop runs.

    A device watchdog is armed by the kernel from the moment it is opened, so it
    must be petted from the daemon's start, also while the rack waits for its peers
    and holds no lease (disarmed: petted freely). Once armed with a lease deadline,
    ticks stop petting when the deadline passes, and the host reboots: a hung loop
    stops ticking altogether.
    """
    while True:
        try:
            watchdog.tick()
        except OSError as exc:
            log.error("cannot pet the watchdog: %s", exc)
        await asyncio.sleep(period_s)
