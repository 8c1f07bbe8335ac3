"""The rack agent's loop on a fake hypervisor, with the real image catalog and volume layer."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshcloud.agent.executor import ActionExecutor, HostSettings
from meshcloud.agent.images import ImageCatalog, manifest_for
from meshcloud.agent.rack import AgentSettings, CrashBook, RackAgent, short_embed_uri
from meshcloud.agent.volumes import ApplianceVolumes
from meshcloud.core.errors import Conflict
from meshcloud.core.models import ApplianceSpec, Assignment, Capacity, DiskSpec, Rack
from meshcloud.core.reconcile import DomainState, LeaseView, LocalDomain, RestartPolicy
from meshcloud.hypervisor.base import DomainInfo
from meshcloud.hypervisor.base import DomainState as HvState
from meshcloud.replication.engine import ReplicationEngine
from tests.unit.agent.fakes import FakeHypervisor, MemoryStore

CAP = Capacity(8, 8192, 100)
POLICY = RestartPolicy(max_restarts=2, window_s=100.0, backoff_initial_s=2.0, backoff_max_s=8.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def spec(name: str) -> ApplianceSpec:
    return ApplianceSpec(name, "demo", memory_mib=64, disks=(DiskSpec("data", 1),), ip="10.90.0.10")


def no_links(rack: str) -> Any:
    raise AssertionError(f"no replication in these tests (asked for {rack})")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[ReplicationEngine]:
    eng = ReplicationEngine(tmp_path / "volumes", link_for=no_links)
    yield eng
    eng.stop()


@pytest.fixture
def catalog(tmp_path: Path) -> ImageCatalog:
    build = tmp_path / "build"
    build.mkdir()
    (build / "vmlinuz").write_bytes(b"kernel" * 100)
    (build / "initramfs.img").write_bytes(b"initrd" * 100)
    template = build / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "1G"], check=True)
    files = {"kernel": build / "vmlinuz", "initrd": build / "initramfs.img", "disk:data": template}
    cat = ImageCatalog(tmp_path / "images")
    cat.install(manifest_for("demo", "v1", files), files)
    return cat


class World:
    """One rack (r1) of a three-rack map, its fake hypervisor and its agent."""

    def __init__(self, tmp_path: Path, engine: ReplicationEngine, catalog: ImageCatalog) -> None:
        self.store = MemoryStore()
        self.store.apply_now(
            {"op": "cluster_init", "cluster_id": "c1", "max_voters": 3, "voters": ["r1"]}
        )
        for r in ("r1", "r2", "r3"):
            self.store.apply_now({"op": "rack_join", "rack": Rack(r, "default", CAP).to_dict()})
        self.hv = FakeHypervisor()
        self.clock = Clock()
        self.events: list[tuple[str, str, str | None]] = []
        self.lease = LeaseView.holding()
        self.volumes = ApplianceVolumes(engine)
        settings = HostSettings(console_dir=tmp_path / "console", kvm="off")
        self.executor = ActionExecutor(self.hv, self.volumes, catalog, settings)
        self.agent = self.new_agent()

    def new_agent(self) -> RackAgent:
        return RackAgent(
            "r1",
            self.store,
            self.hv,
            self.executor,
            settings=AgentSettings(policy=POLICY),
            lease_view=lambda: self.lease,
            on_event=lambda k, m, a: self.events.append((k, m, a)),
            clock=self.clock,
        )

    def deploy(self, name: str, primary: str | None = "r1", epoch: int = 1) -> None:
        self.store.apply_now({"op": "appliance_set", "spec": spec(name).to_dict()})
        self.assign(name, primary, epoch)

    def assign(self, name: str, primary: str | None, epoch: int) -> None:
        current = self.store.state().assignments.get(name)
        self.store.apply_now(
            {
                "op": "assignment_set",
                "assignment": Assignment(name, primary, (), epoch).to_dict(),
                "expected_epoch": current.epoch if current else None,
            }
        )


@pytest.fixture
def world(tmp_path: Path, engine: ReplicationEngine, catalog: ImageCatalog) -> World:
    return World(tmp_path, engine, catalog)


async def test_starts_what_the_map_assigns_here_under_its_epoch(world: World) -> None:
    world.deploy("a")
    world.deploy("b", primary="r2")
    decision = await world.agent.cycle()
    assert world.hv.running() == {"a": 1}
    assert "starting a (epoch 1)" in decision.reason
    host = world.hv.hosts["a"]
    assert host.epoch == 1 and host.network is not None and host.network.bridge == "mcbr0"
    assert host.boot is not None and host.boot.kernel.name == "vmlinuz"
    (disk,) = host.disks
    assert disk.path.parent == world.volumes.root / "a" / "data"  # the engine's layout
    assert disk.path.exists()
    again = await world.agent.cycle()
    assert again.actions == () and "running" in again.reason
    assert [c for c in world.hv.calls if c[0] == "start"] == [("start", "a")]


async def test_moved_elsewhere_is_destroyed_and_unassigned_is_stopped(world: World) -> None:
    world.deploy("a")
    world.deploy("b")
    await world.agent.cycle()
    world.assign("a", "r2", 2)  # moved: the other rack may start it any moment
    world.assign("b", None, 2)  # stopped by placement (no room)
    decision = await world.agent.cycle()
    await world.agent.settle()  # the graceful stop runs beside the loop
    assert world.hv.running() == {}
    assert ("destroy", "a") in world.hv.calls and ("stop", "b") in world.hv.calls
    assert "destroying a" in decision.reason and "stopping b" in decision.reason
    assert "a" in world.hv.domains  # the definition stays: the appliance still exists


async def test_deleting_an_appliance_stops_it_and_moves_its_volumes_aside(world: World) -> None:
    world.deploy("a")
    await world.agent.cycle()
    world.store.apply_now({"op": "appliance_remove", "name": "a"})
    await world.agent.cycle()
    await world.agent.settle()
    assert world.hv.running() == {}
    await world.agent.cycle()
    assert "a" not in world.hv.domains
    assert not (world.volumes.root / "a").exists()
    assert (world.volumes.root / ".deleted" / "a.0" / "manifest.json").exists()
    # deployed again under the same name: fresh volumes, starts
    world.deploy("a", epoch=1)
    await world.agent.cycle()
    assert world.hv.running() == {"a": 1}


async def test_a_crash_is_restarted_with_backoff_then_reported_once(world: World) -> None:
    world.deploy("a")
    await world.agent.cycle()
    for crash in (1, 2):
        world.hv.crash("a")
        decision = await world.agent.cycle()
        assert world.hv.running() == {}, f"crash {crash}: restarted before its back-off"
        assert "in " in decision.reason and "back-off" in decision.reason
        world.clock.t += POLICY.backoff_s(crash) + 0.1
        decision = await world.agent.cycle()
        assert world.hv.running() == {"a": 1}
        assert f"restart {crash} of at most 2" in decision.reason
    world.hv.crash("a")
    await world.agent.cycle()
    world.clock.t += 60
    await world.agent.cycle()
    await world.agent.cycle()
    assert world.hv.running() == {}
    failed = [e for e in world.events if e[0] == "appliance-failed"]
    assert len(failed) == 1 and failed[0][2] == "a" and "crashed 3 times" in failed[0][1]


async def test_a_corrupt_image_is_never_started(world: World, catalog: ImageCatalog) -> None:
    kernel = catalog.root / "demo" / "vmlinuz"
    kernel.chmod(0o644)
    kernel.write_bytes(b"evil!!" * 100)
    world.deploy("a")
    decision = await world.agent.cycle()
    assert world.hv.domains == {}, "nothing may be defined from a corrupt image"
    assert "failed its checksum" in decision.reason
    assert any(k == "start-failed" and a == "a" for k, _m, a in world.events)
    decision = await world.agent.cycle()  # retried with back-off, still refused
    assert "retried in" in decision.reason and world.hv.domains == {}


async def test_after_a_power_cut_only_what_the_map_still_assigns_here_starts(
    world: World,
) -> None:
    world.deploy("a")
    world.deploy("b")
    await world.agent.cycle()
    # power cut: QEMU is gone, the definitions stay; meanwhile b moved to r2
    for name in ("a", "b"):
        world.hv.domains[name] = DomainInfo(name, HvState.SHUTOFF, 1)
    world.assign("b", "r2", 2)
    fresh = world.new_agent()  # the daemon starts again, knowing nothing
    decision = await fresh.cycle()
    assert world.hv.running() == {"a": 1}
    assert "b" in world.hv.domains and world.hv.domains["b"].state is HvState.SHUTOFF
    assert "starting a" in decision.reason and "b" not in decision.reason


async def test_volumes_refuse_an_older_epoch(world: World) -> None:
    world.volumes.prepare(spec("a"), 3)
    with pytest.raises(Conflict, match="epoch 1"):
        world.volumes.prepare(spec("a"), 1)
    paths = world.volumes.prepare(spec("a"), 4)
    assert set(paths) == {"data"}


async def test_without_a_lease_it_pauses_then_resumes(world: World) -> None:
    world.deploy("a")
    await world.agent.cycle()
    world.lease = LeaseView.lost(world.clock.t)
    await world.agent.cycle()
    assert world.hv.domains["a"].state is HvState.PAUSED
    world.lease = LeaseView.holding()
    await world.agent.cycle()
    assert world.hv.running() == {"a": 1}


async def test_a_slow_stop_does_not_hold_up_fencing(world: World) -> None:
    world.deploy("a")
    world.deploy("b")
    await world.agent.cycle()
    world.hv.stop_gate = asyncio.Event()  # b's guest ignores the power button for now
    world.assign("b", None, 2)
    await world.agent.cycle()
    await asyncio.sleep(0)  # the stop task gets going
    assert ("stop", "b") in world.hv.calls and world.hv.running() == {"a": 1, "b": 1}
    world.lease = LeaseView.lost(world.clock.t)
    await world.agent.cycle()  # not blocked behind b's stop
    assert world.hv.domains["a"].state is HvState.PAUSED
    assert world.hv.domains["b"].state is HvState.PAUSED
    assert [c for c in world.hv.calls if c == ("stop", "b")] == [("stop", "b")]  # not repeated
    world.hv.stop_gate.set()
    await world.agent.settle()


async def test_the_loop_wakes_on_a_crash_and_restarts_it(
    tmp_path: Path, engine: ReplicationEngine, catalog: ImageCatalog
) -> None:
    world = World(tmp_path, engine, catalog)
    world.agent = RackAgent(
        "r1",
        world.store,
        world.hv,
        world.executor,
        settings=AgentSettings(
            period_s=30.0,
            policy=RestartPolicy(backoff_initial_s=0.01, backoff_max_s=0.02),
        ),
    )
    world.deploy("a")
    task = asyncio.create_task(world.agent.run())
    try:
        await wait_until(lambda: world.hv.running() == {"a": 1})  # woken by the map change
        cycles = world.agent.cycles
        world.hv.crash("a")
        await wait_until(lambda: world.agent.cycles > cycles)  # woken by the event
        await wait_until(lambda: world.agent.book.histories.get("a") is not None)
        # the back-off (10 ms) is shorter than the period: the next map change wakes it
        world.store.apply_now({"op": "append", "key": "poke", "value": 1})
        await wait_until(lambda: world.hv.running() == {"a": 1})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_crash_book_counts_only_what_the_agent_started() -> None:
    book = CrashBook()
    off = {"a": LocalDomain("a", DomainState.SHUTOFF, 1)}
    assert book.observe(off, 1.0) == []  # never started by us: no crash
    book.started("a", 1)
    assert book.observe(off, 2.0) == ["a"]
    assert book.observe(off, 3.0) == []  # counted once
    book.started("a", 1)
    book.forget("a")  # we stop it ourselves
    assert book.observe(off, 4.0) == []
    book.started("a", 2)
    assert book.observe(off, 5.0) == ["a"]
    assert book.histories["a"].epoch == 2 and book.histories["a"].crash_times == (5.0,)


def test_short_embed_uri_links_long_roots(tmp_path: Path) -> None:
    long_root = tmp_path / ("x" * 60) / "libvirt"
    uri = f"qemu:///embed?root={long_root}"
    short = short_embed_uri(uri, links=tmp_path / "lv", max_len=48)
    link = Path(short.split("root=", 1)[1])
    assert link.parent == tmp_path / "lv" and link.resolve() == long_root.resolve()
    assert short_embed_uri(uri, links=tmp_path / "lv", max_len=48) == short  # stable
    (tmp_path / "lv" / "gone").symlink_to(tmp_path / "no-such-lab")
    other = f"qemu:///embed?root={tmp_path / ('y' * 60)}"
    short_embed_uri(other, links=tmp_path / "lv", max_len=48)
    assert not (tmp_path / "lv" / "gone").is_symlink()  # dangling links are pruned
    assert Path(short.split("root=", 1)[1]).is_symlink()
    assert short_embed_uri("qemu:///system") == "qemu:///system"
    assert short_embed_uri("qemu:///embed?root=/short") == "qemu:///embed?root=/short"


# -- planned moves -------------------------------------------------------------------


class FinalSync:
    """Stands in for the engine's final sync (the real one is tested with real rsync/ssh)."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, int, tuple[str, ...]]] = []

    def set_duties(self, duties: Any) -> None:
        self.duties = duties

    async def async_final_sync(self, name: str, epoch: int, replicas: tuple[str, ...]) -> Any:
        from types import SimpleNamespace

        from meshcloud.core.errors import ReplicationError

        self.calls.append((name, epoch, replicas))
        if self.fail:
            raise ReplicationError(self.fail)
        return SimpleNamespace(generation=7, data_bytes=4096)


