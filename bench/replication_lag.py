"""Benchmark: replication lag (the RPO) of the demo appliance writing continuously.

    python bench/replication_lag.py [--quick] [--out FILE]

Two lab racks (network namespaces on the lab's bridge): the replica rack r2
runs an sshd with the cluster's forced command (rsync's daemon mode +
replication verbs); the source side runs meshcloud's replication engine, whose ssh runs
inside rack r1's namespace, so every byte crosses the lab link into r2.
The demo appliance (real QEMU under the embedded libvirt, in its own
namespace) writes random data to its data disk at W MB/s
(``meshcloud.write_mbps``) plus its counter; the engine cycles every
``interval_s``. The lag of r2 (age of the oldest write it lacks, see
docs/replication.md) is sampled every 0.2 s.

Two phases: **lan** (plain lab link, W = 5 MB/s) and **shaped** (what r2
receives shaped to 20 Mbit/s, 50 ms delay, 1 % loss; W = 1 MB/s). Both run
with a rack's default settings: ``interval_s`` 2 s, ``max_interval_s`` 12 s, ``nice`` 10
(the interval stretches only while rsync keeps the link busy).
Rack namespaces use BBR without slow start after idle, as real racks do.

Written rate: the bytes frozen into generations (engine.cycle_stats) and
the guest's own count of random bytes written (its /status), per second.

Link utilisation in the shaped phase (1 MB/s of writes offer only 40 % of
the link, so it is measured while there is something to send):

- ``link_utilisation``: rsync's payload bytes (``Total bytes sent``) over
  the seconds rsync processes ran (handshakes included), against the
  link rate. The headline.
- ``link_utilisation_backlog``: the same bytes over the seconds during which
  some frozen generation was not yet acknowledged (sampled every 0.2 s;
  includes the freeze and the replica's commit round trips).
- ``wire_utilisation``: bytes r2's interface received (IP headers, SSH
  framing, retransmissions, the verb session) over rsync's seconds.

Headline: ``lag_p99_s_lan``, ``lag_p99_s_shaped``, ``link_utilisation_shaped``.
Goal: p99 at most 5 s (lan) and 30 s (shaped), utilisation at least 80 %.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import distribution, fmt_dist, parse_args, print_table, write_result  # noqa: E402
from meshcloud.config import ReplicationConfig  # noqa: E402

LINK_RATE_BIT_S = 20e6
MAX_INTERVAL = ReplicationConfig().max_interval_s  # a rack's default (12 s)
SHAPED = "rate=20mbit delay=50ms loss=1%"
BRIDGE = "mcbr0"
GATEWAY = "10.90.0.1"
APPLIANCE_IP = "10.90.0.10"


def guest_random_bytes(vm_ns: str) -> int | None:
    """What the guest itself counts as written (its /status), or None if it does not answer."""
    proc = subprocess.run(
        ["ip", "netns", "exec", vm_ns, "curl", "-s", "-m", "3", f"http://{APPLIANCE_IP}/status"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        return int(json.loads(proc.stdout)["random_bytes"])
    except (ValueError, KeyError, TypeError):
        return None


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    out = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()}
    out["interval_s"] = after.get("interval_s", 0.0)  # a level, not a sum
    return out


def cycle_stat(engine: Any, key: str) -> float:
    return float(engine.cycle_stats().get("demo", {}).get(key, 0.0))


async def wait_cycle_end(engine: Any, timeout_s: float = 300.0) -> None:
    """Until the demo appliance's next cycle ends (polled every 20 ms)."""
    n = cycle_stat(engine, "cycles")
    deadline = time.monotonic() + timeout_s
    while cycle_stat(engine, "cycles") == n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no replication cycle ended in {timeout_s} s")
        await asyncio.sleep(0.02)


def rx_bytes(ns: str) -> int:
    """Bytes the rack's mesh interface received (IP packets, headers and retransmissions too)."""
    from meshcloud.lab import plan

    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{plan.RACK_IFNAME}/statistics/rx_bytes"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(proc.stdout)


