"""Planned moves: hand an appliance over to a replica holder without losing a write.

A *planned* move is one whose source rack is alive: a drain, an operator's
move, a power evacuation, or placement making room. Instead of stopping the
appliance and starting whatever copy the target holds (which loses the
writes made since the last replicated generation), the move goes through
the placement map in phases (the assignment's ``move`` record,
:class:`meshcloud.core.models.Move`; docs/failover.md#planned-moves):

1. ``move_begin`` (the leader, or the API for an operator's move): the
   primary is asked to hand over to ``to``, a replica holder. Same epoch.
2. The primary's agent pauses the guest, runs the replication engine's
   ``final_sync`` to ``to`` and commits ``move_synced`` with the generation
   ``to`` now holds. The guest stays paused. If the sync fails it commits
   ``move_abandon`` with the reason, and resumes the guest.
3. ``move_switch`` (the leader): primary ``to`` under epoch + 1, the source
   becomes a replica. The source destroys its paused VM (older epoch); the
   target promotes its copy (exactly the synced generation) and boots.
4. ``move_done`` (the target, once the guest runs): the downtime, from the
   pause on the source to the guest running on the target.

If the source is lost on the way, the leader's ordinary failover applies
(a new epoch ends the move). If the target is lost or drained, the appliance
is stopped by an operator, or the source does not report within
``timeout_s``, the leader abandons the move and the source resumes.

This module is pure: :func:`plan_moves` turns placement's wishes into move
commands for the leader; :func:`move_command` builds an operator's (or the
power work's) ``move_begin``. Time comes in as ages measured by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshcloud.core.errors import Conflict, InvalidInput, NotFound
from meshcloud.core.models import (
    ApplianceSpec,
    ApplianceState,
    Assignment,
    ClusterSnapshot,
    MovePhase,
    spec_needs,
)
from meshcloud.core.names import validate_name


@dataclass(frozen=True)
class MoveSettings:
    """The leader's patience with a planned move (seconds, on the leader's clock).

    ``timeout_s``: from ``move_begin`` to ``move_synced`` before the move is
    abandoned (a final sync ships one interval's writes: seconds); a switched
    move needs no timeout, the target's start is an ordinary start.
    ``retry_after_s``: after an abandoned move, before placement may try again.
    ``catch_up_s``: how long to wait for the target's copy to report a
    generation before moving by stop-and-start instead (at once in a cluster
    that reports no replica at all: it ships nothing).
    """

    timeout_s: float = 60.0
    retry_after_s: float = 30.0
    catch_up_s: float = 120.0

    def __post_init__(self) -> None:
        for key in ("timeout_s", "retry_after_s", "catch_up_s"):
            if not getattr(self, key) > 0:
                raise InvalidInput(f"moves: {key} ({getattr(self, key)}) must be positive")


@dataclass(frozen=True)
class MovePlan:
    """What the leader proposes: move commands first, then the assignments.

    ``assignments`` is placement's result with the appliances under a planned
    move held where they are (their primary changes only by ``move_switch``).
    ``held`` names them; ``reasons`` has one sentence per decision.
    """

    assignments: Mapping[str, Assignment]
    commands: tuple[dict[str, Any], ...] = ()
    reasons: tuple[str, ...] = ()
    held: frozenset[str] = field(default_factory=frozenset)


def age_key(current: Assignment | None, wanted: Assignment | None) -> tuple[object, ...]:
    """What the caller's age of an appliance counts from: it restarts when this changes."""
    if current is None:
        return ()
    move = current.move
    return (
        current.epoch,
        current.primary,
        move.phase if move is not None else None,
        move.to if move is not None else None,
        wanted.primary if wanted is not None else None,
    )


def _cause(wanted: Assignment) -> str:
    """The first clause of placement's sentence: "r1 drained", "r2 on battery, 9 min left"."""
    return wanted.reason.split(";", 1)[0].strip()


def plan_moves(
    snapshot: ClusterSnapshot,
    wanted: Mapping[str, Assignment],
    alive: frozenset[str],
    ages: Mapping[str, float],
    settings: MoveSettings | None = None,
) -> MovePlan:
    """Turn placement's ``wanted`` assignments into planned moves where the source is alive.

    ``ages[name]``: seconds the leader has seen the appliance in its current
    situation (:func:`age_key` of the map's assignment and the wanted one).
    """
    settings = settings or MoveSettings()
    out: dict[str, Assignment] = {}
    commands: list[dict[str, Any]] = []
    reasons: list[str] = []
    held: set[str] = set()
    # No replica report anywhere in the map: this cluster ships nothing (no replication key).
    replicating = any(snapshot.replica_generations.values())
    for name in sorted(wanted):
        new = wanted[name]
        old = snapshot.assignments.get(name)
        spec = snapshot.appliances.get(name)
        age = ages.get(name, 0.0)
        if old is None or spec is None:
            out[name] = new
            continue
        move = old.move
        if old.moving and move is not None:
            source = move.source
            if old.primary not in alive:
                out[name] = new  # the source is lost: ordinary failover, the new epoch ends it
                if new.primary != old.primary:
                    reasons.append(
                        f"{source} lost while handing {name} over to {move.to}; failing over"
                    )
                continue
            held.add(name)
            out[name] = old
            why = ""
            if name in snapshot.stopped:
                why = "it was stopped by an operator"
            elif move.to not in alive:
                why = f"{move.to} was lost"
            elif move.to not in snapshot.racks or snapshot.racks[move.to].drained:
                why = f"{move.to} was drained"
            elif move.phase is MovePhase.HANDOVER and age >= settings.timeout_s:
                why = f"{source} reported no final sync within {settings.timeout_s:g} s"
            if why:
                commands.append(abandon_command(old, f"{why}; {name} resumes on {source}"))
                reasons.append(f"abandoning the move of {name} from {source} to {move.to}: {why}")
            elif move.phase is MovePhase.SYNCED:
                commands.append({"op": "move_switch", "appliance": name, "epoch": old.epoch})
                reasons.append(
                    f"{source} paused {name} and shipped generation {move.generation} to"
                    f" {move.to}; switching it to {move.to} under epoch {old.epoch + 1}"
                )
            continue
        planned = (
            old.state is ApplianceState.RUNNING
            and old.primary is not None
            and old.primary in alive
            and new.state is ApplianceState.RUNNING
            and new.primary is not None
            and new.primary != old.primary
            and bool(spec.disks)
        )
        if not planned:
            out[name] = new
            continue
        assert old.primary is not None and new.primary is not None
        source, target = old.primary, new.primary
        if move is not None and move.phase is MovePhase.ABANDONED and age < settings.retry_after_s:
            held.add(name)
            out[name] = old  # it just resumed here; try again a little later
            continue
        gens = snapshot.replica_generations.get(name, {})
        cause = _cause(new)
        if target in old.replicas and target in gens:
            held.add(name)
            out[name] = old
            commands.append(begin_command(old, target, cause))
            reasons.append(
                f"{cause}; handing {name} over from {source} to {target} (replica gen"
                f" {gens[target]}): pause, final sync, start there"
            )
        elif not replicating:
            out[name] = new  # no rack ships replicas: a restart elsewhere is all there is
        elif age >= settings.catch_up_s:
            out[name] = new
            reasons.append(
                f"{name}: no copy on {target} caught up within {settings.catch_up_s:g} s;"
                " moving it by stopping and starting (writes it lacks are kept aside)"
            )
        else:
            held.add(name)
            if target not in old.replicas:
                out[name] = replace(old, replicas=tuple(sorted((*old.replicas, target))))
                reasons.append(
                    f"{cause}; adding replica on {target} to hand {name} over to once it"
                    " holds its data"
                )
            else:
                out[name] = old  # waiting for the target's copy to report a generation
    return MovePlan(out, tuple(commands), tuple(reasons), frozenset(held))


def begin_command(current: Assignment, to: str, reason: str = "") -> dict[str, Any]:
    return {
        "op": "move_begin",
        "appliance": current.appliance,
        "epoch": current.epoch,
        "to": to,
        "reason": reason,
    }


def abandon_command(current: Assignment, reason: str) -> dict[str, Any]:
    return {
        "op": "move_abandon",
        "appliance": current.appliance,
        "epoch": current.epoch,
        "reason": reason,
    }


def _room_on(snapshot: ClusterSnapshot, rack: str, spec: ApplianceSpec) -> bool:
    """Whether ``rack`` has the vCPUs and memory to run ``spec`` besides its own primaries."""
    member = snapshot.racks[rack]
    cpu, mem = member.capacity.vcpus, member.capacity.memory_mib
    for other in snapshot.assigned_to(rack):
        if other != spec.name and other in snapshot.appliances:
            need = spec_needs(snapshot.appliances[other])
            cpu, mem = cpu - need.vcpus, mem - need.memory_mib
    return cpu >= spec.vcpus and mem >= spec.memory_mib


def move_command(
    snapshot: ClusterSnapshot, appliance: str, to: str | None = None, reason: str = ""
) -> dict[str, Any]:
    """The ``move_begin`` for an operator's (or the power work's) move of ``appliance``.

    ``to`` must hold a replica of it and have room; None picks the replica
    holder with the freshest reported generation that has room and is not
    drained. Raises NotFound or Conflict with a sentence saying what to do.
    """
    validate_name("appliance", appliance)
    spec = snapshot.appliances.get(appliance)
    asg = snapshot.assignments.get(appliance)
    if spec is None:
        raise NotFound(f"appliance {appliance} does not exist")
    if asg is None or asg.primary is None or asg.state is not ApplianceState.RUNNING:
        state = asg.state if asg is not None else "not placed yet"
        raise Conflict(f"appliance {appliance} is {state}: only a running appliance can move")
    if appliance in snapshot.stopped:
        raise Conflict(f"appliance {appliance} is stopped: start it first")
    if asg.moving:
        assert asg.move is not None
        raise Conflict(f"appliance {appliance} is already moving to {asg.move.to}")
    gens = snapshot.replica_generations.get(appliance, {})
    if to is not None:
        validate_name("rack", to)
        if to not in snapshot.racks:
            raise NotFound(f"rack {to} is not a member of the cluster")
        if to == asg.primary:
            raise Conflict(f"appliance {appliance} already runs on {to}")
        if to not in asg.replicas:
            holders = ", ".join(asg.replicas) or "none yet"
            raise Conflict(
                f"{to} holds no replica of {appliance}: move it to a replica holder"
                f" ({holders}), or raise its replicas and wait for the copy"
            )
        if snapshot.racks[to].drained:
            raise Conflict(f"rack {to} is drained: undrain it first")
        if not _room_on(snapshot, to, spec):
            raise Conflict(f"rack {to} has no room for {appliance}'s vCPUs and memory")
        return begin_command(asg, to, reason or f"moved by an operator to {to}")
    candidates = [
        r
        for r in asg.replicas
        if r in snapshot.racks and not snapshot.racks[r].drained and _room_on(snapshot, r, spec)
    ]
    if not candidates:
        raise Conflict(
            f"no replica holder of {appliance} ({', '.join(asg.replicas) or 'none'}) can take it:"
            " drained, or without room"
        )
    best = min(candidates, key=lambda r: (-gens.get(r, -1), r))
    return begin_command(asg, best, reason or f"moved by an operator to {best}")
