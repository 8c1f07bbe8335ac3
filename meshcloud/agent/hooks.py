"""The hooks the daemon puts into each agent cycle, in a module of their own.

Kept apart from meshcloud.agent.rack so that the daemon's fencing code can
use them without importing the agent, the hypervisor and replication, which
a rack loads only once it is in its cluster (start-up CPU is formation time).
"""

from __future__ import annotations

__all__ = ["CycleHooks"]


class CycleHooks:
    """What the daemon hooks into each agent cycle (fencing; see meshcloud.agent.fencing).

    The base class does nothing: tests and racks without a watchdog use it.
    """

    def lease_seen(self, held: bool) -> None:
        """Called every cycle with whether the lease is held (replication fences on loss)."""

    def may_run(self) -> None:
        """Called right before a Start or Resume runs (the watchdog is armed here)."""

    def nothing_runs(self) -> None:
        """Called after a cycle without the lease once no domain is active (disarm)."""

    def wake_in(self) -> float | None:
        """Seconds until the agent must run a cycle anyway (the lease's deadline), or None."""
        return None
