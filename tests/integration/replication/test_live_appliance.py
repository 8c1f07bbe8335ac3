"""The real demo appliance, writing its counter, replicated live to another "rack".

The appliance runs under the embedded libvirt (TCG) from a namespace with a
bridge; its data disk is a meshcloud volume set. Cycles freeze its disk with
a disk-only external snapshot, ship the frozen overlay over rsync+ssh (a
loopback sshd with the cluster's forced commands), and merge it back with a
live block commit. Every generation the replica holds must be an exact copy
of the saved frozen generation, with a gap-free counter log. Then a planned
move: pause, final sync, promote the replica, boot it there: the counter
continues from at least the last value the source had on its disk.
On the way, the replica's merge, an rsync transfer and the whole receiving
"rack" are each killed half-way: the replica is always a saved generation.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from meshcloud.lab import netns
from meshcloud.replication.testbed import LoopbackSshd, have_sshd

pytestmark = [
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

BRIDGE = "mcbr0"
GATEWAY = "10.89.0.1"
APPLIANCE_IP = "10.89.0.10"


@pytest.fixture
def rack_ns() -> Iterator[str]:
    name = f"mc-t-repl-{os.getpid()}"
    netns.delete_netns(name)
    netns.add_netns(name)
    try:
        netns.add_bridge(BRIDGE, netns=name)
        netns.add_address(BRIDGE, f"{GATEWAY}/24", netns=name)
        yield name
    finally:
        for pid in netns.pids_in_netns(name):  # only the QEMUs this test started
            os.kill(pid, 9)
        netns.delete_netns(name)


def test_live_appliance_replicates_and_moves(rack_ns: str, tmp_path: Path) -> None:
    if not have_sshd():
        pytest.skip("needs sshd and rsync")
    control = Path(tempfile.mkdtemp(prefix="mcl-"))
    with LoopbackSshd(tmp_path / "sshd", tmp_path / "replica") as sshd:
        target = sshd.target(control)
        # libvirt opens one embedded root per process: run the scenario in a fresh child
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            child.submit(_run, rack_ns, tmp_path, target).result(timeout=600)
    shutil.rmtree(control, ignore_errors=True)


def _run(rack_ns: str, tmp_path: Path, target: Any) -> None:
    asyncio.run(_scenario(rack_ns, tmp_path, target))


def _flatten(top: Path, out: Path) -> Path:
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(top), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _identical(qcow2: Path, raw: Path) -> bool:
    argv = ["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)]
    return subprocess.run(argv, check=False).returncode == 0


async def _scenario(rack_ns: str, tmp_path: Path, target: Any) -> None:
    from meshcloud.core.models import ApplianceSpec, DiskSpec
    from meshcloud.hypervisor.domain_xml import (
        DiskAttachment,
        HostDetails,
        KernelBoot,
        NetworkAttachment,
        tap_name,
    )
    from meshcloud.hypervisor.kvm import choose_accel
    from meshcloud.hypervisor.libvirt_hv import LibvirtHypervisor, embed_uri
    from meshcloud.images.appliance import ensure_appliance, read_counter_log
    from meshcloud.replication.live import LibvirtLiveOps
    from meshcloud.replication.source import ApplianceSource, ReplicaLink
    from meshcloud.replication.store import ReplicaStore
    from meshcloud.replication.transport import RsyncSettings

    image = await asyncio.to_thread(ensure_appliance)
    accel, _ = await asyncio.to_thread(choose_accel, "auto", image.kernel, image.initrd)
    spec = ApplianceSpec(
        name="demo",
        image="demo",
        memory_mib=128,
        disks=(DiskSpec("data", 1),),
        ip=APPLIANCE_IP,
        boot_args="meshcloud.write_mbps=1",  # deltas worth killing a transfer in
    )
    root = Path(tempfile.mkdtemp(prefix="mc-rl-", dir="/tmp")) / "libvirt"
    hv = LibvirtHypervisor(embed_uri(root), netns=rack_ns, label="repl")
    await hv.async_open()
    loop = asyncio.get_running_loop()

    def run_on_libvirt(fn: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(hv.async_run(fn), loop).result(timeout=120)

    def host_for(disk: Path, epoch: int) -> HostDetails:
        return HostDetails(
            cluster_id="test-cluster",
            disks=(DiskAttachment("data", disk),),
            network=NetworkAttachment(BRIDGE, 24, GATEWAY, tap_name("demo")),
            boot=KernelBoot(image.kernel, image.initrd),
            accel=accel,
            epoch=epoch,
            console_log=tmp_path / "console.log",
        )

    source = await asyncio.to_thread(
        ApplianceSource.create,
        tmp_path / "source",
        "demo",
        {"data": 1 << 30},
        1,
        templates={"data": image.data_template},
    )
    source.live = LibvirtLiveOps(run_on_libvirt, "mc-demo")
    saved: dict[int, Path] = {}

    def save(m: Any) -> None:
        frozen = source.volume.file("data", m.chain("data").files[-2])
        saved[m.generation] = _flatten(frozen, tmp_path / f"g{m.generation}.raw")

    source.on_frozen = save
    link = ReplicaLink("rack-b", target, RsyncSettings(compress=True))
    store = ReplicaStore(tmp_path / "replica")
    try:
        await hv.async_define(spec, host_for(source.active_paths()["data"], 1))
        await hv.async_start("demo")

        async def counter_on(path: Path) -> int:
            log = await asyncio.to_thread(read_counter_log, path)
            return log[-1].seq if log else 0

        deadline = time.monotonic() + 120
        while await counter_on(source.active_paths()["data"]) < 5:
            assert time.monotonic() < deadline, "the appliance never wrote its counter"
            await asyncio.sleep(0.2)

        seen: list[int] = []
        for _ in range(5):
            report = await asyncio.to_thread(source.cycle, 1, [link])
            assert not report.errors, report.errors
            gen = report.generation
            vs = store.volume("demo")
            m = vs.load()
            assert m.generation == gen
            top = vs.top_path(m, "data")
            assert _identical(top, saved[gen]), f"replica is not generation {gen}"
            log = await asyncio.to_thread(read_counter_log, top)
            seqs = [r.seq for r in log]
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"gaps on the replica: {seqs}"
            seen.append(seqs[-1])
            # the live chain stays bottom + active: frozen overlays were block-committed
            assert len(source.manifest().chain("data").files) == 2
            # the guest still runs on the new active overlay
            assert (await hv.async_list())["demo"].state.value == "running"
            await asyncio.sleep(0.3)
        assert seen == sorted(seen) and seen[-1] > seen[0], f"the counter did not advance: {seen}"
        # the merge on the replica killed at random points: always the saved generation
        held = store.volume("demo").load().generation
        rng = random.Random(3)
        for _ in range(8):
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshcloud.replication", "merge", str(store.root), "demo"],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
            )
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random point, not synchronisation
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            m = store.volume("demo").load()
            assert m.generation == held
            assert _identical(store.volume("demo").top_path(m, "data"), saved[held])
        await asyncio.to_thread(store.merge_pending)
        m = store.volume("demo").load()
        assert len(m.chain("data").files) == 1
        assert _identical(store.volume("demo").top_path(m, "data"), saved[m.generation])

        # rsync killed half-way on a slow link: the replica keeps the previous generation
        slow = ReplicaLink("rack-b", target, RsyncSettings(compress=False, bwlimit_kbps=64))
        incoming = store.incoming_root / "demo" / "data"

        def partial_seen() -> bool:
            return any(f.stat().st_size > (64 << 10) for f in incoming.glob(".g*") if f.is_file())

        async def kill_when_partial() -> None:
            deadline = time.monotonic() + 60
            while not partial_seen():
                assert time.monotonic() < deadline, "no partial transfer seen"
                await asyncio.sleep(0.02)
            assert source.transport.runner.cancel_all() >= 1

        await asyncio.sleep(2.0)  # let the guest write a delta worth shipping slowly
        killer = asyncio.create_task(kill_when_partial())
        report = await asyncio.to_thread(source.cycle, 1, [slow])
        await killer
        assert "rack-b" in report.errors
        m = store.volume("demo").load()
        assert m.generation == held and _identical(
            store.volume("demo").top_path(m, "data"), saved[held]
        )
        report = await asyncio.to_thread(source.cycle, 1, [link])  # catches up (resumes)
        assert not report.errors, report.errors
        m = store.volume("demo").load()
        assert m.generation == report.generation
        assert _identical(store.volume("demo").top_path(m, "data"), saved[m.generation])

        # the receiving rack killed at a random instant of a cycle (its sshd, rsync
        # daemon and verbs at once): once it recovers, its copy is always a saved
        # generation; back up, the next cycles catch up
        receiver = LoopbackSshd(tmp_path / "sshd-dying", store.root)
        control2 = Path(tempfile.mkdtemp(prefix="mck-"))
        receiver.start()
        try:
            dying = ReplicaLink("rack-b", receiver.target(control2), RsyncSettings(compress=False))
            outcomes = set()
            for _ in range(8):
                await asyncio.sleep(0.5)  # the guest writes a delta meanwhile (1 MB/s)
                cycle = asyncio.create_task(asyncio.to_thread(source.cycle, 1, [dying]))
                await asyncio.sleep(rng.uniform(0.0, 0.1))  # a random instant, not synchronisation
                receiver.kill()
                report = await cycle
                outcomes.add("failed" if "rack-b" in report.errors else "ok")
                source.transport.close()  # its connection masters died with the rack
                await asyncio.to_thread(store.recover_all)
                m = store.volume("demo").load()
                assert _identical(store.volume("demo").top_path(m, "data"), saved[m.generation]), (
                    f"the replica is not generation {m.generation} after its rack died"
                )
                receiver.start()
            assert "failed" in outcomes, "no cycle was interrupted: the kills came too late"
            for _ in range(3):  # a lost acknowledgement costs a cycle that asks afresh
                report = await asyncio.to_thread(source.cycle, 1, [dying])
                if not report.errors:
                    break
            assert not report.errors, report.errors
            m = store.volume("demo").load()
            assert m.generation == report.generation
            assert _identical(store.volume("demo").top_path(m, "data"), saved[m.generation])
        finally:
            source.transport.close()
            receiver.stop()
            shutil.rmtree(control2, ignore_errors=True)

        # planned move: pause, final sync, stop here, start from the replica
        await hv.async_pause("demo")
        last_on_source = await counter_on(source.active_paths()["data"])
        final = await asyncio.to_thread(source.final_sync, 1, [link])
        assert not final.errors
        await hv.async_destroy("demo")
        await hv.async_undefine("demo")
        paths = await asyncio.to_thread(store.promote, "demo", 2)
        on_replica = await counter_on(paths["data"])
        assert on_replica == last_on_source, f"moved {on_replica}, source had {last_on_source}"
        await hv.async_define(spec, host_for(paths["data"], 2))
        await hv.async_start("demo")
        deadline = time.monotonic() + 120
        while await counter_on(paths["data"]) <= last_on_source:
            assert time.monotonic() < deadline, "the moved appliance did not continue its counter"
            await asyncio.sleep(0.2)
    finally:
        for name in await hv.async_list():
            await hv.async_destroy(name)
            await hv.async_undefine(name)
        await hv.async_close()
        source.transport.close()
        shutil.rmtree(root.parent, ignore_errors=True)
