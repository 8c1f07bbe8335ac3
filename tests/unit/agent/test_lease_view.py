"""The lease keeper pauses ahead of its deadline, and says when it will."""

from __future__ import annotations

from meshcloud.agent.lease import LeaseKeeper
from meshcloud.core.leases import LeaseTimers
from meshcloud.core.reconcile import LeaseView
from tests.unit.agent.fakes import MemoryStore

T = LeaseTimers(renew_s=0.5, lease_s=3.0, margin_s=2.0)


def test_the_lease_counts_as_lost_pause_ahead_before_it_runs_out() -> None:
    now = [100.0]
    keeper = LeaseKeeper("r1", MemoryStore(), T, now=lambda: now[0], fence_ahead_s=0.5)
    assert keeper.view() == LeaseView.lost(100.0)  # no renewal yet: lost since start
    assert keeper.fence_in() is None
    keeper.own = keeper.own.committed(100.0)  # expires at 103.0
    now[0] = 102.4
    assert keeper.view().held and abs((keeper.fence_in() or 0) - 0.1) < 1e-9
    now[0] = 102.5
    assert keeper.view() == LeaseView.lost(102.5)
    assert keeper.fence_in() is None
