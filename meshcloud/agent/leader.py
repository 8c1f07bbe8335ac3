"""The leader's placement loop: keep the map's assignments what placement says they should be.

On the rack that believes it leads the Raft group (``store.status().leader``
is a hint: two racks may briefly both believe it, which is harmless because
every write is compare-and-set on the appliance's epoch, so a stale
leader's proposals are refused), each cycle:

1. reads ONE snapshot of the map;
2. computes the assignments with the pure
   :func:`meshcloud.core.placement.place_snapshot` (alive racks from leases,
   replica generations from the map);
3. turns placement's moves away from a live primary into planned moves
   (:func:`meshcloud.core.moves.plan_moves`: ``move_begin``, then
   ``move_switch`` once the old primary has synced, or ``move_abandon``) and
   proposes those first;
4. proposes ``assignment_set`` with ``expected_epoch`` = the epoch the
   snapshot holds, for each assignment that changed (placement itself gives
   a new primary a new epoch);
5. logs one sentence (the plan's and placement's reasons) and publishes it
   as an event.

A cycle runs when the map changes and at least every ``period_s``. A
refused proposal (the map moved meanwhile) or an unavailable store ends the
cycle early; the next cycle decides again from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshcloud.core.errors import Conflict, MeshcloudError, NotFound, Unavailable
from meshcloud.core.models import Assignment, ClusterSnapshot
from meshcloud.core.moves import MovePlan, MoveSettings, age_key, plan_moves
from meshcloud.core.placement import PlacementResult, place_snapshot
from meshcloud.core.state import PlacementState
from meshcloud.raft.store import PlacementStore

log = logging.getLogger("meshcloud.leader")

AliveFn = Callable[[ClusterSnapshot], "frozenset[str] | None"]  # None: this rack does not lead
EventSink = Callable[[str, str, "str | None"], None]


def every_rack_alive(snapshot: ClusterSnapshot) -> frozenset[str]:
    """Every rack of the map counts as alive: for tests and a store without leases.

    The daemon uses ``LeaseKeeper.alive()`` instead (see runtime.py). Drained
    racks count as alive: placement itself keeps primaries off them and says
    "drained" (not "lost") when it moves one away.
    """
    return frozenset(snapshot.racks)


def assignment_commands(
    snapshot: ClusterSnapshot, result: PlacementResult | MovePlan
) -> list[dict[str, Any]]:
    """The compare-and-set commands that turn the snapshot's assignments into ``result``'s."""
    commands = []
    for name, wanted in sorted(result.assignments.items()):
        if name not in snapshot.appliances:
            continue
        current = snapshot.assignments.get(name)
        if current == wanted:
            continue
        commands.append(
            {
                "op": "assignment_set",
                "assignment": wanted.to_dict(),
                "expected_epoch": current.epoch if current is not None else None,
            }
        )
    return commands


@dataclass(frozen=True)
class PlacementCycle:
    """What one cycle decided: the sentence, the commands, and how many committed."""

    reason: str
    commands: int
    committed: int


def _sentences(result: PlacementResult, plan: MovePlan) -> list[str]:
    """The plan's sentences, then placement's, leaving out placement's about held appliances."""
    held = [re.compile(rf"\b{re.escape(name)}\b") for name in sorted(plan.held)]
    kept = [r for r in result.reasons if not any(p.search(r) for p in held)]
    return [*plan.reasons, *kept]


def _revision_other_than(revision: int) -> Callable[[PlacementState], bool]:
    return lambda state: state.revision != revision


class PlacementLoop:
    """Runs placement while this rack believes it leads."""

    def __init__(
        self,
        rack: str,
        store: PlacementStore,
        *,
        alive: AliveFn | None = None,
        on_event: EventSink | None = None,
        period_s: float = 1.0,
        moves: MoveSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rack = rack
        self.store = store
        self.alive = alive or every_rack_alive
        self.on_event = on_event
        self.period_s = period_s
        self.moves = moves or MoveSettings()
        self.clock = clock
        self.last_cycle: PlacementCycle | None = None
        # appliance -> (what its age counts from, when this leader first saw it)
        self._since: dict[str, tuple[tuple[object, ...], float]] = {}

    def _ages(
        self, snapshot: ClusterSnapshot, wanted: Mapping[str, Assignment]
    ) -> dict[str, float]:
        """How long this leader has seen each appliance as it is (a new leader starts at 0)."""
        now = self.clock()
        ages = {}
        for name, asg in wanted.items():
            key = age_key(snapshot.assignments.get(name), asg)
            seen = self._since.get(name)
            if seen is None or seen[0] != key:
                seen = self._since[name] = (key, now)
            ages[name] = now - seen[1]
        for name in set(self._since) - set(wanted):
            del self._since[name]
        return ages

    def leads(self) -> bool:
        """Whether this rack believes it is the Raft leader (a hint; writes are CAS)."""
        return self.store.status().leader == self.rack

    async def run(self) -> None:
        """Cycle until cancelled."""
        seen = -1
        while True:
            if self.leads():
                try:
                    await self.cycle()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bad cycle must not end the loop
                    log.exception("placement cycle failed: %s", exc)
            with contextlib.suppress(MeshcloudError):
                state = await self.store.wait_for(
                    _revision_other_than(seen), timeout_s=self.period_s
                )
                seen = state.revision

    async def cycle(self) -> PlacementCycle:
        """Place once from one snapshot and propose what changed."""
        snapshot = self.store.snapshot()
        if not snapshot.cluster_id or not snapshot.racks:
            return PlacementCycle("the map has no racks yet", 0, 0)
        alive = self.alive(snapshot)
        if alive is None:
            return PlacementCycle("this rack does not lead: no lease view of the others", 0, 0)
        result = place_snapshot(snapshot, alive, replica_generations=snapshot.replica_generations)
        ages = self._ages(snapshot, result.assignments)
        plan = plan_moves(snapshot, result.assignments, alive, ages, self.moves)
        commands = [*plan.commands, *assignment_commands(snapshot, plan)]
        if not commands:
            self.last_cycle = PlacementCycle("placement unchanged", 0, 0)
            return self.last_cycle
        committed = 0
        problem = ""
        for command in commands:
            try:
                await self.store.propose(command)
            except (Conflict, NotFound) as exc:
                problem = f"the map changed meanwhile ({exc}); deciding again"
                break
            except Unavailable as exc:
                problem = f"cannot commit now ({exc}); retrying"
                break
            committed += 1
        reasons = _sentences(result, plan) or [f"{len(commands)} assignment(s) updated"]
        sentence = "; ".join(reasons)
        if problem:
            sentence += f" ({committed} of {len(commands)} committed: {problem})"
        log.info("placement: %s", sentence)
        if self.on_event is not None:
            self.on_event("placement", sentence, None)
        self.last_cycle = PlacementCycle(sentence, len(commands), committed)
        return self.last_cycle
