"""The fire drill (pure): its map record, the safety checks, the figures and the report.

A drill simulates the loss of an appliance's primary rack through the real
failover path (docs/drill.md): the rack stops renewing its lease and stops
shipping replication, exactly as if it were cut off, so it fences itself
and the leader declares it lost after ``lease_s + margin_s`` and restarts
its appliances on the freshest replica. The rack that runs the drill times
every step on its own clock; this module decides whether a drill is safe,
computes RTO and RPO from what was observed, and writes the report.
No I/O, no clock: times are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshcloud.core.errors import Conflict, InvalidInput, NotFound
from meshcloud.core.models import ClusterSnapshot, MovePhase
from meshcloud.core.names import validate_name

MAX_LAG_S = 1e9


def _lags(owner: str, value: object) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{owner}: lag_at_cut_s must be an object of rack: seconds")
    out: dict[str, float] = {}
    for rack, lag in value.items():
        validate_name("rack", str(rack))
        if isinstance(lag, bool) or not isinstance(lag, int | float) or not -1 <= lag <= MAX_LAG_S:
            raise InvalidInput(f"{owner}: lag of {rack} must be seconds (-1: never shipped)")
        out[str(rack)] = float(lag)
    return MappingProxyType(out)


@dataclass(frozen=True)
class Drill:
    """A drill under way, as the map records it.

    ``rack`` (the appliance's primary at the cut) holds its lease renewals
    and its replication while ``fenced``. It records each replica's lag at
    the cut (``lag_at_cut_s``); the rack that then runs the appliance again
    records ``running_on`` and ``running_epoch``. ``by`` runs the drill.
    """

    id: str
    appliance: str
    rack: str
    epoch: int
    by: str
    fenced: bool = True
    lag_at_cut_s: Mapping[str, float] | None = None
    running_on: str = ""
    running_epoch: int = 0

    def __post_init__(self) -> None:
        validate_name("drill", self.id)
        validate_name("appliance", self.appliance)
        validate_name("rack", self.rack)
        validate_name("rack", self.by)
        if self.running_on:
            validate_name("rack", self.running_on)
        for key in ("epoch", "running_epoch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"drill {self.id}: {key} must be a whole number >= 0")
        if not isinstance(self.fenced, bool):
            raise InvalidInput(f"drill {self.id}: fenced must be true or false")
        if self.lag_at_cut_s is not None:
            object.__setattr__(self, "lag_at_cut_s", _lags(f"drill {self.id}", self.lag_at_cut_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "appliance": self.appliance,
            "rack": self.rack,
            "epoch": self.epoch,
            "by": self.by,
            "fenced": self.fenced,
            "lag_at_cut_s": None if self.lag_at_cut_s is None else dict(self.lag_at_cut_s),
            "running_on": self.running_on,
            "running_epoch": self.running_epoch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Drill:
        allowed = {f for f in cls.__dataclass_fields__}
        if not isinstance(data, Mapping):
            raise InvalidInput("a drill record must be an object")
        unknown = set(data) - allowed
        missing = {"id", "appliance", "rack", "epoch", "by"} - set(data)
        if unknown or missing:
            raise InvalidInput(
                f"drill record: unknown {sorted(unknown)} / missing {sorted(missing)} fields"
            )
        return cls(**data)


# --- is it safe? --------------------------------------------------------------------------


@dataclass(frozen=True)
class DrillPlan:
    """What a drill will do: cut ``rack``; ``replicas`` (rack -> generation) may take over."""

    appliance: str
    rack: str
    epoch: int
    replicas: Mapping[str, int]
    also_affected: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def choose_appliance(snapshot: ClusterSnapshot, live: frozenset[str], pick: int) -> str:
    """A low-priority appliance a drill may use (``pick`` chooses among the lowest, at random).

    Raises Conflict when no appliance qualifies (each refusal of
    :func:`check_drill` would apply).
    """
    fit: list[tuple[int, str]] = []
    for name in sorted(snapshot.appliances):
        try:
            check_drill(snapshot, name, live)
        except (Conflict, NotFound):
            continue
        fit.append((snapshot.appliances[name].priority, name))
    if not fit:
        raise Conflict(
            "no appliance can be drilled now: none runs with a live replica holding a copy"
            " (see `meshcloud status`)"
        )
    lowest = min(p for p, _ in fit)
    names = [n for p, n in fit if p == lowest]
    return names[pick % len(names)]


def check_drill(
    snapshot: ClusterSnapshot,
    appliance: str,
    live: frozenset[str],
    *,
    leader: str | None = None,
    drill_running: Drill | None = None,
) -> DrillPlan:
    """Refuse (Conflict, NotFound) unless cutting ``appliance``'s primary now is safe.

    ``live``: the racks renewing their leases now. Safe means: no other drill;
    the appliance runs, is not moving; no rack is lost already; a live replica
    holds a copy (generation >= 1); the voters left after the cut are a majority.
    """
    validate_name("appliance", appliance)
    if drill_running is not None:
        raise Conflict(
            f"drill {drill_running.id} is under way (appliance {drill_running.appliance},"
            f" run by {drill_running.by}): wait for its report or end it first"
        )
    if appliance not in snapshot.appliances:
        raise NotFound(f"appliance {appliance} does not exist")
    if appliance in snapshot.stopped:
        raise Conflict(f"appliance {appliance} is stopped: start it before drilling it")
    asg = snapshot.assignments.get(appliance)
    if asg is None or asg.primary is None or str(asg.state) != "running":
        raise Conflict(f"appliance {appliance} is not running on a rack: nothing to fail over")
    if asg.move is not None and asg.move.phase in (
        MovePhase.HANDOVER, MovePhase.SYNCED, MovePhase.SWITCHED
    ):  # fmt: skip
        raise Conflict(f"appliance {appliance} is being moved: drill it once the move is done")
    lost = sorted(set(snapshot.racks) - live)
    if lost:
        raise Conflict(
            f"rack(s) {', '.join(lost)} already lost (not renewing their leases): a drill now"
            " would test two losses at once; bring them back first"
        )
    rack = asg.primary
    generations = snapshot.replica_generations.get(appliance, {})
    holders = {
        r: generations.get(r, 0)
        for r in asg.replicas
        if r != rack and r in live and generations.get(r, 0) >= 1
    }
    if not holders:
        raise Conflict(
            f"no live replica of {appliance} holds a copy of its disks yet: a loss of {rack}"
            " now would lose it; wait until its replicas report (meshcloud status)"
        )
    voters = set(snapshot.voters)
    left = (voters & live) - {rack}
    if voters and len(left) * 2 <= len(voters):
        raise Conflict(
            f"after losing {rack} only {len(left)} of {len(voters)} voting racks would be left:"
            " no majority, the cluster could not fail over; add a rack first"
        )
    others = tuple(
        sorted(
            n for n, a in snapshot.assignments.items()
            if n != appliance and a.primary == rack and str(a.state) == "running"
        )
    )  # fmt: skip
    notes: list[str] = []
    if others:
        notes.append(f"the cut also fails over {', '.join(others)} (they run on {rack})")
    if leader == rack:
        notes.append(
            f"{rack} leads the Raft group and keeps leading during the drill: a real loss would"
            " add an election (see the benchmark's leader-killed figures)"
        )
    return DrillPlan(appliance, rack, asg.epoch, MappingProxyType(holders), others, tuple(notes))


# --- figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """What the drilling rack saw, on its own monotonic clock (seconds)."""

    cut_at: float
    decided_at: float | None = None
    running_at: float | None = None
    new_primary: str | None = None
    new_epoch: int | None = None
    lag_at_cut_s: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    generations_at_cut: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    start_generation: int | None = None


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def figures(t: Timeline, lease_s: float, margin_s: float, renew_s: float) -> dict[str, Any]:
    """RTO (cut -> running, split into detection and restart) and RPO from a timeline.

    RPO in seconds is the lag the new primary's copy had at the cut, as the
    cut rack's replication measured it (the age of the oldest write it
    lacked); -1 there means it had never received a delta. The expected
    detection is ``lease_s + margin_s`` less up to one ``renew_s`` (the last
    renewal before the cut was issued up to that long before it).
    """
    detect = None if t.decided_at is None else t.decided_at - t.cut_at
    restart = None if t.running_at is None or t.decided_at is None else t.running_at - t.decided_at
    rto = None if t.running_at is None else t.running_at - t.cut_at
    rpo = None
    if t.new_primary is not None:
        lag = t.lag_at_cut_s.get(t.new_primary)
        rpo = None if lag is None or lag < 0 else lag
    cut_gen = max(t.generations_at_cut.values(), default=None)
    return {
        "rto_s": _r(rto),
        "detect_s": _r(detect),
        "restart_s": _r(restart),
        "rpo_s": _r(rpo),
        "rpo_generations_behind": (
            None
            if cut_gen is None or t.start_generation is None
            else max(0, cut_gen - t.start_generation)
        ),
        "start_generation": t.start_generation,
        "expected_detect_s": [round(lease_s + margin_s - renew_s, 3), round(lease_s + margin_s, 3)],
    }


# --- the report ---------------------------------------------------------------------------


def _s(value: object) -> str:
    return f"{value:.2f} s" if isinstance(value, int | float) else "not measured"


def report_text(report: Mapping[str, Any]) -> str:
    """The printable report (plain text, for field staff to keep) from a drill's JSON report."""
    f = report.get("figures") or {}
    lines = [
        f"meshcloud fire drill {report.get('id', '?')}",
        f"  cluster      {report.get('cluster_id') or '-'}",
        f"  started      {report.get('started') or '-'}   run by {report.get('by') or '-'}",
        f"  appliance    {report.get('appliance')} (priority {report.get('priority', '-')})",
        f"  cut          rack {report.get('rack')} (its primary) stopped renewing its lease"
        " and replicating, as if cut off",
        f"  result       {report.get('outcome', 'unknown')}",
        "",
        "Recovery time (RTO)",
        f"  total        {_s(f.get('rto_s'))}   cut -> running on {report.get('new_primary') or '-'}",
        f"  detection    {_s(f.get('detect_s'))}   cut -> the leader declared"
        f" {report.get('rack')} lost (expected"
        f" {'-'.join(str(x) for x in f.get('expected_detect_s') or []) or '?'} s:"
        " lease_s + margin_s)",
        f"  restart      {_s(f.get('restart_s'))}   decision -> running again",
        "",
        "Data at risk (RPO)",
        f"  time span    {_s(f.get('rpo_s'))}   writes newer than this were not on"
        f" {report.get('new_primary') or 'the new primary'} at the cut",
    ]
    if f.get("start_generation") is not None:
        lines.append(
            f"  generations  restarted from generation {f['start_generation']}"
            f" ({f.get('rpo_generations_behind', 0)} behind the freshest replica at the cut)"
        )
    kept = report.get("kept_aside")
    if kept:
        lines.append(
            f"  kept aside   {report.get('rack')} kept its diverged copy {kept.get('id')}:"
            f" {kept.get('generations')} generation(s), {kept.get('bytes')} bytes"
            " (console: Kept-aside copies; nothing is deleted)"
        )
    lines += ["", "Restore"]
    restore = report.get("restore") or {}
    lines.append(f"  rejoined     {restore.get('rejoined', 'not measured')}")
    lines.append(f"  moved back   {restore.get('moved_back', 'not asked')}")
    for note in report.get("notes", []):
        lines.append(f"  note         {note}")
    lines += ["", "Steps"]
    for step in report.get("steps", []):
        at = step.get("at_s")
        lines.append(f"  {'' if at is None else f'+{at:7.2f} s'}  {step.get('message')}")
    return "\n".join(lines) + "\n"


def step(at_s: float | None, message: str) -> dict[str, Any]:
    return {"at_s": _r(at_s), "message": message}