def deploy_replicated(world: World, primary: str = "r1") -> None:
    world.store.apply_now({"op": "appliance_set", "spec": spec("a").to_dict()})
    replicas = tuple(r for r in ("r1", "r2") if r != primary)
    world.store.apply_now(
        {"op": "assignment_set", "assignment": Assignment("a", primary, replicas, 3).to_dict(),
         "expected_epoch": None}
    )  # fmt: skip


async def test_a_planned_move_pauses_syncs_and_reports_then_never_resumes(world: World) -> None:
    deploy_replicated(world)
    sync = FinalSync()
    world.agent.engine = sync  # type: ignore[assignment]
    await world.agent.cycle()
    assert world.hv.running() == {"a": 3}
    world.store.apply_now({"op": "move_begin", "appliance": "a", "epoch": 3, "to": "r2"})
    decision = await world.agent.cycle()
    assert "handing a over" in decision.reason and sync.duties == {}  # no cycle may freeze it
    await world.agent.settle()
    assert sync.calls == [("a", 3, ("r2",))]
    assert world.hv.domains["a"].state is HvState.PAUSED
    move = world.store.state().assignments["a"].move
    assert move is not None and move.phase == "synced" and move.generation == 7
    assert any(k == "move" and "shipped to r2 (generation 7" in m for k, m, _ in world.events)
    again = await world.agent.cycle()  # synced: stays paused, no second sync
    await world.agent.settle()
    assert again.actions == () and world.hv.domains["a"].state is HvState.PAUSED
    assert len(sync.calls) == 1
    world.store.apply_now({"op": "move_switch", "appliance": "a", "epoch": 3})
    await world.agent.cycle()
    assert ("destroy", "a") in world.hv.calls and world.hv.running() == {}


