"""The placement map as a pure, deterministic replicated state machine.

Every rack holds a :class:`PlacementState` and feeds it the same commands in
the same order (the Raft log), so every rack must compute the same result:
:func:`apply` reads nothing but its arguments - no clock, no randomness, no
I/O. Timestamps and ids are minted by the *proposer* and travel inside the
command.

A command is a plain JSON-serialisable dict ``{"op": NAME, ...fields}``.
Every command may also carry ``request_id`` (an id minted by the proposer,
echoed in the result) and ``expected_revision`` (compare-and-set on the
whole map: the command is refused unless the map is at that revision).

Ops (fields in brackets are optional):

=================  ==========================================================
cluster_init       cluster_id, max_voters (1/3/5), voters: the founding voters
rack_join          rack: a Rack as a dict (join, or update an existing rack)
rack_remove        rack: name (a voter is replaced by a follower, see below)
appliance_set      spec: an ApplianceSpec as a dict (create or replace)
appliance_remove   name (its assignment and replica reports go with it)
assignment_set     assignment: an Assignment as a dict; expected_epoch: the
                   current epoch, or None if there must be no assignment yet
lease_renew        rack, issued_at (the rack's clock at send), received_at
                   (the leader's clock at receipt), [leader, term]
replica_report     appliance, rack, generation (never goes backwards)
diverged_report    record: a copy a rack kept aside after a failover (rack, id,
                   appliance, sizes and time span; see :class:`DivergedCopy`)
diverged_discard   rack, id: an operator asks the rack to delete that copy
diverged_remove    rack, id: the rack deleted it (or it is gone)
power_report       power: a RackPower as a dict (the rack's power source and
                   state; the rack must have joined; see docs/power.md)
append             key, value: append a value to a named list (history tests)
appliance_desired  name, state: ``running`` or ``stopped`` (an operator's wish;
                   placement keeps a stopped appliance stopped, on its rack)
move_begin         appliance, epoch, to, [reason]: a planned move to replica
                   holder ``to`` (see "Planned moves" below)
move_synced        appliance, epoch, rack, generation, paused_at: the primary
                   paused the guest and ``to`` holds its last writes
move_switch        appliance, epoch: the map runs it on ``to`` under epoch + 1
move_done          appliance, epoch, rack, downtime_s: it runs on ``to``
move_abandon       appliance, epoch, reason: the move is given up; it stays
drill_begin        drill: a fire drill's record (meshcloud.core.drill.Drill);
                   refused while another drill is under way (docs/drill.md)
drill_update       id, [fenced, lag_at_cut_s, running_on, running_epoch]
drill_end          id: the drill is over (nothing changes if it is not current)
=================  ==========================================================

Planned moves (docs/failover.md#planned-moves) live in the assignment's
``move`` record. Only the move ops change it while the epoch stays: an
``assignment_set`` under the same epoch keeps the current record, so a
leader deciding from an older snapshot cannot erase a move under way; a new
epoch (a failover, or ``move_switch``) ends it.

:func:`apply` never raises: a malformed or refused command leaves the state
unchanged and returns ``{"ok": False, "error": KIND, "message": ...}`` with
KIND one of ``invalid``, ``conflict``, ``not_found``. A replicated state
machine that raised on a bad entry would stop applying the log for good.
:func:`validate_command` raises InvalidInput instead, for proposers that want
to refuse a command before it reaches the log.

Voters: :func:`choose_voters` keeps the current voters, fills free seats
(up to ``max_voters``, an odd number) with the racks of the sites that have
the fewest voters, and replaces a removed voter the same way. It runs inside
:func:`apply`, so every rack agrees on who should vote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from meshcloud.core.drill import Drill
from meshcloud.core.errors import Conflict, InvalidInput, MeshcloudError, NotFound
from meshcloud.core.models import (
    ApplianceSpec,
    ApplianceState,
    Assignment,
    ClusterSnapshot,
    Lease,
    Move,
    MovePhase,
    Rack,
)
from meshcloud.core.names import name_problem, validate_name
from meshcloud.core.power import RackPower

MAX_DIVERGED_ID_LEN = 128
MAX_DIVERGED_REASON_LEN = 500

MAX_CLUSTER_ID_LEN = 64
MAX_REQUEST_ID_LEN = 64
MAX_LOG_VALUE_LEN = 256
MAX_LOG_ENTRIES = 200_000
MAX_GENERATION = 1 << 62
ALLOWED_MAX_VOTERS = (1, 3, 5)
COMMON_FIELDS = frozenset({"op", "request_id", "expected_revision"})

Result = dict[str, Any]


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class DivergedCopy:
    """A copy of an appliance's disks that a rack kept aside instead of deleting it.

    After a failover, a returning rack's old copy may hold writes the new
    primary never received (made after ``common_generation``, the last
    generation both histories share). The rack moves it to
    ``<volumes>/.diverged/<id>/`` and records it here, so that any rack's API
    lists it until an operator discards it (``discard`` set: the owning rack
    deletes it, then removes the record). Times are wall-clock seconds.
    """

    rack: str
    id: str
    appliance: str
    epoch: int
    common_generation: int
    last_generation: int
    bytes: int
    first_write_at: float
    last_write_at: float
    kept_at: float
    reason: str = ""
    discard: bool = False

    def __post_init__(self) -> None:
        validate_name("rack", self.rack)
        validate_name("appliance", self.appliance)
        if (
            not isinstance(self.id, str)
            or not 0 < len(self.id) <= MAX_DIVERGED_ID_LEN
            or not self.id.startswith(self.appliance + ".")
            or name_problem(self.id.replace(".", "-")) is not None
        ):
            raise InvalidInput(
                f"diverged copy id {self.id!r:.60} must be '<appliance>.<suffix>' of letters,"
                " digits, hyphens and dots"
            )
        for key in ("epoch", "common_generation", "last_generation", "bytes"):
            _int("diverged copy", key, getattr(self, key))
        for key in ("first_write_at", "last_write_at", "kept_at"):
            _number("diverged copy", key, getattr(self, key))
        if not isinstance(self.reason, str) or len(self.reason) > MAX_DIVERGED_REASON_LEN:
            raise InvalidInput(
                f"diverged copy: reason must be a string of at most {MAX_DIVERGED_REASON_LEN}"
            )
        if not isinstance(self.discard, bool):
            raise InvalidInput("diverged copy: discard must be true or false")

    @property
    def key(self) -> str:
        return f"{self.rack}/{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rack": self.rack,
            "id": self.id,
            "appliance": self.appliance,
            "epoch": self.epoch,
            "common_generation": self.common_generation,
            "last_generation": self.last_generation,
            "bytes": self.bytes,
            "first_write_at": self.first_write_at,
            "last_write_at": self.last_write_at,
            "kept_at": self.kept_at,
            "reason": self.reason,
            "discard": self.discard,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DivergedCopy:
        fields = {
            "rack", "id", "appliance", "epoch", "common_generation", "last_generation",
            "bytes", "first_write_at", "last_write_at", "kept_at", "reason", "discard",
        }  # fmt: skip
        if not isinstance(data, Mapping):
            raise InvalidInput("diverged copy: must be an object")
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise InvalidInput(f"diverged copy: unknown field(s) {', '.join(unknown)}")
        missing = sorted(fields - {"reason", "discard"} - set(data))
        if missing:
            raise InvalidInput(f"diverged copy: missing field(s) {', '.join(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class PlacementState:
    """The whole replicated placement map. Immutable: :func:`apply` returns a new one.

    ``revision`` counts the commands that changed the map. ``voters`` are the
    racks that should vote in Raft (the store makes Raft membership follow
    it). ``logs`` holds the lists built by ``append`` (used by history tests).
    """

    cluster_id: str = ""
    revision: int = 0
    max_voters: int = 5
    voters: tuple[str, ...] = ()
    racks: Mapping[str, Rack] = field(default_factory=_frozen)
    appliances: Mapping[str, ApplianceSpec] = field(default_factory=_frozen)
    assignments: Mapping[str, Assignment] = field(default_factory=_frozen)
    leases: Mapping[str, Lease] = field(default_factory=_frozen)
    generations: Mapping[str, Mapping[str, int]] = field(default_factory=_frozen)
    logs: Mapping[str, tuple[str | int, ...]] = field(default_factory=_frozen)
    diverged: Mapping[str, DivergedCopy] = field(default_factory=_frozen)  # "rack/id" -> copy
    stopped: frozenset[str] = frozenset()  # appliances an operator stopped
    power: Mapping[str, RackPower] = field(default_factory=_frozen)  # rack -> its last report
    drill: Drill | None = None  # the fire drill under way (docs/drill.md)

    def snapshot(self) -> ClusterSnapshot:
        """The immutable view the control loops read (see meshcloud.core.models)."""
        return ClusterSnapshot(
            cluster_id=self.cluster_id,
            racks=self.racks,
            appliances=self.appliances,
            assignments=self.assignments,
            revision=self.revision,
            leases=self.leases,
            replica_generations=self.generations,
            voters=self.voters,
            stopped=self.stopped,
            power=self.power,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-like data (for full dumps and snapshots shipped between racks)."""
        return {
            "cluster_id": self.cluster_id,
            "revision": self.revision,
            "max_voters": self.max_voters,
            "voters": list(self.voters),
            "racks": {k: v.to_dict() for k, v in sorted(self.racks.items())},
            "appliances": {k: v.to_dict() for k, v in sorted(self.appliances.items())},
            "assignments": {k: v.to_dict() for k, v in sorted(self.assignments.items())},
            "leases": {k: v.to_dict() for k, v in sorted(self.leases.items())},
            "generations": {
                k: dict(sorted(v.items())) for k, v in sorted(self.generations.items())
            },
            "logs": {k: list(v) for k, v in sorted(self.logs.items())},
            "diverged": {k: v.to_dict() for k, v in sorted(self.diverged.items())},
            "stopped": sorted(self.stopped),
            "power": {k: v.to_dict() for k, v in sorted(self.power.items())},
            "drill": None if self.drill is None else self.drill.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlacementState:
        return cls(
            cluster_id=str(data.get("cluster_id", "")),
            revision=int(data.get("revision", 0)),
            max_voters=int(data.get("max_voters", 5)),
            voters=tuple(data.get("voters", ())),
            racks=_frozen({k: Rack.from_dict(v) for k, v in data.get("racks", {}).items()}),
            appliances=_frozen(
                {k: ApplianceSpec.from_dict(v) for k, v in data.get("appliances", {}).items()}
            ),
            assignments=_frozen(
                {k: Assignment.from_dict(v) for k, v in data.get("assignments", {}).items()}
            ),
            leases=_frozen({k: Lease.from_dict(v) for k, v in data.get("leases", {}).items()}),
            generations=_frozen({k: _frozen(v) for k, v in data.get("generations", {}).items()}),
            logs=_frozen({k: tuple(v) for k, v in data.get("logs", {}).items()}),
            diverged=_frozen(
                {k: DivergedCopy.from_dict(v) for k, v in data.get("diverged", {}).items()}
            ),
            stopped=frozenset(data.get("stopped", ())),
            power=_frozen({k: RackPower.from_dict(v) for k, v in data.get("power", {}).items()}),
            drill=Drill.from_dict(data["drill"]) if data.get("drill") else None,
        )


EMPTY = PlacementState()


# --- voters -----------------------------------------------------------------


def voter_count(racks: int, max_voters: int) -> int:
    """How many voters ``racks`` racks should have: at most ``max_voters``, and odd."""
    count = min(racks, max_voters)
    if count > 1 and count % 2 == 0:
        count -= 1
    return count


def choose_voters(
    racks: Mapping[str, Rack], current: tuple[str, ...], max_voters: int
) -> tuple[str, ...]:
    """The racks that should vote, sorted by name; moves as few seats as possible.

    Current voters keep their seat while they are racks of the map (a voter
    named by ``cluster_init`` keeps its seat before its ``rack_join`` lands).
    Free seats go to the rack of the site with the fewest voters, ties broken
    by site name then rack name; surplus seats (racks were removed) are taken
    from the site with the most voters, highest name first.
    """
    keep = list(dict.fromkeys(current))
    target = voter_count(len(set(racks) | set(keep)), max_voters)

    def site_of(name: str) -> str:
        rack = racks.get(name)
        return rack.site if rack is not None else ""

    def per_site(names: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in names:
            counts[site_of(n)] = counts.get(site_of(n), 0) + 1
        return counts

    while len(keep) > target:
        counts = per_site(keep)
        victim = max(keep, key=lambda n: (n not in racks, counts[site_of(n)], n))
        keep.remove(victim)
    _fill(keep, sorted(n for n in racks if n not in keep), site_of, target)
    return tuple(sorted(keep))


def _fill(keep: list[str], spare: list[str], site_of: Callable[[str], str], target: int) -> None:
    """Give free seats to the rack of the site with the fewest voters (then by site, name)."""
    while len(keep) < target and spare:
        counts: dict[str, int] = {}
        for n in keep:
            counts[site_of(n)] = counts.get(site_of(n), 0) + 1
        pick = min(spare, key=lambda n: (counts.get(site_of(n), 0), site_of(n), n))
        keep.append(pick)
        spare.remove(pick)


def founding_voters(founder: str, sites: Mapping[str, str], max_voters: int) -> tuple[str, ...]:
    """The voters a new cluster starts with, from its founding racks (name -> site).

    The founder always has a seat (it starts the group, and a group it is not
    part of would be a second one); the other seats follow the rule of
    :func:`choose_voters`: an odd number, at most ``max_voters``, spread over
    the sites. ``cluster_init`` names them, and they start as one static
    Raft group (docs/discovery.md, "Founding voters").
    """
    if max_voters not in ALLOWED_MAX_VOTERS:
        raise InvalidInput(f"max_voters must be 1, 3 or 5, not {max_voters!r}")
    if founder not in sites:
        raise InvalidInput(f"the founder {founder} must be one of the founding racks")
    keep = [founder]
    spare = sorted(n for n in sites if n != founder)
    _fill(keep, spare, lambda n: sites[n], voter_count(len(sites), max_voters))
    return tuple(sorted(keep))


# --- validation ---------------------------------------------------------------


def _fail(kind: str, message: str) -> Result:
    return {"ok": False, "error": kind, "message": message}


def _require_fields(
    op: str, command: Mapping[str, Any], required: set[str], optional: set[str]
) -> None:
    allowed = required | optional | COMMON_FIELDS
    unknown = sorted(str(k) for k in command if k not in allowed)
    if unknown:
        raise InvalidInput(f"{op}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(required - set(command))
    if missing:
        raise InvalidInput(f"{op}: missing field(s) {', '.join(missing)}")


def _number(op: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{op}: {key} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidInput(f"{op}: {key} must be a finite number")
    return float(value)


def _int(op: str, key: str, value: object, low: int = 0, high: int = MAX_GENERATION) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{op}: {key} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidInput(f"{op}: {key} ({value}) must be between {low} and {high}")
    return value


def _mapping(op: str, key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{op}: {key} must be an object, not {type(value).__name__}")
    return value


_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "cluster_init": ({"cluster_id", "max_voters", "voters"}, set()),
    "rack_join": ({"rack"}, set()),
    "rack_remove": ({"rack"}, set()),
    "appliance_set": ({"spec"}, set()),
    "appliance_remove": ({"name"}, set()),
    "assignment_set": ({"assignment", "expected_epoch"}, set()),
    "lease_renew": ({"rack", "issued_at", "received_at"}, {"leader", "term"}),
    "replica_report": ({"appliance", "rack", "generation"}, set()),
    "diverged_report": ({"record"}, set()),
    "diverged_discard": ({"rack", "id"}, set()),
    "diverged_remove": ({"rack", "id"}, set()),
    "power_report": ({"power"}, set()),
    "append": ({"key", "value"}, set()),
    "appliance_desired": ({"name", "state"}, set()),
    "move_begin": ({"appliance", "epoch", "to"}, {"reason"}),
    "move_synced": ({"appliance", "epoch", "rack", "generation", "paused_at"}, set()),
    "move_switch": ({"appliance", "epoch"}, set()),
    "move_done": ({"appliance", "epoch", "rack", "downtime_s"}, set()),
    "move_abandon": ({"appliance", "epoch", "reason"}, set()),
    "drill_begin": ({"drill"}, set()),
    "drill_update": ({"id"}, {"fenced", "lag_at_cut_s", "running_on", "running_epoch"}),
    "drill_end": ({"id"}, set()),
}
OPS = tuple(sorted(_FIELDS))


def validate_command(command: object) -> Mapping[str, Any]:
    """Return ``command`` if it is a well-formed command, else raise InvalidInput.

    Checks shape and values only; whether the command applies to the current
    map (compare-and-set, existence) is decided by :func:`apply`.
    """
    if not isinstance(command, Mapping):
        raise InvalidInput(f"a command must be an object, not {type(command).__name__}")
    op = command.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise InvalidInput(f"unknown op {op!r:.40}: use one of {', '.join(OPS)}")
    required, optional = _FIELDS[op]
    _require_fields(op, command, required, optional)
    request_id = command.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_LEN
    ):
        raise InvalidInput(f"{op}: request_id must be a string of 1-{MAX_REQUEST_ID_LEN} chars")
    if command.get("expected_revision") is not None:
        _int(op, "expected_revision", command["expected_revision"])
    _CHECKS[op](command)
    return command


def _check_init(c: Mapping[str, Any]) -> None:
    cid = c["cluster_id"]
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CLUSTER_ID_LEN:
        raise InvalidInput(f"cluster_init: cluster_id must be 1-{MAX_CLUSTER_ID_LEN} characters")
    if c["max_voters"] not in ALLOWED_MAX_VOTERS or isinstance(c["max_voters"], bool):
        raise InvalidInput(f"cluster_init: max_voters must be 1, 3 or 5, not {c['max_voters']!r}")
    voters = c["voters"]
    if not isinstance(voters, list | tuple) or not voters:
        raise InvalidInput("cluster_init: voters must be a non-empty list of rack names")
    for v in voters:
        validate_name("voter rack", v)
    if len(set(voters)) != len(voters) or len(voters) > c["max_voters"]:
        raise InvalidInput("cluster_init: voters must be distinct and at most max_voters")


def _check_rack(c: Mapping[str, Any]) -> None:
    Rack.from_dict(_mapping("rack_join", "rack", c["rack"]))


def _check_rack_name(c: Mapping[str, Any]) -> None:
    validate_name("rack", c["rack"])


def _check_spec(c: Mapping[str, Any]) -> None:
    ApplianceSpec.from_dict(_mapping("appliance_set", "spec", c["spec"]))


def _check_name(c: Mapping[str, Any]) -> None:
    validate_name("appliance", c["name"])


def _check_assignment(c: Mapping[str, Any]) -> None:
    Assignment.from_dict(_mapping("assignment_set", "assignment", c["assignment"]))
    if c["expected_epoch"] is not None:
        _int("assignment_set", "expected_epoch", c["expected_epoch"])


def _check_lease(c: Mapping[str, Any]) -> None:
    validate_name("rack", c["rack"])
    _number("lease_renew", "issued_at", c["issued_at"])
    _number("lease_renew", "received_at", c["received_at"])
    if c.get("leader"):
        validate_name("leader rack", c["leader"])
    if "term" in c:
        _int("lease_renew", "term", c["term"])


def _check_report(c: Mapping[str, Any]) -> None:
    validate_name("appliance", c["appliance"])
    validate_name("rack", c["rack"])
    _int("replica_report", "generation", c["generation"])


def _check_diverged_record(c: Mapping[str, Any]) -> None:
    DivergedCopy.from_dict(_mapping("diverged_report", "record", c["record"]))


def _check_diverged_key(c: Mapping[str, Any]) -> None:
    validate_name("rack", c["rack"])
    ident = c["id"]
    if not isinstance(ident, str) or not 0 < len(ident) <= MAX_DIVERGED_ID_LEN:
        raise InvalidInput(f"diverged copy id must be a string of 1-{MAX_DIVERGED_ID_LEN} chars")


def _check_power(c: Mapping[str, Any]) -> None:
    RackPower.from_dict(_mapping("power_report", "power", c["power"]))


def _check_append(c: Mapping[str, Any]) -> None:
    key = c["key"]
    if name_problem(key) is not None:
        raise InvalidInput(f"append: key {key!r:.40} must be a valid name")
    value = c["value"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput("append: value must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_LOG_VALUE_LEN:
        raise InvalidInput(f"append: value longer than {MAX_LOG_VALUE_LEN} characters")
    if isinstance(value, int) and abs(value) > MAX_GENERATION:
        raise InvalidInput("append: integer value out of range")


def _check_desired(c: Mapping[str, Any]) -> None:
    validate_name("appliance", c["name"])
    if c["state"] not in ("running", "stopped"):
        raise InvalidInput(
            f"appliance_desired: state must be 'running' or 'stopped', not {c['state']!r:.40}"
        )


def _check_move(c: Mapping[str, Any]) -> None:
    op = str(c["op"])
    validate_name("appliance", c["appliance"])
    _int(op, "epoch", c["epoch"])
    if "to" in c:
        validate_name("move target rack", c["to"])
    if "rack" in c:
        validate_name("rack", c["rack"])
    if "generation" in c:
        _int(op, "generation", c["generation"])
    for key in ("paused_at", "downtime_s"):
        if key in c and _number(op, key, c[key]) < 0:
            raise InvalidInput(f"{op}: {key} must be 0 or more")
    reason = c.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_DIVERGED_REASON_LEN:
        raise InvalidInput(f"{op}: reason must be a string of at most {MAX_DIVERGED_REASON_LEN}")


def _check_drill(c: Mapping[str, Any]) -> None:
    if "drill" in c:
        Drill.from_dict(_mapping(str(c["op"]), "drill", c["drill"]))
    if "id" in c:
        validate_name("drill", c["id"])


_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "cluster_init": _check_init,
    "rack_join": _check_rack,
    "rack_remove": _check_rack_name,
    "appliance_set": _check_spec,
    "appliance_remove": _check_name,
    "assignment_set": _check_assignment,
    "lease_renew": _check_lease,
    "replica_report": _check_report,
    "diverged_report": _check_diverged_record,
    "diverged_discard": _check_diverged_key,
    "diverged_remove": _check_diverged_key,
    "power_report": _check_power,
    "append": _check_append,
    "appliance_desired": _check_desired,
    "move_begin": _check_move,
    "move_synced": _check_move,
    "move_switch": _check_move,
    "move_done": _check_move,
    "move_abandon": _check_move,
    "drill_begin": _check_drill,
    "drill_update": _check_drill,
    "drill_end": _check_drill,
}


# --- transitions ----------------------------------------------------------------


def _set(mapping: Mapping[str, Any], key: str, value: Any) -> Mapping[str, Any]:
    new = dict(mapping)
    new[key] = value
    return MappingProxyType(new)


def _without(mapping: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    new = dict(mapping)
    new.pop(key, None)
    return MappingProxyType(new)


def _op_init(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    voters = tuple(sorted(c["voters"]))
    if s.cluster_id:
        if s.cluster_id == c["cluster_id"]:
            return s, {"ok": True, "changed": False}
        raise Conflict(f"the map already belongs to cluster {s.cluster_id}, not {c['cluster_id']}")
    new = replace(s, cluster_id=c["cluster_id"], max_voters=c["max_voters"], voters=voters)
    return new, {"ok": True, "changed": True}


def _op_rack_join(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    rack = Rack.from_dict(c["rack"])
    old = s.racks.get(rack.name)
    if old == rack:
        return s, {"ok": True, "changed": False, "voter": rack.name in s.voters}
    racks = _set(s.racks, rack.name, rack)
    voters = choose_voters(racks, s.voters, s.max_voters)
    new = replace(s, racks=racks, voters=voters)
    return new, {"ok": True, "changed": True, "voter": rack.name in voters}


def _op_rack_remove(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    name = c["rack"]
    if name not in s.racks and name not in s.voters:
        raise NotFound(f"rack {name} is not a member of the map")
    racks = _without(s.racks, name)
    current = tuple(v for v in s.voters if v != name)
    voters = choose_voters(racks, current, s.max_voters)
    new = replace(
        s,
        racks=racks,
        voters=voters,
        leases=_without(s.leases, name),
        power=_without(s.power, name),
    )
    promoted = sorted(set(voters) - set(s.voters))
    return new, {"ok": True, "changed": True, "promoted": promoted}


def _op_appliance_set(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    spec = ApplianceSpec.from_dict(c["spec"])
    if s.appliances.get(spec.name) == spec:
        return s, {"ok": True, "changed": False}
    return replace(s, appliances=_set(s.appliances, spec.name, spec)), {"ok": True, "changed": True}


def _op_appliance_remove(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    name = c["name"]
    if name not in s.appliances:
        raise NotFound(f"appliance {name} does not exist")
    new = replace(
        s,
        appliances=_without(s.appliances, name),
        assignments=_without(s.assignments, name),
        generations=_without(s.generations, name),
        stopped=s.stopped - {name},
    )
    return new, {"ok": True, "changed": True}


def _op_assignment_set(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    asg = Assignment.from_dict(c["assignment"])
    if asg.appliance not in s.appliances:
        raise NotFound(f"appliance {asg.appliance} does not exist: set its spec first")
    current = s.assignments.get(asg.appliance)
    expected = c["expected_epoch"]
    if current is None:
        if expected is not None:
            raise Conflict(
                f"appliance {asg.appliance} has no assignment, but epoch {expected} was expected"
            )
    else:
        if expected != current.epoch:
            raise Conflict(
                f"appliance {asg.appliance} is at epoch {current.epoch}, not {expected}:"
                " re-read the map and decide again"
            )
        if asg.epoch < current.epoch:
            raise Conflict(
                f"appliance {asg.appliance}: epoch {asg.epoch} is older than {current.epoch}"
            )
        if asg.primary != current.primary and asg.epoch == current.epoch:
            raise Conflict(
                f"appliance {asg.appliance}: moving the primary from {current.primary} to"
                f" {asg.primary} needs a new epoch (above {current.epoch})"
            )
    if current is not None and asg.epoch == current.epoch:
        asg = replace(asg, move=current.move)  # only the move ops change it (module docstring)
    if current == asg:
        return s, {"ok": True, "changed": False, "epoch": asg.epoch}
    new = replace(s, assignments=_set(s.assignments, asg.appliance, asg))
    # A rack that no longer holds a copy loses its generation report: if it holds one
    # again later (re-seeded from a newer history), an old, higher number must not make
    # a failover pick it as the freshest; it reports again once it follows this epoch.
    gens = s.generations.get(asg.appliance)
    holders = set(asg.holders())
    if gens is not None and not set(gens) <= holders:
        kept = MappingProxyType({r: g for r, g in gens.items() if r in holders})
        new = replace(new, generations=_set(s.generations, asg.appliance, kept))
    return new, {"ok": True, "changed": True, "epoch": asg.epoch}


def _op_lease_renew(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    name = c["rack"]
    if name not in s.racks:
        raise NotFound(f"rack {name} has not joined: it cannot hold a lease")
    lease = Lease(
        rack=name,
        issued_at=float(c["issued_at"]),
        received_at=float(c["received_at"]),
        leader=c.get("leader") or "",
        term=c.get("term", 0),
    )
    new = replace(s, leases=_set(s.leases, name, lease))
    return new, {"ok": True, "changed": True, "issued_at": lease.issued_at}


def _op_replica_report(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    app, rack, gen = c["appliance"], c["rack"], c["generation"]
    if app not in s.appliances:
        raise NotFound(f"appliance {app} does not exist")
    per_rack = s.generations.get(app, MappingProxyType({}))
    old = per_rack.get(rack)
    if old is not None and gen < old:
        raise Conflict(f"{app} on {rack}: generation {gen} is older than the reported {old}")
    if old == gen:
        return s, {"ok": True, "changed": False, "generation": gen}
    generations = _set(s.generations, app, _set(per_rack, rack, gen))
    return replace(s, generations=generations), {"ok": True, "changed": True, "generation": gen}


def _op_diverged_report(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    copy = DivergedCopy.from_dict(c["record"])
    old = s.diverged.get(copy.key)
    if old is not None and old.discard:
        copy = replace(copy, discard=True)  # an operator's decision outlives a re-report
    if old == copy:
        return s, {"ok": True, "changed": False}
    return replace(s, diverged=_set(s.diverged, copy.key, copy)), {"ok": True, "changed": True}


def _op_diverged_discard(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    key = f"{c['rack']}/{c['id']}"
    old = s.diverged.get(key)
    if old is None:
        raise NotFound(f"no diverged copy {c['id']} on rack {c['rack']}")
    if old.discard:
        return s, {"ok": True, "changed": False}
    new = replace(old, discard=True)
    return replace(s, diverged=_set(s.diverged, key, new)), {"ok": True, "changed": True}


def _op_diverged_remove(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    key = f"{c['rack']}/{c['id']}"
    if key not in s.diverged:
        return s, {"ok": True, "changed": False}
    return replace(s, diverged=_without(s.diverged, key)), {"ok": True, "changed": True}


def _op_power_report(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    power = RackPower.from_dict(c["power"])
    if power.rack not in s.racks:
        raise NotFound(f"rack {power.rack} has not joined: it cannot report its power")
    if s.power.get(power.rack) == power:
        return s, {"ok": True, "changed": False}
    return replace(s, power=_set(s.power, power.rack, power)), {"ok": True, "changed": True}


def _op_appliance_desired(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    name = c["name"]
    if name not in s.appliances:
        raise NotFound(f"appliance {name} does not exist")
    stopped = s.stopped | {name} if c["state"] == "stopped" else s.stopped - {name}
    if stopped == s.stopped:
        return s, {"ok": True, "changed": False}
    return replace(s, stopped=frozenset(stopped)), {"ok": True, "changed": True}


def _moving(s: PlacementState, c: Mapping[str, Any], *phases: MovePhase) -> tuple[Assignment, Move]:
    """The assignment at the command's epoch whose move is in one of ``phases``."""
    name, epoch = c["appliance"], c["epoch"]
    asg = s.assignments.get(name)
    if asg is None:
        raise NotFound(f"appliance {name} has no assignment")
    if asg.epoch != epoch:
        raise Conflict(f"appliance {name} is at epoch {asg.epoch}, not {epoch}: the move is over")
    move = asg.move
    if move is None or move.phase not in phases:
        now = f"its move is {move.phase}" if move is not None else "no move is under way"
        raise Conflict(f"{c['op']} of {name}: {now}")
    return asg, move


def _with_move(
    s: PlacementState, asg: Assignment, move: Move, **fields: Any
) -> tuple[PlacementState, Result]:
    new_asg = replace(asg, move=replace(move, **fields))
    new = replace(s, assignments=_set(s.assignments, asg.appliance, new_asg))
    return new, {"ok": True, "changed": True, "epoch": asg.epoch}


def _op_move_begin(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    name, epoch, to = c["appliance"], c["epoch"], c["to"]
    asg = s.assignments.get(name)
    if asg is None or name not in s.appliances:
        raise NotFound(f"appliance {name} has no assignment: it is not placed yet")
    if asg.epoch != epoch:
        raise Conflict(f"appliance {name} is at epoch {asg.epoch}, not {epoch}: decide again")
    if asg.state is not ApplianceState.RUNNING or asg.primary is None or name in s.stopped:
        raise Conflict(f"appliance {name} is {asg.state}, not running: there is nothing to move")
    if asg.moving:
        assert asg.move is not None
        raise Conflict(f"appliance {name} is already moving to {asg.move.to}")
    if to == asg.primary:
        raise Conflict(f"appliance {name} already runs on {to}")
    if to not in asg.replicas:
        holders = ", ".join(asg.replicas) or "none"
        raise Conflict(
            f"{to} holds no replica of {name}: a planned move goes to a replica holder ({holders})"
        )
    move = Move(asg.primary, to, MovePhase.HANDOVER, reason=c.get("reason", ""))
    new = replace(s, assignments=_set(s.assignments, name, replace(asg, move=move)))
    return new, {"ok": True, "changed": True, "epoch": epoch}


def _op_move_synced(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    asg, move = _moving(s, c, MovePhase.HANDOVER)
    if c["rack"] != asg.primary:
        raise Conflict(f"{c['rack']} is not the primary of {asg.appliance} ({asg.primary})")
    return _with_move(
        s, asg, move, phase=MovePhase.SYNCED, generation=c["generation"],
        paused_at=float(c["paused_at"]),
    )  # fmt: skip


def _op_move_switch(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    asg, move = _moving(s, c, MovePhase.SYNCED)
    replicas = tuple(sorted((set(asg.replicas) - {move.to}) | {move.source}))
    new_asg = Assignment(
        asg.appliance,
        move.to,
        replicas,
        asg.epoch + 1,
        ApplianceState.RUNNING,
        f"moved from {move.source} to {move.to} (generation {move.generation})"
        + (f": {move.reason}" if move.reason else ""),
        replace(move, phase=MovePhase.SWITCHED),
    )
    new = replace(s, assignments=_set(s.assignments, asg.appliance, new_asg))
    return new, {"ok": True, "changed": True, "epoch": new_asg.epoch}


def _op_move_done(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    asg, move = _moving(s, c, MovePhase.SWITCHED)
    if c["rack"] != asg.primary:
        raise Conflict(f"{c['rack']} is not the primary of {asg.appliance} ({asg.primary})")
    return _with_move(s, asg, move, phase=MovePhase.DONE, downtime_s=float(c["downtime_s"]))


def _op_move_abandon(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    asg, move = _moving(s, c, MovePhase.HANDOVER, MovePhase.SYNCED)
    return _with_move(s, asg, move, phase=MovePhase.ABANDONED, reason=c["reason"])


def _op_append(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    key, value = c["key"], c["value"]
    old = s.logs.get(key, ())
    if len(old) >= MAX_LOG_ENTRIES:
        raise Conflict(f"list {key} is full ({MAX_LOG_ENTRIES} values)")
    new = replace(s, logs=_set(s.logs, key, (*old, value)))
    return new, {"ok": True, "changed": True, "index": len(old)}


def _op_drill_begin(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    drill = Drill.from_dict(c["drill"])
    if s.drill is not None:
        if s.drill == drill:
            return s, {"ok": True, "changed": False}
        raise Conflict(f"drill {s.drill.id} is under way (run by {s.drill.by}): one at a time")
    if drill.rack not in s.racks or drill.by not in s.racks:
        raise NotFound(f"drill {drill.id}: rack {drill.rack} or {drill.by} is not a member")
    if drill.appliance not in s.appliances:
        raise NotFound(f"drill {drill.id}: appliance {drill.appliance} does not exist")
    return replace(s, drill=drill), {"ok": True, "changed": True}


def _op_drill_update(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    if s.drill is None or s.drill.id != c["id"]:
        raise Conflict(f"drill {c['id']} is not under way")
    fields = {k: c[k] for k in ("fenced", "lag_at_cut_s", "running_on", "running_epoch") if k in c}
    new = Drill.from_dict(s.drill.to_dict() | fields)
    if new == s.drill:
        return s, {"ok": True, "changed": False}
    return replace(s, drill=new), {"ok": True, "changed": True}


def _op_drill_end(s: PlacementState, c: Mapping[str, Any]) -> tuple[PlacementState, Result]:
    if s.drill is None or s.drill.id != c["id"]:
        return s, {"ok": True, "changed": False}
    return replace(s, drill=None), {"ok": True, "changed": True}


_OPS: dict[str, Callable[[PlacementState, Mapping[str, Any]], tuple[PlacementState, Result]]] = {
    "cluster_init": _op_init,
    "rack_join": _op_rack_join,
    "rack_remove": _op_rack_remove,
    "appliance_set": _op_appliance_set,
    "appliance_remove": _op_appliance_remove,
    "assignment_set": _op_assignment_set,
    "lease_renew": _op_lease_renew,
    "replica_report": _op_replica_report,
    "diverged_report": _op_diverged_report,
    "diverged_discard": _op_diverged_discard,
    "diverged_remove": _op_diverged_remove,
    "power_report": _op_power_report,
    "append": _op_append,
    "appliance_desired": _op_appliance_desired,
    "move_begin": _op_move_begin,
    "move_synced": _op_move_synced,
    "move_switch": _op_move_switch,
    "move_done": _op_move_done,
    "move_abandon": _op_move_abandon,
    "drill_begin": _op_drill_begin,
    "drill_update": _op_drill_update,
    "drill_end": _op_drill_end,
}

_ERROR_KINDS: tuple[tuple[type[MeshcloudError], str], ...] = (
    (InvalidInput, "invalid"),
    (Conflict, "conflict"),
    (NotFound, "not_found"),
)


def apply(state: PlacementState, command: object) -> tuple[PlacementState, Result]:
    """Apply one command; return the new state and a result dict. Never raises.

    The result always has ``ok``; on success also ``revision`` (the map's
    revision after the command) and op-specific fields; on refusal ``error``
    and ``message``. ``request_id`` is echoed when the command carried one.
    """
    request_id = command.get("request_id") if isinstance(command, Mapping) else None
    try:
        cmd = validate_command(command)
        expected = cmd.get("expected_revision")
        if expected is not None and expected != state.revision:
            raise Conflict(
                f"the map is at revision {state.revision}, not {expected}: re-read and retry"
            )
        new, result = _OPS[cmd["op"]](state, cmd)
    except MeshcloudError as exc:
        kind = next((k for cls, k in _ERROR_KINDS if isinstance(exc, cls)), "invalid")
        result = _fail(kind, str(exc))
        new = state
    except Exception as exc:  # a bug must not stop the log: refuse the command instead
        result = _fail("invalid", f"command refused: {type(exc).__name__}: {exc}")
        new = state
    if result.get("changed"):
        new = replace(new, revision=state.revision + 1)
    if result["ok"]:
        result["revision"] = new.revision
    if isinstance(request_id, str):
        result["request_id"] = request_id
    return new, result


def raise_for_result(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return ``result`` if it is a success, else raise the matching MeshcloudError."""
    if result.get("ok"):
        return result
    kind = result.get("error")
    message = str(result.get("message", "the command was refused"))
    for cls, name in _ERROR_KINDS:
        if name == kind:
            raise cls(message)
    raise InvalidInput(message)
