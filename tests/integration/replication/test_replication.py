"""Real rsync over real ssh (the forced command: rsync's daemon mode, serve) on qcow2 chains."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshcloud.core.errors import Conflict
from meshcloud.replication import manifest as mf
from meshcloud.replication.source import ApplianceSource, ReplicaLink
from meshcloud.replication.transport import RsyncSettings, master_exit_argv

from .conftest import Pair, same_content, wait_for

pytestmark = pytest.mark.root


def test_replica_follows_the_source(pair: Pair) -> None:
    pair.write(0, 65536, 1)
    for i in range(4):
        report = pair.source.cycle(1, [pair.link])
        assert not report.errors, report.errors
        gen = report.generation
        assert pair.replica_generation() == gen
        assert pair.replica_matches(gen), f"replica differs from generation {gen}"
        pair.write(4096 * (7 * i + 3), 4096 * (i + 1), 10 + i)
    # merging down on the replica keeps the same content, and flattens the chain
    assert pair.store.merge_pending() > 0
    assert pair.replica_matches(gen)
    chain = pair.store.volume("app").load().chain("data")
    assert len(chain.files) == 1
    # the source chain stays short: bottom + active
    assert len(pair.source.manifest().chain("data").files) == 2
    assert pair.source.lag_s("rack-b") < 60


def test_pending_generations_ship_in_one_run_and_merge_meanwhile(pair: Pair) -> None:
    pair.source.cycle(1, [pair.link])  # seed
    assert not pair.source._may_seed([pair.link])
    for i in range(4):  # four generations frozen while the replica was out of reach
        pair.write(4096 * (11 * i + 1), 8192, 30 + i)
        pair.source.freeze(1)
    pair.write(1 << 20, 4096, 40)
    report = pair.source.cycle(1, [pair.link])
    assert not report.errors, report.errors
    ship = report.shipped["rack-b"]
    assert (ship.runs, ship.files) == (1, 5)
    assert pair.replica_generation() == report.generation
    for gen in range(report.generation - 4, report.generation + 1):
        assert f"g{gen:012d}.qcow2" in pair.store.volume("app").load().chain("data").files
    assert pair.replica_matches(report.generation)
    # the merge ran alongside: the source chain is bottom + active again
    assert len(pair.source.manifest().chain("data").files) == 2
    # a replica this rack knows nothing about may need a seed: no merge alongside then
    with pair.source.volume.locked():
        pair.source.volume.save(mf.forget_replica(pair.source.volume.load(), "rack-b"))
    assert pair.source._may_seed([pair.link])


def test_first_cycle_seeds_with_progress(pair: Pair) -> None:
    pair.write(1 << 20, 8 << 20, 7)
    seen: list[tuple[str, int, int]] = []
    report = pair.source.cycle(1, [pair.link], on_progress=lambda *a: seen.append(a))
    assert report.shipped["rack-b"].seeded
    assert seen and seen[-1][0] == "rack-b" and seen[-1][1] > 0
    assert pair.replica_matches(report.generation)


def test_older_epoch_is_refused_by_the_replica(pair: Pair) -> None:
    pair.source.cycle(2, [pair.link])
    pair.write(0, 4096, 3)
    # the replica has seen epoch 5 (a failover elsewhere): this source is fenced
    pair.store.fence("app", 5)
    with pytest.raises(Conflict, match="epoch"):
        pair.source.cycle(2, [pair.link])
    assert pair.replica_matches(1)


def test_rsync_killed_halfway_leaves_the_previous_generation(pair: Pair) -> None:
    pair.write(0, 4096, 1)
    pair.source.cycle(1, [pair.link])
    slow = ReplicaLink("rack-b", pair.link.target, RsyncSettings(compress=False, bwlimit_kbps=2048))
    pair.write(0, 12 << 20, 9)  # a 12 MiB delta at 2 MiB/s: about 6 s to ship
    incoming = pair.store.incoming_root / "app" / "data"

    def kill_when_half_sent() -> None:
        def half() -> bool:
            files = list(incoming.glob(".g*")) if incoming.exists() else []
            return any(f.stat().st_size > (4 << 20) for f in files if f.is_file())

        wait_for(half, 60, "half of the delta on the replica")
        assert pair.source.transport.runner.cancel_all() >= 1

    killer = threading.Thread(target=kill_when_half_sent)
    killer.start()
    report = pair.source.cycle(1, [slow])
    killer.join()
    assert "rack-b" in report.errors
    assert pair.replica_generation() == 1 and pair.replica_matches(1)
    # the next cycle resumes from the partial file and catches up with both generations
    pair.write(1 << 20, 4096, 4)
    report = pair.source.cycle(1, [pair.link])
    assert not report.errors, report.errors
    assert pair.replica_generation() == 3 and pair.replica_matches(3)
    assert report.shipped["rack-b"].bytes_sent < (12 << 20)  # resumed, not resent


@pytest.mark.slow
def test_merge_killed_halfway_reads_the_same(pair: Pair) -> None:
    rng = random.Random(5)
    pair.write(0, 4096, 1)
    for i in range(4):
        pair.write(rng.randrange(0, 60) << 20, 4 << 20, 20 + i)
        pair.source.cycle(1, [pair.link])
    gen = pair.replica_generation()
    assert len(pair.store.volume("app").load().chain("data").files) == 4  # seed + 3 deltas
    kills = 0
    for _ in range(30):
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshcloud.replication", "merge", str(pair.store.root), "app"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        # Wait until the merge is copying data (its marker exists), then kill it
        # at once or a little later: a random point inside the merge itself.
        marker = pair.store.volume("app").disk_dir("data") / ".merging"
        deadline = time.monotonic() + 60
        while proc.poll() is None and not marker.exists():
            assert time.monotonic() < deadline, "the merge never started"
            time.sleep(0.001)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, 0.05))  # a random point in the merge, not synchronisation
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        # whatever was interrupted, the manifest's chain is an exact copy of the generation
        assert pair.replica_matches(gen)
        if len(pair.store.volume("app").load().chain("data").files) == 1:
            break
    assert kills >= 1
    pair.store.recover_all()
    pair.store.volume("app").merge_all()
    assert len(pair.store.volume("app").load().chain("data").files) == 1
    assert pair.replica_matches(gen)
    subprocess.run(["qemu-img", "check", "-q", str(pair.replica_top())], check=True)


@pytest.mark.slow
def test_receiver_killed_halfway_keeps_some_generation(pair: Pair) -> None:
    rng = random.Random(11)
    pair.write(0, 4096, 1)
    pair.source.cycle(1, [pair.link])
    outcomes = set()
    for i in range(12):
        pair.write(rng.randrange(0, 60) << 20, 2 << 20, 40 + i)
        done = threading.Event()

        def rack_dies(done: threading.Event = done, delay: float = rng.uniform(0.0, 0.3)) -> None:
            done.wait(delay)  # a random instant in the cycle (bounded), then the rack dies
            pair.sshd.kill()

        killer = threading.Thread(target=rack_dies)
        killer.start()
        try:
            report = pair.source.cycle(1, [pair.link])
            outcomes.add("ok" if not report.errors else "failed")
        finally:
            done.set()
            killer.join()
        pair.source.transport.close()
        # the rack comes back: recovery, then its copy must be one of the generations
        pair.store.recover_all()
        held = pair.replica_generation()
        assert held in pair.saved and pair.replica_matches(held), (
            f"round {i}: not generation {held}"
        )
        pair.sshd.start()
    report = pair.source.cycle(1, [pair.link])
    assert not report.errors, report.errors
    assert pair.replica_matches(report.generation)
    assert "failed" in outcomes


def test_two_disks_freeze_together(tmp_path: Path, pair: Pair) -> None:
    src = ApplianceSource.create(
        tmp_path / "source2", "two", {"root": 16 << 20, "data": 32 << 20}, epoch=1
    )
    try:
        from .conftest import qemu_write

        qemu_write(src.active_paths()["root"], 0, 4096, 1)
        qemu_write(src.active_paths()["data"], 8192, 4096, 2)
        report = src.cycle(1, [pair.link])
        assert not report.errors
        qemu_write(src.active_paths()["data"], 8192, 4096, 3)
        report = src.cycle(1, [pair.link])
        assert not report.errors and report.generation == 2
        vs = pair.store.volume("two")
        m = vs.load()
        assert m.generation == 2 and m.disk_names == ("data", "root")
        for disk in ("root", "data"):
            assert same_content(vs.top_path(m, disk), _raw_of(src, disk, tmp_path))
    finally:
        src.transport.close()


def _raw_of(src: ApplianceSource, disk: str, tmp: Path) -> Path:
    m = src.manifest()
    out = tmp / f"{disk}.raw"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-U",
            "-O",
            "raw",
            str(src.volume.file(disk, m.chain(disk).files[-2])),
            str(out),
        ],
        check=True,
    )
    return out


def test_closing_the_transport_ends_its_connection_masters(pair: Pair) -> None:
    """A master outlives its last use by ControlPersist (10 min): close() must end it."""
    pair.write(0, 65536, 0x11)
    report = pair.source.cycle(1, [pair.link])
    assert not report.errors and "rack-b" in report.shipped

    def master_alive() -> bool:
        argv = master_exit_argv(pair.link.target)
        assert argv is not None
        check = [*argv[: argv.index("-O")], "-O", "check", pair.link.target.destination]
        return subprocess.run(check, capture_output=True, check=False).returncode == 0

    assert master_alive()
    pair.source.transport.close()
    assert wait_for(lambda: not master_alive(), 10, "the connection master to exit")