async def test_a_failed_final_sync_abandons_the_move_and_resumes_here(world: World) -> None:
    deploy_replicated(world)
    world.agent.engine = FinalSync(fail="r2 unreachable")  # type: ignore[assignment]
    await world.agent.cycle()
    world.store.apply_now({"op": "move_begin", "appliance": "a", "epoch": 3, "to": "r2"})
    await world.agent.cycle()
    await world.agent.settle()
    asg = world.store.state().assignments["a"]
    assert asg.move is not None and asg.move.phase == "abandoned"
    assert "r2 unreachable" in asg.move.reason and asg.move.reason.endswith("a resumes on r1")
    assert any(k == "move-abandoned" for k, _m, _a in world.events)
    decision = await world.agent.cycle()
    assert "resuming a" in decision.reason and world.hv.running() == {"a": 3}


async def test_the_target_reports_the_downtime_once_the_guest_runs(world: World) -> None:
    deploy_replicated(world, primary="r2")
    s = world.store
    s.apply_now({"op": "move_begin", "appliance": "a", "epoch": 3, "to": "r1"})
    s.apply_now({"op": "move_synced", "appliance": "a", "epoch": 3, "rack": "r2",
                 "generation": 9, "paused_at": 500.0})  # fmt: skip
    s.apply_now({"op": "move_switch", "appliance": "a", "epoch": 3})
    world.agent.wall_clock = lambda: 502.5
    await world.agent.cycle()
    assert world.hv.running() == {"a": 4}
    move = s.state().assignments["a"].move
    assert move is not None and move.phase == "done" and move.downtime_s == 2.5
    assert any("down 2.50 s from the pause on r2" in m for _k, m, _a in world.events)