async def run(quick: bool) -> dict[str, Any]:
    from dataclasses import replace

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
    from meshcloud.images.appliance import ensure_appliance
    from meshcloud.lab import netns
    from meshcloud.lab.lab import Lab
    from meshcloud.replication.engine import EngineSettings, ReplicationDuty, ReplicationEngine
    from meshcloud.replication.live import LibvirtLiveOps
    from meshcloud.replication.source import ReplicaLink
    from meshcloud.replication.testbed import LoopbackSshd
    from meshcloud.replication.transport import RsyncSettings

    phases = [
        {"name": "lan", "write_mbps": 5, "link": None, "seconds": 20 if quick else 60,
         "max_interval_s": MAX_INTERVAL},
        {"name": "shaped", "write_mbps": 1, "link": SHAPED, "seconds": 40 if quick else 120,
         "max_interval_s": MAX_INTERVAL},
    ]  # fmt: skip
    interval_s = 2.0
    work = Path(tempfile.mkdtemp(prefix="mc-bench-lag-", dir="/var/tmp"))
    control = Path(tempfile.mkdtemp(prefix="mcg-"))
    lab = Lab(name=f"rlag{os.getpid() % 10000}", root=work / "lab")
    vm_ns = f"mc-b-lag-{os.getpid()}"
    results: dict[str, Any] = {"phases": {}}
    hv = None
    engine = None
    sshd = None
    libvirt_root: Path | None = None
    try:
        lab.up(racks=2, start_daemons=False, wait=False)
        r1, r2 = lab.rack("r1"), lab.rack("r2")
        # a rack's default priority for replication's processes, on both sides
        nice = ReplicationConfig().nice
        sshd = LoopbackSshd(
            work / "sshd", work / "replica", address=r2.ip, port=2222, netns=r2.netns, nice=nice
        )
        sshd.start()
        target = replace(sshd.target(control), netns=r1.netns)
        netns.delete_netns(vm_ns)
        netns.add_netns(vm_ns)
        netns.add_bridge(BRIDGE, netns=vm_ns)
        netns.add_address(BRIDGE, f"{GATEWAY}/24", netns=vm_ns)
        image = await asyncio.to_thread(ensure_appliance)
        accel, _ = await asyncio.to_thread(choose_accel, "auto", image.kernel, image.initrd)
        libvirt_root = Path(tempfile.mkdtemp(prefix="mc-bl-", dir="/tmp"))  # short socket paths
        root = libvirt_root / "libvirt"
        hv = LibvirtHypervisor(embed_uri(root), netns=vm_ns, label="lag")
        await hv.async_open()
        loop = asyncio.get_running_loop()

        def on_libvirt(fn: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(hv.async_run(fn), loop).result(timeout=120)

        engine = ReplicationEngine(
            work / "source",
            link_for=lambda rack: ReplicaLink(rack, target, RsyncSettings(compress=False)),
            live_for=lambda name: LibvirtLiveOps(on_libvirt, f"mc-{name}"),
            settings=EngineSettings(interval_s=interval_s, workers=1, nice=nice),
        )
        await asyncio.to_thread(
            engine.create_volumes, "demo", {"data": 2 << 30}, 1, {"data": image.data_template}
        )
        duty = {"demo": ReplicationDuty("demo", 1, 500, ("r2",))}
        engine.start()
        for phase in phases:
            engine.set_duties({})
            while any(s.running for s in engine._states.values()):
                await asyncio.sleep(0.05)
            for name in await hv.async_list():
                await hv.async_destroy(name)
                await hv.async_undefine(name)
            lab.degrade("r2", phase["link"] or "clear")
            engine.settings = replace(engine.settings, max_interval_s=phase["max_interval_s"])
            if "demo" in engine._states:  # the interval starts again from interval_s
                engine._states["demo"].interval_s = 0.0
            spec = ApplianceSpec(
                name="demo", image="demo", memory_mib=128, disks=(DiskSpec("data", 2),),
                ip=APPLIANCE_IP, boot_args=f"meshcloud.write_mbps={phase['write_mbps']}",
            )  # fmt: skip
            host = HostDetails(
                cluster_id="bench",
                disks=(DiskAttachment("data", engine.active_paths("demo")["data"]),),
                network=NetworkAttachment(BRIDGE, 24, GATEWAY, tap_name("demo")),
                boot=KernelBoot(image.kernel, image.initrd),
                accel=accel,
                epoch=1,
                console_log=work / f"console-{phase['name']}.log",
            )
            await hv.async_define(spec, host)
            await hv.async_start("demo")
            engine.set_duties(duty)
            # warm up: the first cycle may seed; then wait until the guest (TCG, on a
            # shared machine) really writes at a good part of its rate
            start_gen = engine.replica_generations().get("demo", {}).get("r2", 0)
            deadline = time.monotonic() + 300
            while engine.replica_generations().get("demo", {}).get("r2", 0) < start_gen + 3:
                if time.monotonic() > deadline:
                    raise RuntimeError("replication did not start in 300 s")
                await asyncio.sleep(0.2)
            want = 0.25 * phase["write_mbps"] * 1e6 * interval_s
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                recent = engine.source("demo").manifest().history[-2:]
                if recent and min(r.data_bytes for r in recent) >= want:
                    break
                await asyncio.sleep(0.5)
            # and until the interval has settled (it stretches on a slow link): the
            # same interval at the end of two cycles in a row
            deadline = time.monotonic() + 180
            settled = cycle_stat(engine, "interval_s")
            while time.monotonic() < deadline:
                await wait_cycle_end(engine)
                now_interval = cycle_stat(engine, "interval_s")
                if now_interval == settled:
                    break
                settled = now_interval
            # measured from the end of a cycle to the end of one, so that every figure
            # covers the same whole cycles
            await wait_cycle_end(engine)
            before = engine.transfer_stats().get("demo", {}).get("r2", (0, 0.0))
            gen_before = engine.source("demo").manifest().generation
            stats_before = engine.cycle_stats().get("demo", {})
            guest_before = await asyncio.to_thread(guest_random_bytes, vm_ns)
            samples: list[float] = []
            backlog: list[bool] = []
            rx_before = await asyncio.to_thread(rx_bytes, r2.netns)
            t0 = time.monotonic()
            last_cycle: float | None = None  # cycles ended when the time was up
            while last_cycle is None or cycle_stat(engine, "cycles") == last_cycle:
                samples.append(engine.lags()["demo"]["r2"])
                # a backlog: some frozen generation the replica has not acknowledged
                acked = engine.replica_generations().get("demo", {}).get("r2", 0)
                backlog.append(acked < engine.source("demo").manifest().generation)
                if last_cycle is None and time.monotonic() - t0 >= phase["seconds"]:
                    last_cycle = cycle_stat(engine, "cycles")
                await asyncio.sleep(0.2)
            wall = time.monotonic() - t0
            wire = await asyncio.to_thread(rx_bytes, r2.netns) - rx_before
            backlog_s = wall * sum(backlog) / max(1, len(backlog))
            after = engine.transfer_stats().get("demo", {}).get("r2", (0, 0.0))
            guest_after = await asyncio.to_thread(guest_random_bytes, vm_ns)
            m = engine.source("demo").manifest()
            cycles = _delta(engine.cycle_stats().get("demo", {}), stats_before)
            # frozen bytes: the deltas' growth (qcow2 metadata included), counted by the
            # engine at every freeze (the manifest's history is bounded)
            written = cycles.get("frozen_bytes", 0.0)
            sent, busy = after[0] - before[0], after[1] - before[1]
            entry = {
                "write_mbps_asked": phase["write_mbps"],
                "written_mb_per_s": round(written / wall / 1e6, 3),
                "guest_wrote_mb_per_s": (
                    round((guest_after - guest_before) / wall / 1e6, 3)
                    if guest_after is not None and guest_before is not None
                    else None
                ),
                "cycle_seconds": cycles,
                "shipped_mb_per_s": round(sent / wall / 1e6, 3),
                "link": phase["link"] or "lab default",
                "seconds": round(wall, 1),
                "lag_s": distribution(samples),
                "sent_bytes": sent,
                "rsync_busy_s": round(busy, 2),
                "busy_share": round(busy / wall, 3),
                "generations": m.generation - gen_before,
            }
            entry["wire_bytes"] = wire
            entry["backlog_s"] = round(backlog_s, 2)
            if phase["link"]:
                # see the module docstring and docs/replication.md for the definitions
                entry["link_utilisation"] = (
                    round(sent * 8 / (busy * LINK_RATE_BIT_S), 3) if busy else 0.0
                )
                entry["link_utilisation_backlog"] = (
                    round(sent * 8 / (backlog_s * LINK_RATE_BIT_S), 3) if backlog_s else 0.0
                )
                entry["wire_utilisation"] = (
                    round(wire * 8 / (busy * LINK_RATE_BIT_S), 3) if busy else 0.0
                )
            results["phases"][phase["name"]] = entry
            print(f"  {phase['name']}: lag {fmt_dist(entry['lag_s'], 's')}", flush=True)
    finally:
        if engine is not None:
            engine.stop()
        if hv is not None:
            for name in await hv.async_list():
                await hv.async_destroy(name)
                await hv.async_undefine(name)
            await hv.async_close()
        if sshd is not None:
            sshd.kill()
        try:
            lab.down()
        except Exception as exc:  # best effort teardown, reported
            print(f"lab teardown: {exc}", file=sys.stderr)
        for pid in netns.pids_in_netns(vm_ns) if netns.netns_exists(vm_ns) else []:
            os.kill(pid, 9)
        netns.delete_netns(vm_ns)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
        if libvirt_root is not None:
            shutil.rmtree(libvirt_root, ignore_errors=True)
    return results


def main() -> int:
    args = parse_args("replication_lag", __doc__.splitlines()[0])
    if os.geteuid() != 0:
        print("bench/replication_lag.py needs root (lab namespaces, libvirt)", file=sys.stderr)
        return 1
    results = asyncio.run(run(args.quick))
    lan, shaped = results["phases"]["lan"], results["phases"]["shaped"]
    headline = {
        "lag_p99_s_lan": lan["lag_s"]["p99"],
        "lag_p99_s_shaped": shaped["lag_s"]["p99"],
        "link_utilisation_shaped": shaped.get("link_utilisation", 0.0),
    }
    params = {
        "interval_s": 2.0,
        "lan": {"write_mbps": 5, "max_interval_s": MAX_INTERVAL},
        "shaped": {"write_mbps": 1, "link": SHAPED, "max_interval_s": MAX_INTERVAL},
        "tcp": "BBR, no slow start after idle (rack namespaces)",
        "transport": "rsync over ssh between two lab racks, no compression",
    }
    out = write_result("replication_lag", args, params=params, results=results, headline=headline)
    print_table(
        "replication lag (demo appliance writing continuously)",
        [
            (
                "lan lag",
                fmt_dist(lan["lag_s"], "s") + f"  ({lan['written_mb_per_s']} MB/s written)",
            ),
            (
                "shaped lag",
                fmt_dist(shaped["lag_s"], "s") + f"  ({shaped['written_mb_per_s']} MB/s written)",
            ),
            (
                "shaped link utilisation",
                f"{headline['link_utilisation_shaped']:.0%} while rsync ran,"
                f" {shaped.get('link_utilisation_backlog', 0.0):.0%} while a generation waited,"
                f" interval {shaped['cycle_seconds'].get('interval_s', 0.0):g} s at the end",
            ),
            ("headline", str(headline)),
        ],
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
