"""The real demo appliance through the libvirt adapter, on a bridge in a namespace.

The test makes its own network namespace with a bridge, opens an embedded
libvirt root in a temporary directory from a thread inside that namespace,
boots the appliance, reads its HTTP page over the bridge from inside the
namespace, pauses and resumes it (the counter stops, on the wire and on the
disk, then continues), destroys it, boots it again (the counter continues
from the disk), stops it gracefully, and checks the lifecycle events.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec
from meshcloud.hypervisor.base import DomainState, EventKind, EventSubscription, LifecycleEvent
from meshcloud.hypervisor.domain_xml import (
    DiskAttachment,
    HostDetails,
    KernelBoot,
    NetworkAttachment,
    tap_name,
)
from meshcloud.hypervisor.kvm import choose_accel
from meshcloud.hypervisor.libvirt_hv import LibvirtHypervisor, embed_uri
from meshcloud.hypervisor.reach import http_get
from meshcloud.images.appliance import (
    ensure_appliance,
    new_data_disk,
    read_counter_from_image,
    read_counter_log,
)
from meshcloud.lab import netns

pytestmark = [
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

BRIDGE = "mcbr0"
GATEWAY = "10.88.0.1"
APPLIANCE_IP = "10.88.0.10"
BOOT_TIMEOUT_S = 90.0
T = TypeVar("T")


@pytest.fixture
def rack_ns() -> Iterator[str]:
    """A namespace with a bridge that carries the gateway address; removed afterwards."""
    name = f"mc-t-hv-{os.getpid()}"
    netns.delete_netns(name)
    netns.add_netns(name)
    try:
        netns.add_bridge(BRIDGE, netns=name)
        netns.add_address(BRIDGE, f"{GATEWAY}/24", netns=name)
        yield name
    finally:
        for pid in netns.pids_in_netns(name):  # only QEMUs this test started can be here
            os.kill(pid, 9)
        netns.delete_netns(name)


async def wait_for(
    what: str, probe: Callable[[], Awaitable[T | None]], timeout_s: float, every_s: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something other than None, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)


async def http_counter(ns: str, timeout_s: float = 1.0) -> int | None:
    """The appliance's durable counter over HTTP, or None if it does not answer."""
    try:
        reply = await asyncio.to_thread(http_get, ns, APPLIANCE_IP, 80, "/counter", timeout_s)
    except OSError:
        return None
    if reply.status == 503:  # booted, but the counter is not read from the disk yet
        return None
    assert reply.status == 200, f"GET /counter: {reply}"
    return int(reply.json()["seq"])


async def next_event(events: EventSubscription, kind: EventKind) -> LifecycleEvent:
    """The next event of ``kind`` (earlier events of other kinds are skipped)."""
    while True:
        event = await events.async_next(timeout_s=30)
        if event.kind is kind:
            return event


def test_demo_appliance_lifecycle_on_a_bridge(rack_ns: str, tmp_path: Path) -> None:
    # libvirt lets a process open only one embedded root, ever: run the scenario in a
    # fresh child process so that this pytest process stays free for other tests.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(_run_scenario, rack_ns, tmp_path).result(timeout=240)


def _run_scenario(rack_ns: str, tmp_path: Path) -> None:
    asyncio.run(_scenario(rack_ns, tmp_path))