class SlowSync(FinalSync):
    """A final sync that finishes only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def async_final_sync(self, name: str, epoch: int, replicas: tuple[str, ...]) -> Any:
        await self.release.wait()
        return await super().async_final_sync(name, epoch, replicas)


async def test_a_sync_that_outlives_its_abandoned_move_is_never_reported(world: World) -> None:
    deploy_replicated(world)
    sync = SlowSync()
    world.agent.engine = sync  # type: ignore[assignment]
    await world.agent.cycle()
    begin = {"op": "move_begin", "appliance": "a", "epoch": 3, "to": "r2"}
    world.store.apply_now(begin)
    await world.agent.cycle()  # paused; the sync hangs
    await wait_until(lambda: world.hv.domains["a"].state is HvState.PAUSED)
    # the leader gives up meanwhile: the guest resumes here and writes again
    world.store.apply_now({"op": "move_abandon", "appliance": "a", "epoch": 3, "reason": "slow"})
    await world.agent.cycle()
    assert world.hv.running() == {"a": 3}
    world.store.apply_now(begin)  # a new attempt, same epoch, same target
    await world.agent.cycle()
    sync.release.set()  # the old sync ends now: stale, it must not report "synced"
    await world.agent.settle()
    assert world.store.state().assignments["a"].move.phase == "handover"  # type: ignore[union-attr]
    await world.agent.cycle()  # the new attempt pauses again and syncs afresh
    await world.agent.settle()
    move = world.store.state().assignments["a"].move
    assert move is not None and move.phase == "synced"
    assert world.hv.domains["a"].state is HvState.PAUSED and len(sync.calls) == 2
