"""The watchdog gate: arm the watchdog while appliances may run, disarm it once all are paused.

The daemon's watchdog (meshcloud.agent.watchdog) kills or reboots when its
deadline passes without a newer one. Armed with the lease expiry at every
committed renewal, it guarantees that no appliance *runs* past the lease if
the daemon hangs. But when the lease runs out the agent itself pauses every
appliance first (reconcile's fencing), and a paused appliance writes nothing:
killing it would only turn a short blip into a reboot. So:

- :meth:`WatchdogGate.lease_extended` (every committed renewal): arm with the
  new expiry, unless the gate is disarmed;
- :meth:`WatchdogGate.may_run` (just before the agent starts or resumes an
  appliance, and after every cycle that finds one running with the lease
  held): arm with the current expiry; the agent only starts or resumes while
  it holds the lease, so the deadline is ahead;
- :meth:`WatchdogGate.nothing_runs` (after a cycle without the lease in which
  the hypervisor lists no active domain: all paused or off): disarm.

The contract kept: whenever a domain may run, the watchdog is armed with a
deadline no later than the lease expiry. Disarming happens only after the
hypervisor confirmed that nothing runs, and only this agent (on the same
event loop) can make something run again, through :meth:`may_run`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshcloud.agent.hooks import CycleHooks
from meshcloud.agent.watchdog import Watchdog

log = logging.getLogger("meshcloud.watchdog")


class WatchdogGate:
    """Arms and disarms one watchdog for the rack agent (see the module docstring)."""

    def __init__(self, watchdog: Watchdog, expiry: Callable[[], float | None]) -> None:
        self.watchdog = watchdog
        self.expiry = expiry
        # Disarmed until an appliance may run: the agent arms it before every start and
        # resume, and after every cycle that finds VMs running with the lease held (a
        # restarted daemon's VMs). Armed for nothing, the fencing helper would kill
        # libvirt's own QEMU probes whenever the lease lapses.
        self.armed = False

    def lease_extended(self, expiry: float) -> None:
        """A renewal committed: the lease now runs until ``expiry``."""
        if self.armed:
            self.watchdog.arm(expiry)

    def may_run(self) -> None:
        """An appliance is about to start or resume: guard it with the lease expiry."""
        expiry = self.expiry()
        if not self.armed:
            log.info("watchdog re-armed: appliances may run again")
        self.armed = True
        if expiry is not None:
            self.watchdog.arm(expiry)

    def nothing_runs(self) -> None:
        """The hypervisor lists no active domain: nothing to guard (paused ones stay)."""
        if self.armed:
            log.info("watchdog disarmed: every appliance here is paused or off")
            self.armed = False
            self.watchdog.disarm()


class RackHooks(CycleHooks):
    """The daemon's hooks into each agent cycle: the watchdog gate and replication fencing."""

    def __init__(
        self,
        gate: WatchdogGate,
        fence_in: Callable[[], float | None],
        on_lease: Callable[[bool], None] | None = None,
    ) -> None:
        self.gate = gate
        self.fence_in = fence_in
        self.on_lease = on_lease

    def lease_seen(self, held: bool) -> None:
        if self.on_lease is not None:
            self.on_lease(held)

    def may_run(self) -> None:
        self.gate.may_run()

    def nothing_runs(self) -> None:
        self.gate.nothing_runs()

    def wake_in(self) -> float | None:
        return self.fence_in()


class LoopLag:
    """Measures how late the daemon's event loop runs its timers (a starved loop fences late).

    Sleeps ``period_s`` at a time and records the overshoot; ``max_s`` is the
    worst over the last ``window`` samples. Shown in ``/metrics``.
    """

    def __init__(self, period_s: float = 0.1, window: int = 600) -> None:
        self.period_s = period_s
        self.window = window
        self.samples: list[float] = []

    @property
    def max_s(self) -> float:
        return max(self.samples, default=0.0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.period_s)
            lag = loop.time() - start - self.period_s
            self.samples.append(max(0.0, lag))
            del self.samples[: -self.window]
            if lag > 1.0:
                log.warning("the daemon's event loop ran %.2f s late: is the rack overloaded?", lag)
