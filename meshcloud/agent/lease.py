"""Lease renewal (every rack) and lease-based liveness (the leader).

See meshcloud.core.leases for the rules and why they are safe. This module
only does the I/O: propose renewals through the store, remember which ones
committed, arm the fencing watchdog, and tell the leader's loops which racks
are alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshcloud import clock
from meshcloud.core.errors import MeshcloudError
from meshcloud.core.leases import Leadership, LeaseTimers, OwnLease, next_leadership
from meshcloud.core.reconcile import LeaseView
from meshcloud.raft.store import PlacementStore

log = logging.getLogger("meshcloud.lease")

MAX_RENEWALS_IN_FLIGHT = 4


class LeaseKeeper:
    """Renews this rack's lease and answers who holds one."""

    def __init__(
        self,
        rack: str,
        store: PlacementStore,
        timers: LeaseTimers,
        *,
        now: Callable[[], float] = clock.now,
        on_extended: Callable[[float], None] | None = None,
        fence_ahead_s: float = 0.0,
    ) -> None:
        self.rack = rack
        self.store = store
        self.timers = timers
        self.now = now
        # The rack acts as if its lease ran out this much early, so that its
        # appliances are paused (and the watchdog disarmed) before the deadline.
        self.fence_ahead_s = fence_ahead_s
        self.own = OwnLease()
        self.started_at = now()
        self.leadership: Leadership | None = None
        self.on_extended = on_extended
        # A fire drill's cut (meshcloud.agent.drill): while it returns True no renewal is sent,
        # exactly as if the rack were cut off; the lease then runs out the usual way.
        self.hold: Callable[[], bool] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._held_before = False
        # what /metrics shows: how long renewals take to commit, how often the lease lapsed
        self.last_commit_s: float | None = None
        self.max_commit_s = 0.0
        self.renewals = 0
        self.failed_renewals = 0
        self.lapses = 0

    # -- this rack -----------------------------------------------------------------------
    def view(self) -> LeaseView:
        """This rack's lease for the reconcile decision (lost ``fence_ahead_s`` early)."""
        now = self.now()
        expiry = self.own.expires_at(self.timers.lease_s)
        if expiry is not None and now < expiry - self.fence_ahead_s:
            return LeaseView.holding()
        return LeaseView.lost(
            expiry - self.fence_ahead_s if expiry is not None else self.started_at
        )

    def fence_in(self) -> float | None:
        """Seconds until :meth:`view` says the lease is lost; None when it is not held now."""
        expiry = self.own.expires_at(self.timers.lease_s)
        if expiry is None:
            return None
        left = expiry - self.fence_ahead_s - self.now()
        return left if left > 0 else None

    def expires_in(self) -> float | None:
        expiry = self.own.expires_at(self.timers.lease_s)
        return None if expiry is None else expiry - self.now()

    async def _renew_once(self) -> None:
        issued_at = self.now()
        command = {
            "op": "lease_renew",
            "rack": self.rack,
            "issued_at": issued_at,
            "received_at": 0.0,
        }
        try:
            await self.store.propose(command, timeout_s=self.timers.lease_s)
        except MeshcloudError as exc:
            self.failed_renewals += 1
            log.debug("lease renewal issued at %.3f failed: %s", issued_at, exc)
            return
        took = self.now() - issued_at
        self.renewals += 1
        self.last_commit_s = took
        self.max_commit_s = max(self.max_commit_s, took)
        if took > self.timers.lease_s / 2:
            log.warning(
                "lease renewal took %.2f s to commit (lease_s %.1f): the cluster is slow",
                took, self.timers.lease_s,
            )  # fmt: skip
        before = self.own
        self.own = self.own.committed(issued_at)
        if self.own is not before:
            expiry = self.own.expires_at(self.timers.lease_s)
            assert expiry is not None
            if self.on_extended is not None:
                self.on_extended(expiry)
            if not self._held_before:
                log.info("rack %s holds its lease", self.rack)
                self._held_before = True

    async def run(self) -> None:
        """Send a renewal every ``renew_s``; renewals overlap rather than queue."""
        try:
            while True:
                held_back = self.hold is not None and self.hold()
                if not held_back and len(self._in_flight) < MAX_RENEWALS_IN_FLIGHT:
                    task = asyncio.create_task(self._renew_once(), name="lease-renew")
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                self._track_leadership()
                held = self.own.held(self.now(), self.timers.lease_s)
                if self._held_before and not held:
                    log.warning("rack %s lost its lease: fencing", self.rack)
                    self._held_before = False
                    self.lapses += 1
                await asyncio.sleep(self.timers.renew_s)
        finally:
            for task in list(self._in_flight):
                task.cancel()
            for task in list(self._in_flight):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- the leader ----------------------------------------------------------------------
    def _track_leadership(self) -> Leadership | None:
        status = self.store.status()
        self.leadership = next_leadership(
            self.leadership, self.rack, status.leader, status.term, self.now()
        )
        return self.leadership

    def alive(self) -> frozenset[str] | None:
        """Racks whose lease the leader counts as live; None when this rack does not lead."""
        leadership = self._track_leadership()
        if leadership is None:
            return None
        state = self.store.state()
        return leadership.alive(frozenset(state.racks), state.leases, self.now(), self.timers)

    def silent_for(self) -> dict[str, float]:
        """Seconds since each rack last renewed, as the leader counts (empty when not leading)."""
        leadership = self.leadership
        if leadership is None:
            return {}
        state = self.store.state()
        now = self.now()
        return {r: leadership.silent_for(state.leases.get(r), now) for r in state.racks}
