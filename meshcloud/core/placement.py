"""Placement: which rack runs each appliance (its primary) and which racks keep replicas.

:func:`place` is a pure function from the cluster's state and an optional
event to new assignments plus one human sentence per change. The rules, in
order of importance (docs/placement.md explains them at length):

1. Never over a rack's capacity: a primary takes vCPUs, memory and disk on its
   rack; a replica takes disk only. A rack that holds a copy of an appliance
   pays its disk once, whatever the copy's role.
2. Only racks that are alive and not drained take primaries or new copies.
3. Replicas sit on racks other than the primary and, where capacity allows,
   on sites not already holding a copy (like the zones of Swift's ring).
4. When capacity is short, higher priority wins: an appliance waits only if
   it could not run on any rack even with every lower-priority appliance
   stopped there (their vCPUs and memory freed; disk holds data and is never
   freed to make room). Placement never deletes data to make room.
5. Moves are minimal: an appliance whose primary is alive, not drained and
   still fits stays put. One that must move goes first to a live replica
   holder (the freshest generation that fits), then to the rack with the most
   headroom.
6. Every change of primary, including to or from none, increments the
   appliance's epoch, the fencing token every start and volume operation names.
7. Deterministic: the same input gives the same output, whatever the order of
   the mappings passed in.

The per-rack ``rack_preference`` score (higher is preferred for primaries,
0.0 is neutral) is the hook for power-aware placement. An *evacuating* rack
(on battery and about to run out, see meshcloud/core/power.py) is treated
like a drained rack for primaries: its primaries move away, most important
first, and nothing new starts there unless no other rack has room. Unlike a
drained rack it keeps its copies as extra replica holders while it lasts,
and new copies go elsewhere. Nothing moves back when its power returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import ApplianceSpec, Assignment, ClusterSnapshot, Rack
from meshcloud.core.placement_pass import NEUTRAL_PREFERENCE, NO_GENERATION, PlacementPass
from meshcloud.core.power import power_inputs

__all__ = [
    "MAX_PASSES",
    "NEUTRAL_PREFERENCE",
    "NO_GENERATION",
    "EventKind",
    "PlacementEvent",
    "PlacementInput",
    "PlacementResult",
    "apply_event",
    "place",
    "place_snapshot",
    "primaries_changed",
]

# A pass that frees disk part-way through may leave room it did not see; placement then
# runs again on its own output. Each further pass strictly improves the result (more
# high-priority appliances running, or more copies on more sites), so this bound is a
# safety net, not a tuning knob.
MAX_PASSES = 5


class EventKind(StrEnum):
    """What changed since the assignments passed in were computed."""

    APPLIANCE_ADDED = "appliance-added"
    APPLIANCE_CHANGED = "appliance-changed"
    APPLIANCE_REMOVED = "appliance-removed"
    RACK_JOINED = "rack-joined"
    RACK_LOST = "rack-lost"
    RACK_DRAINED = "rack-drained"
    RACK_UNDRAINED = "rack-undrained"


_RACK_EVENTS = frozenset(
    {EventKind.RACK_JOINED, EventKind.RACK_LOST, EventKind.RACK_DRAINED, EventKind.RACK_UNDRAINED}
)


@dataclass(frozen=True)
class PlacementEvent:
    """One change: ``name`` is the appliance or rack it concerns."""

    kind: EventKind
    name: str


@dataclass(frozen=True)
class PlacementInput:
    """Everything placement looks at.

    ``alive`` names the racks that hold a lease (only leases say a rack is
    alive). ``replica_generations[appliance][rack]`` is the generation of the
    copy that rack holds, as committed in the map; a holder without one ranks
    below every holder with one. ``rack_preference`` (higher is better,
    default :data:`NEUTRAL_PREFERENCE`) orders racks for primaries after
    headroom-neutral concerns: the power-aware hook. ``evacuating`` maps each
    rack that must lose its primaries before its power runs out to the phrase
    that says why ("r2 on battery, 9 min left"); see the module docstring.
    """

    racks: Mapping[str, Rack]
    appliances: Mapping[str, ApplianceSpec]
    alive: frozenset[str]
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    replica_generations: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    rack_preference: Mapping[str, float] = field(default_factory=dict)
    stopped: frozenset[str] = frozenset()  # appliances an operator stopped
    evacuating: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, mapping, attr in (
            ("rack", self.racks, "name"),
            ("appliance", self.appliances, "name"),
            ("assignment", self.assignments, "appliance"),
        ):
            for key, value in mapping.items():
                if key != getattr(value, attr):
                    raise InvalidInput(
                        f"placement input: {kind} key {key!r} does not match its name"
                        f" {getattr(value, attr)!r}"
                    )


@dataclass(frozen=True)
class PlacementResult:
    """New assignments (keyed and ordered by appliance name) and why they changed."""

    assignments: Mapping[str, Assignment]
    reasons: tuple[str, ...]
    passes: int = 1


def primaries_changed(
    before: Mapping[str, Assignment], after: Mapping[str, Assignment]
) -> frozenset[str]:
    """Appliances (present in ``after``) whose primary rack differs from ``before``."""
    changed = set()
    for name, asg in after.items():
        old = before.get(name)
        if (old.primary if old else None) != asg.primary:
            changed.add(name)
    return frozenset(changed)


def apply_event(state: PlacementInput, event: PlacementEvent) -> PlacementInput:
    """The state after ``event``; applying an event that already took effect changes nothing."""
    name = event.name
    if event.kind in _RACK_EVENTS:
        if name not in state.racks:
            raise InvalidInput(
                f"placement event {event.kind} names rack {name!r}, which is not in the cluster:"
                " add the rack to the map first"
            )
        if event.kind is EventKind.RACK_JOINED:
            return replace(state, alive=state.alive | {name})
        if event.kind is EventKind.RACK_LOST:
            return replace(state, alive=state.alive - {name})
        drained = event.kind is EventKind.RACK_DRAINED
        racks = dict(state.racks)
        racks[name] = replace(racks[name], drained=drained)
        return replace(state, racks=racks)
    if event.kind is EventKind.APPLIANCE_REMOVED:
        return replace(state, appliances={k: v for k, v in state.appliances.items() if k != name})
    if name not in state.appliances:
        raise InvalidInput(
            f"placement event {event.kind} names appliance {name!r}, which has no spec:"
            " store the appliance's spec before placing it"
        )
    return state


def place(state: PlacementInput, event: PlacementEvent | None = None) -> PlacementResult:
    """New assignments for ``state`` after ``event`` (None: re-check the current state)."""
    if event is not None:
        state = apply_event(state, event)
    reasons: list[str] = []
    notes: dict[str, str] = {}
    causes: dict[str, str] = {}
    current = state
    for pass_no in range(1, MAX_PASSES + 1):
        planner = PlacementPass(current, state.assignments, notes, causes)
        assignments = planner.run()
        if not planner.may_improve() or pass_no == MAX_PASSES:
            reasons.extend(planner.reasons)
            return PlacementResult(assignments, tuple(reasons), pass_no)
        reasons.extend(planner.events)
        current = replace(current, assignments=assignments)
    raise AssertionError("unreachable")


def place_snapshot(
    snapshot: ClusterSnapshot,
    alive: frozenset[str],
    event: PlacementEvent | None = None,
    replica_generations: Mapping[str, Mapping[str, int]] | None = None,
    rack_preference: Mapping[str, float] | None = None,
    evacuating: Mapping[str, str] | None = None,
) -> PlacementResult:
    """:func:`place` on a cluster snapshot.

    ``rack_preference`` and ``evacuating`` default to what the racks' power
    reports in the snapshot say (:func:`meshcloud.core.power.power_inputs`).
    """
    power = power_inputs(snapshot.power, snapshot.racks)
    if rack_preference is None:
        rack_preference = power.rack_preference
    if evacuating is None:
        evacuating = power.evacuating
    state = PlacementInput(
        racks=snapshot.racks,
        appliances=snapshot.appliances,
        alive=alive,
        assignments=snapshot.assignments,
        replica_generations=replica_generations or {},
        stopped=snapshot.stopped,
        rack_preference=rack_preference,
        evacuating=evacuating,
    )
    return place(state, event)
