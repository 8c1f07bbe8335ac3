"""The device watchdog is petted from the daemon's start, and stops being petted past its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from meshcloud import clock
from meshcloud.agent.watchdog import DeviceWatchdog, keep_ticking


def petted(device: Path) -> int:
    """How many pets (NUL bytes) the fake device received."""
    return device.read_bytes().count(b"\0")


@pytest.mark.asyncio
async def test_a_disarmed_device_is_petted_by_the_ticker(tmp_path: Path) -> None:
    device = tmp_path / "watchdog"  # a plain file standing in for /dev/watchdog
    device.touch()
    dog = DeviceWatchdog(device)
    task = asyncio.create_task(keep_ticking(dog, period_s=0.01))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while petted(device) < 3:  # a rack that waits for its peers holds no lease
            assert asyncio.get_running_loop().time() < deadline, "never petted"
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        dog.close()
    assert device.read_bytes().endswith(b"V")  # magic close on a clean exit


def test_an_armed_device_is_not_petted_past_its_deadline(tmp_path: Path) -> None:
    device = tmp_path / "watchdog"
    device.touch()
    dog = DeviceWatchdog(device)
    dog.arm(clock.now() + 3600)
    before = petted(device)
    dog.tick()
    assert petted(device) == before + 1
    dog.deadline = clock.now() - 1  # the lease ran out and nobody re-armed
    dog.tick()
    dog.tick()
    assert petted(device) == before + 1  # the host will reboot
    os.close(dog.fd)
