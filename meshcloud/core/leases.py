"""Leases: the only thing that says whether a rack is alive (pure; time is passed in).

A rack renews its lease through the Raft log every ``renew_s``. Two views:

* The rack's own view counts from the *issue* time of its last committed
  renewal, on its own clock: a renewal that commits late extends nothing
  beyond ``issued_at + lease_s``. When that passes the rack fences itself.
* The leader counts from the time *it received* the renewal, on its own
  clock (the store stamps ``received_at``, ``leader`` and ``term`` when the
  leader takes the command in). A new leader treats every lease as renewed
  at the moment it took office. It declares a rack lost only after
  ``lease_s + margin_s`` without a renewal.

Why this is safe: a renewal is received after it was issued, so the
leader's deadline (receipt + lease + margin, or took-office + lease +
margin, which is later than any receipt of an earlier term) always falls
after the rack's own deadline (issue + lease), by at least ``margin_s``,
provided both clocks run at about the same rate (they are monotonic clocks
that keep counting through suspend: CLOCK_BOOTTIME). ``margin_s`` covers
rate drift and the time the rack needs to pause its appliances.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshcloud.core.models import Lease


@dataclass(frozen=True)
class LeaseTimers:
    renew_s: float
    lease_s: float
    margin_s: float

    @property
    def lost_after_s(self) -> float:
        """How long the leader waits without a renewal before declaring a rack lost."""
        return self.lease_s + self.margin_s


@dataclass(frozen=True)
class OwnLease:
    """A rack's own lease: the issue time of its last committed renewal (its own clock)."""

    issued_at: float | None = None

    def committed(self, issued_at: float) -> OwnLease:
        """The lease after a renewal issued at ``issued_at`` committed (never goes back)."""
        if self.issued_at is not None and issued_at <= self.issued_at:
            return self
        return OwnLease(issued_at)

    def expires_at(self, lease_s: float) -> float | None:
        return None if self.issued_at is None else self.issued_at + lease_s

    def held(self, now: float, lease_s: float) -> bool:
        expiry = self.expires_at(lease_s)
        return expiry is not None and now < expiry


@dataclass(frozen=True)
class Leadership:
    """This rack's term as leader, from the moment it noticed taking office (its own clock)."""

    rack: str
    term: int
    took_office_at: float

    def last_heard(self, lease: Lease | None) -> float:
        """When, on this leader's clock, the rack last renewed (at the earliest, took office)."""
        if lease is not None and lease.leader == self.rack and lease.term == self.term:
            return max(self.took_office_at, lease.received_at)
        return self.took_office_at

    def silent_for(self, lease: Lease | None, now: float) -> float:
        return max(0.0, now - self.last_heard(lease))

    def alive(
        self, racks: frozenset[str], leases: Mapping[str, Lease], now: float, timers: LeaseTimers
    ) -> frozenset[str]:
        """Racks this leader does not (yet) consider lost."""
        return frozenset(
            r for r in racks if self.silent_for(leases.get(r), now) <= timers.lost_after_s
        )


def next_leadership(
    current: Leadership | None, me: str, leader: str | None, term: int, now: float
) -> Leadership | None:
    """Track leadership: a new (rack, term) starts a new term of office at ``now``."""
    if leader != me:
        return None
    if current is not None and current.term == term:
        return current
    return Leadership(me, term, now)