async def _scenario(rack_ns: str, tmp_path: Path) -> None:
    image = await asyncio.to_thread(ensure_appliance)
    accel, why = await asyncio.to_thread(choose_accel, "auto", image.kernel, image.initrd)
    print(why)
    disk = await asyncio.to_thread(new_data_disk, image, tmp_path / "volumes" / "demo" / "data")
    spec = ApplianceSpec(
        name="demo",
        image="demo",
        memory_mib=128,
        disks=(DiskSpec("data", 1),),
        ports=(PortSpec("http", 80),),
        ip=APPLIANCE_IP,
    )
    host = HostDetails(
        cluster_id="test-cluster",
        disks=(DiskAttachment("data", disk),),
        network=NetworkAttachment(BRIDGE, 24, GATEWAY, tap_name("demo")),
        boot=KernelBoot(image.kernel, image.initrd),
        accel=accel,
        epoch=3,
        console_log=tmp_path / "console.log",
    )
    # A short root: QEMU's monitor socket path under it must fit in 107 characters.
    root = Path(tempfile.mkdtemp(prefix="mc-hv-", dir="/tmp")) / "libvirt"
    hv = LibvirtHypervisor(embed_uri(root), netns=rack_ns, label="test", guest_nice=7)
    await hv.async_open()
    events = hv.subscribe()
    try:
        await hv.async_define(spec, host)
        assert (await hv.async_list())["demo"].state is DomainState.SHUTOFF
        await hv.async_start("demo")
        await hv.async_start("demo")  # idempotent
        assert (await next_event(events, EventKind.STARTED)).detail == "booted"
        listed = await hv.async_list()
        assert listed["demo"].state is DomainState.RUNNING and listed["demo"].epoch == 3

        # QEMU yields the CPU to the control plane: every thread and its autogroup.
        qemu_pid = int((root / "run" / "qemu" / "mc-demo.pid").read_text())
        tids = [int(t) for t in os.listdir(f"/proc/{qemu_pid}/task")]
        assert tids and all(os.getpriority(os.PRIO_PROCESS, t) == 7 for t in tids)
        autogroup = Path(f"/proc/{qemu_pid}/autogroup")
        assert not autogroup.exists() or autogroup.read_text().split()[-1] == "7"

        # QEMU and its tap live in the rack's namespace, not in ours.
        assert netns.link_exists(tap_name("demo"), netns=rack_ns)
        assert not netns.link_exists(tap_name("demo"))
        assert netns.pids_in_netns(rack_ns)

        # The status page and the counter, over the bridge, from inside the namespace.
        first = await wait_for("the appliance's HTTP page", lambda: http_counter(rack_ns), 90)
        page = await asyncio.to_thread(http_get, rack_ns, APPLIANCE_IP, 80, "/")
        assert page.status == 200 and b"meshcloud demo appliance demo" in page.body
        running = await wait_for(
            "the counter to advance",
            lambda: _above(http_counter(rack_ns), first),
            10,
        )

        # Paused: the counter stops on the wire and on the disk.
        await hv.async_pause("demo")
        await hv.async_pause("demo")  # idempotent
        assert await hv.async_state("demo") is DomainState.PAUSED
        await next_event(events, EventKind.SUSPENDED)
        on_disk = await asyncio.to_thread(read_counter_from_image, disk)
        assert on_disk.seq >= running, f"disk {on_disk} behind acknowledged {running}"
        assert await http_counter(rack_ns, timeout_s=1.0) is None  # a frozen guest answers nothing
        deadline = time.monotonic() + 1.5  # 15 ticks of the guest's 100 ms clock
        while time.monotonic() < deadline:
            now = await asyncio.to_thread(read_counter_from_image, disk)
            assert now == on_disk, f"paused, yet the disk counter moved: {on_disk} -> {now}"
        # Resumed: it continues from where it stopped.
        await hv.async_resume("demo")
        assert (await next_event(events, EventKind.RESUMED)).detail == "unpaused"
        await wait_for(
            "the counter to continue", lambda: _above(http_counter(rack_ns), on_disk.seq), 10
        )
        after_disk = await asyncio.to_thread(read_counter_from_image, disk)
        assert after_disk.seq > on_disk.seq, f"disk counter stuck at {after_disk} after resume"

        # Destroyed: gone at once; every acknowledged value is on the disk, in sequence.
        acknowledged = await wait_for("a counter reading", lambda: http_counter(rack_ns), 5)
        await hv.async_destroy("demo")
        assert (await next_event(events, EventKind.STOPPED)).detail == "destroyed"
        assert await hv.async_state("demo") is DomainState.SHUTOFF
        log = await asyncio.to_thread(read_counter_log, disk)
        assert log[-1].seq >= acknowledged, f"acknowledged {acknowledged}, on disk {log[-1]}"
        seqs = [r.seq for r in log]
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"gaps in the counter log: {seqs}"

        # Booted again, the counter continues from the disk; then a graceful stop.
        await hv.async_start("demo")
        await next_event(events, EventKind.STARTED)
        resumed_at = await wait_for("the second boot", lambda: http_counter(rack_ns), 90)
        assert resumed_at > log[-1].seq, f"second boot at {resumed_at}, disk had {log[-1]}"
        await hv.async_stop("demo", timeout_s=30)
        stopped = await next_event(events, EventKind.STOPPED)
        assert stopped.detail == "shutdown", f"not a guest power-off: {stopped}"  # ACPI button

        await hv.async_undefine("demo")
        assert "demo" not in await hv.async_list()
        await next_event(events, EventKind.UNDEFINED)
    finally:
        events.close()
        for name in await hv.async_list():
            await hv.async_destroy(name)
            await hv.async_undefine(name)
        await hv.async_close()
        shutil.rmtree(root.parent, ignore_errors=True)


async def _above(reading: Awaitable[int | None], floor: int) -> int | None:
    value = await reading
    return value if value is not None and value > floor else None
