"""Replication lag and transfer priority (pure: time is an argument).

**Lag** of a replica is what it would lose if the primary died now,
measured in time: the age of the oldest write it does not hold. Every
write of generation g happened between its ``opened_at`` and ``frozen_at``,
so a replica holding generation R holds every write made before
``frozen_at(R)``; the writes it lacks are at most ``now - frozen_at(R)``
old. Generations after R that turned out empty (no data) extend what it
holds. The estimate is exact to within one interval and never too small.

**Priority**: when a link is slow, the most important appliances go first
(higher ``priority``), then the ones furthest behind (larger lag).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshcloud.replication.manifest import GenerationRecord


def covered_until(history: Sequence[GenerationRecord], replica_generation: int) -> float | None:
    """The time up to which a replica at ``replica_generation`` holds every write.

    None when the history does not reach back that far (the caller then
    counts from the oldest record it has, which overstates the lag).
    """
    by_gen = {r.generation: r for r in history}
    base = by_gen.get(replica_generation)
    if base is None:
        return None
    until = base.frozen_at
    gen = replica_generation + 1
    while gen in by_gen and by_gen[gen].data_bytes == 0:
        until = by_gen[gen].frozen_at
        gen += 1
    return until


def replication_lag_s(
    history: Sequence[GenerationRecord], replica_generation: int, latest_generation: int, now: float
) -> float:
    """Seconds of writes a replica at ``replica_generation`` would lose right now."""
    if not history:
        return 0.0 if replica_generation >= latest_generation else float("inf")
    until = covered_until(history, replica_generation)
    if until is None:
        if replica_generation > history[-1].generation:
            return 0.0
        until = history[0].opened_at
    return max(0.0, now - until)


@dataclass(frozen=True)
class TransferItem:
    """A pending transfer of one appliance to one replica rack."""

    appliance: str
    rack: str
    priority: int
    lag_s: float
    pending_bytes: int = 0


def order_transfers(items: Sequence[TransferItem]) -> list[TransferItem]:
    """Most important first, then furthest behind, then by name (stable and total)."""
    return sorted(items, key=lambda i: (-i.priority, -i.lag_s, i.appliance, i.rack))


def lag_percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of lag samples (nearest-rank)."""
    if not samples:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        k = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
        return ordered[k]

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": ordered[-1]}
