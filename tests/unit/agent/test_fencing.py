"""The watchdog gate and the agent's fencing hooks: armed while anything may run, never after."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from meshcloud.agent.fencing import RackHooks, WatchdogGate
from meshcloud.agent.rack import RackAgent
from meshcloud.agent.watchdog import Watchdog
from meshcloud.core.errors import HypervisorError
from meshcloud.core.reconcile import LeaseView
from meshcloud.hypervisor.base import DomainState as HvState
from meshcloud.replication.engine import ReplicationEngine
from tests.unit.agent.test_rack import World
from tests.unit.agent.test_rack import catalog as catalog
from tests.unit.agent.test_rack import engine as engine


class RecordingWatchdog(Watchdog):
    def __init__(self, log: list[tuple[str, float | None]]) -> None:
        self.log = log

    def arm(self, deadline: float) -> None:
        self.log.append(("arm", deadline))

    def disarm(self) -> None:
        self.log.append(("disarm", None))


def test_gate_arms_on_renewals_until_nothing_runs() -> None:
    log: list[tuple[str, float | None]] = []
    expiry = [103.0]
    gate = WatchdogGate(RecordingWatchdog(log), lambda: expiry[0])
    gate.lease_extended(102.0)  # nothing runs yet: a lapse must not kill libvirt's probes
    assert log == []
    gate.may_run()
    gate.nothing_runs()
    gate.nothing_runs()  # disarmed once
    gate.lease_extended(104.0)  # a late renewal of a paused rack does not arm
    assert log == [("arm", 103.0), ("disarm", None)]
    expiry[0] = 105.0
    gate.may_run()  # about to resume: armed with the lease expiry first
    gate.lease_extended(105.5)
    assert log[2:] == [("arm", 105.0), ("arm", 105.5)]


class Hooked(World):
    """The agent world with the daemon's hooks, recording watchdog and hypervisor calls in order."""

    def __init__(self, tmp_path: Path, eng: ReplicationEngine, images: object) -> None:
        super().__init__(tmp_path, eng, images)  # type: ignore[arg-type]
        self.order: list[tuple[str, float | None]] = []
        self.expiry = 1003.0
        self.gate = WatchdogGate(RecordingWatchdog(self.order), lambda: self.expiry)
        self.leases_seen: list[bool] = []
        self.fence_in: float | None = None
        self.hooks = RackHooks(self.gate, lambda: self.fence_in, self.leases_seen.append)
        original_resume = self.hv.async_resume

        async def resume(appliance: str) -> None:
            self.order.append(("resume", None))
            await original_resume(appliance)

        self.hv.async_resume = resume  # type: ignore[method-assign]
        self.agent = self.hooked_agent()

    def hooked_agent(self) -> RackAgent:
        agent = self.new_agent()
        agent.hooks = self.hooks
        return agent


@pytest.fixture
def hooked(request: pytest.FixtureRequest, tmp_path: Path) -> Hooked:
    return Hooked(tmp_path, request.getfixturevalue("engine"), request.getfixturevalue("catalog"))


async def test_a_blip_pauses_disarms_then_rearms_before_resuming(
    hooked: Hooked,
) -> None:
    w = hooked
    w.deploy("a")
    await w.agent.cycle()
    assert w.order[0] == ("arm", 1003.0)  # armed before the start
    w.lease = LeaseView.lost(w.clock.t)
    await w.agent.cycle()
    assert w.hv.domains["a"].state is HvState.PAUSED
    assert w.order[-1] == ("disarm", None), "every VM is paused: the watchdog must not kill them"
    assert w.leases_seen[-1] is False
    w.lease = LeaseView.holding()
    w.expiry = 1010.0
    await w.agent.cycle()
    assert w.hv.running() == {"a": 1}
    assert w.order[-2:] == [("arm", 1010.0), ("resume", None)], "armed before the resume"
    assert w.leases_seen[-1] is True


async def test_no_disarm_while_a_vm_still_runs(
    hooked: Hooked,
) -> None:
    w = hooked
    w.deploy("a")
    await w.agent.cycle()
    w.lease = LeaseView.lost(w.clock.t)

    async def failing_pause(appliance: str) -> None:
        raise HypervisorError("libvirt: pause failed")

    w.hv.async_pause = failing_pause  # type: ignore[method-assign]
    await w.agent.cycle()
    assert w.hv.running() == {"a": 1}
    assert ("disarm", None) not in w.order, "a running VM stays guarded by the watchdog"


async def test_the_agent_wakes_when_the_lease_is_due_to_run_out(
    hooked: Hooked,
) -> None:
    w = hooked
    w.fence_in = 0.05
    task = asyncio.create_task(w.agent.run())
    try:
        start = time.monotonic()
        while w.agent.cycles < 3 and time.monotonic() - start < 5:
            await asyncio.sleep(0.01)
        assert w.agent.cycles >= 3
        assert time.monotonic() - start < 3 * w.agent.settings.period_s, (
            "cycles follow the lease deadline, not only the period"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
