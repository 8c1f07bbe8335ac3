"""Frozen data models of the cluster: racks, appliance specs, the placement map.

Each model validates itself on construction and raises InvalidInput with a
message that names the field. ``from_dict`` accepts plain JSON-like data and
refuses unknown fields; ``to_dict`` returns plain data again.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name
from meshcloud.core.power import RackPower

# Bounds that keep specs sane on a rack of commodity servers.
MAX_VCPUS = 64
MAX_MEMORY_MIB = 512 * 1024
MAX_DISK_GIB = 16 * 1024
MAX_DISKS = 8
MAX_PORTS = 32
MAX_REPLICAS = 4
PRIORITY_MIN, PRIORITY_MAX = 0, 1000
MAX_BOOT_ARGS_LEN = 256
_BOOT_ARGS_ALLOWED = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789=._-, "
)


def _int_field(owner: str, key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{owner}: {key} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidInput(f"{owner}: {key} ({value}) must be between {low} and {high}")
    return value


def _check_keys(owner: str, data: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{owner} must be an object, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise InvalidInput(f"{owner}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(required - set(data))
    if missing:
        raise InvalidInput(f"{owner}: missing field(s) {', '.join(missing)}")


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class DiskSpec:
    """One virtual disk of an appliance: a qcow2 volume of ``size_gib``."""

    name: str
    size_gib: int

    def __post_init__(self) -> None:
        validate_name("disk", self.name)
        _int_field(f"disk {self.name}", "size_gib", self.size_gib, 1, MAX_DISK_GIB)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiskSpec:
        _check_keys("disk", data, {"name", "size_gib"}, {"name", "size_gib"})
        return cls(name=data["name"], size_gib=data["size_gib"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size_gib": self.size_gib}


@dataclass(frozen=True)
class PortSpec:
    """A service port the appliance offers on its address."""

    name: str
    port: int
    protocol: Protocol = Protocol.TCP

    def __post_init__(self) -> None:
        validate_name("port", self.name)
        _int_field(f"port {self.name}", "port", self.port, 1, 65535)
        if self.protocol not in (Protocol.TCP, Protocol.UDP):
            raise InvalidInput(f"port {self.name}: protocol must be 'tcp' or 'udp'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PortSpec:
        _check_keys("port", data, {"name", "port", "protocol"}, {"name", "port"})
        proto = data.get("protocol", "tcp")
        if proto not in ("tcp", "udp"):
            raise InvalidInput(f"port {data.get('name')!r}: protocol must be 'tcp' or 'udp'")
        return cls(name=data["name"], port=data["port"], protocol=Protocol(proto))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": str(self.protocol)}


@dataclass(frozen=True)
class ApplianceSpec:
    """The desired state of one appliance: what to run, how big, how important.

    ``priority`` runs from 0 (stopped first when capacity is short) to 1000.
    ``replicas`` is the number of other racks that hold copies of its disks.
    ``ip`` is the appliance's stable address on the rack segment (optional).
    ``boot_args`` are extra kernel arguments for appliances booted from a
    kernel (the demo appliance), restricted to a safe character set.
    """

    name: str
    image: str
    vcpus: int = 1
    memory_mib: int = 256
    disks: tuple[DiskSpec, ...] = ()
    priority: int = 500
    replicas: int = 1
    ports: tuple[PortSpec, ...] = ()
    ip: str | None = None
    boot_args: str = ""

    def __post_init__(self) -> None:
        validate_name("appliance", self.name)
        owner = f"appliance {self.name}"
        validate_name("image", self.image)
        _int_field(owner, "vcpus", self.vcpus, 1, MAX_VCPUS)
        _int_field(owner, "memory_mib", self.memory_mib, 64, MAX_MEMORY_MIB)
        _int_field(owner, "priority", self.priority, PRIORITY_MIN, PRIORITY_MAX)
        _int_field(owner, "replicas", self.replicas, 0, MAX_REPLICAS)
        if not isinstance(self.disks, tuple) or not all(
            isinstance(d, DiskSpec) for d in self.disks
        ):
            raise InvalidInput(f"{owner}: disks must be a list of disks")
        if len(self.disks) > MAX_DISKS:
            raise InvalidInput(f"{owner}: at most {MAX_DISKS} disks, got {len(self.disks)}")
        disk_names = [d.name for d in self.disks]
        if len(set(disk_names)) != len(disk_names):
            raise InvalidInput(f"{owner}: disk names must be unique")
        if not isinstance(self.ports, tuple) or not all(
            isinstance(p, PortSpec) for p in self.ports
        ):
            raise InvalidInput(f"{owner}: ports must be a list of ports")
        if len(self.ports) > MAX_PORTS:
            raise InvalidInput(f"{owner}: at most {MAX_PORTS} ports, got {len(self.ports)}")
        if self.ip is not None:
            try:
                addr = ipaddress.ip_address(self.ip)
            except ValueError:
                raise InvalidInput(f"{owner}: ip {self.ip!r} is not an IP address") from None
            if addr.version != 4 or addr.is_multicast or addr.is_unspecified or addr.is_loopback:
                raise InvalidInput(f"{owner}: ip {self.ip} must be a unicast IPv4 address")
        if not isinstance(self.boot_args, str):
            raise InvalidInput(f"{owner}: boot_args must be a string")
        if len(self.boot_args) > MAX_BOOT_ARGS_LEN:
            raise InvalidInput(f"{owner}: boot_args longer than {MAX_BOOT_ARGS_LEN} characters")
        bad = sorted(set(self.boot_args) - _BOOT_ARGS_ALLOWED)
        if bad:
            raise InvalidInput(
                f"{owner}: boot_args may hold only letters, digits, spaces and '=._-,'"
                f" (found {bad[0]!r})"
            )

    @property
    def disk_gib(self) -> int:
        """Total disk size the appliance needs on each rack holding it."""
        return sum(d.size_gib for d in self.disks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ApplianceSpec:
        fields = {
            "name", "image", "vcpus", "memory_mib", "disks", "priority",
            "replicas", "ports", "ip", "boot_args",
        }  # fmt: skip
        _check_keys("appliance", data, fields, {"name", "image"})
        disks = data.get("disks", [])
        ports = data.get("ports", [])
        if not isinstance(disks, list):
            raise InvalidInput("appliance: disks must be a list")
        if not isinstance(ports, list):
            raise InvalidInput("appliance: ports must be a list")
        kwargs = {k: v for k, v in data.items() if k not in ("disks", "ports")}
        return cls(
            **kwargs,
            disks=tuple(DiskSpec.from_dict(d) for d in disks),
            ports=tuple(PortSpec.from_dict(p) for p in ports),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disks": [d.to_dict() for d in self.disks],
            "priority": self.priority,
            "replicas": self.replicas,
            "ports": [p.to_dict() for p in self.ports],
            "ip": self.ip,
            "boot_args": self.boot_args,
        }


def appliance_mac(cluster_id: str, appliance: str) -> str:
    """A stable, locally administered MAC for an appliance, the same on every rack."""
    digest = hashlib.sha256(f"{cluster_id}/{appliance}".encode()).digest()
    # 0x52 = locally administered, unicast (QEMU's 52:54:00 prefix is the same idea).
    return "52:54:" + ":".join(f"{b:02x}" for b in digest[:4])


@dataclass(frozen=True)
class Capacity:
    """Resources a rack offers to appliances (or an appliance needs)."""

    vcpus: int
    memory_mib: int
    disk_gib: int

    def __post_init__(self) -> None:
        _int_field("capacity", "vcpus", self.vcpus, 0, 100_000)
        _int_field("capacity", "memory_mib", self.memory_mib, 0, 1 << 40)
        _int_field("capacity", "disk_gib", self.disk_gib, 0, 1 << 30)

    def fits(self, need: Capacity) -> bool:
        return (
            need.vcpus <= self.vcpus
            and need.memory_mib <= self.memory_mib
            and need.disk_gib <= self.disk_gib
        )

    def minus(self, used: Capacity) -> Capacity:
        """What is left; may not go negative (callers check ``fits`` first)."""
        return Capacity(
            self.vcpus - used.vcpus,
            self.memory_mib - used.memory_mib,
            self.disk_gib - used.disk_gib,
        )

    def to_dict(self) -> dict[str, int]:
        return {"vcpus": self.vcpus, "memory_mib": self.memory_mib, "disk_gib": self.disk_gib}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capacity:
        _check_keys(
            "capacity",
            data,
            {"vcpus", "memory_mib", "disk_gib"},
            {"vcpus", "memory_mib", "disk_gib"},
        )
        return cls(data["vcpus"], data["memory_mib"], data["disk_gib"])


def spec_needs(spec: ApplianceSpec) -> Capacity:
    """The capacity an appliance takes on the rack that runs it."""
    return Capacity(spec.vcpus, spec.memory_mib, spec.disk_gib)


@dataclass(frozen=True)
class Rack:
    """A member rack: identity, where it is, what it offers, how to reach it."""

    name: str
    site: str
    capacity: Capacity
    address: str = ""
    api_port: int = 0
    raft_port: int = 0
    drained: bool = False

    def __post_init__(self) -> None:
        validate_name("rack", self.name)
        validate_name("site", self.site)
        if self.address:
            try:
                ipaddress.ip_address(self.address)
            except ValueError:
                raise InvalidInput(
                    f"rack {self.name}: address {self.address!r} is not an IP"
                ) from None
        _int_field(f"rack {self.name}", "api_port", self.api_port, 0, 65535)
        _int_field(f"rack {self.name}", "raft_port", self.raft_port, 0, 65535)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "site": self.site,
            "capacity": self.capacity.to_dict(),
            "address": self.address,
            "api_port": self.api_port,
            "raft_port": self.raft_port,
            "drained": self.drained,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rack:
        fields = {"name", "site", "capacity", "address", "api_port", "raft_port", "drained"}
        _check_keys("rack", data, fields, {"name", "site", "capacity"})
        kwargs = dict(data)
        kwargs["capacity"] = Capacity.from_dict(data["capacity"])
        return cls(**kwargs)


class ApplianceState(StrEnum):
    """What the placement map wants for an appliance."""

    RUNNING = "running"  # assigned to a primary that should run it
    STOPPED = "stopped"  # stopped by an operator
    WAITING = "waiting"  # wanted, but no rack has room (see reason)


class MovePhase(StrEnum):
    """How far a planned move has come (docs/failover.md#planned-moves)."""

    HANDOVER = "handover"  # the primary is asked to pause and ship its last writes to ``to``
    SYNCED = "synced"  # it did: ``to`` holds ``generation``; the guest stays paused
    SWITCHED = "switched"  # the map runs it on ``to`` under a new epoch; not yet running
    DONE = "done"  # running on ``to``; ``downtime_s`` measured
    ABANDONED = "abandoned"  # given up (``reason``); the appliance stays on ``source``


ACTIVE_MOVE_PHASES = frozenset({MovePhase.HANDOVER, MovePhase.SYNCED})
MAX_MOVE_REASON_LEN = 500


@dataclass(frozen=True)
class Move:
    """A planned move of an appliance from ``source`` to ``to`` (a replica holder).

    ``paused_at`` is the source's wall clock when it paused the guest (a hint:
    racks may have no time source); ``generation`` the last generation the
    source shipped to ``to`` with the guest paused; ``downtime_s`` the time
    from that pause until the guest ran on ``to``.
    """

    source: str
    to: str
    phase: MovePhase = MovePhase.HANDOVER
    reason: str = ""
    generation: int | None = None
    paused_at: float | None = None
    downtime_s: float | None = None

    def __post_init__(self) -> None:
        validate_name("move source rack", self.source)
        validate_name("move target rack", self.to)
        if self.source == self.to:
            raise InvalidInput(f"a move from {self.source} to itself is no move")
        if not isinstance(self.phase, MovePhase):
            raise InvalidInput(f"move: phase must be one of {', '.join(MovePhase)}")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_MOVE_REASON_LEN:
            raise InvalidInput(f"move: reason must be a string of at most {MAX_MOVE_REASON_LEN}")
        if self.generation is not None:
            _int_field("move", "generation", self.generation, 0, 1 << 62)
        for key in ("paused_at", "downtime_s"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"move: {key} must be a number")
            if value != value or value in (float("inf"), float("-inf")) or value < 0:
                raise InvalidInput(f"move: {key} must be a finite number, 0 or more")

    @property
    def active(self) -> bool:
        """True while the source still holds the appliance (handover or synced)."""
        return self.phase in ACTIVE_MOVE_PHASES

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "to": self.to,
            "phase": str(self.phase),
            "reason": self.reason,
            "generation": self.generation,
            "paused_at": self.paused_at,
            "downtime_s": self.downtime_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Move:
        fields = {"source", "to", "phase", "reason", "generation", "paused_at", "downtime_s"}
        _check_keys("move", data, fields, {"source", "to"})
        phase = data.get("phase", "handover")
        if phase not in {str(p) for p in MovePhase}:
            raise InvalidInput(f"move: phase must be one of {', '.join(MovePhase)}")
        kwargs = dict(data)
        kwargs["phase"] = MovePhase(phase)
        return cls(**kwargs)


@dataclass(frozen=True)
class Assignment:
    """Where an appliance runs and where its replicas live, under a fencing epoch.

    ``move`` is the planned move under way (or the last one, finished or
    abandoned, under this epoch); see docs/failover.md#planned-moves.
    """

    appliance: str
    primary: str | None
    replicas: tuple[str, ...] = ()
    epoch: int = 0
    state: ApplianceState = ApplianceState.RUNNING
    reason: str = ""
    move: Move | None = None

    def __post_init__(self) -> None:
        validate_name("appliance", self.appliance)
        if self.move is not None and not isinstance(self.move, Move):
            raise InvalidInput(f"assignment {self.appliance}: move must be a move record")
        if self.primary is not None:
            validate_name("rack", self.primary)
        for r in self.replicas:
            validate_name("rack", r)
        if self.primary is not None and self.primary in self.replicas:
            raise InvalidInput(
                f"appliance {self.appliance}: primary {self.primary} is also a replica"
            )
        if len(set(self.replicas)) != len(self.replicas):
            raise InvalidInput(f"appliance {self.appliance}: replica racks must be distinct")
        _int_field(f"assignment {self.appliance}", "epoch", self.epoch, 0, 1 << 62)

    def holders(self) -> tuple[str, ...]:
        """Every rack that keeps a copy of the disks, primary first."""
        return ((self.primary,) if self.primary else ()) + self.replicas

    @property
    def moving(self) -> bool:
        """True while a planned move is under way (the primary must not resume the guest)."""
        return self.move is not None and self.move.active

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "appliance": self.appliance,
            "primary": self.primary,
            "replicas": list(self.replicas),
            "epoch": self.epoch,
            "state": str(self.state),
            "reason": self.reason,
        }
        if self.move is not None:
            out["move"] = self.move.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Assignment:
        fields = {"appliance", "primary", "replicas", "epoch", "state", "reason", "move"}
        _check_keys("assignment", data, fields, {"appliance", "primary"})
        move = data.get("move")
        return cls(
            appliance=data["appliance"],
            primary=data["primary"],
            replicas=tuple(data.get("replicas", ())),
            epoch=data.get("epoch", 0),
            state=ApplianceState(data.get("state", "running")),
            reason=data.get("reason", ""),
            move=Move.from_dict(move) if move is not None else None,
        )


@dataclass(frozen=True)
class Lease:
    """The last committed lease renewal of a rack.

    ``issued_at`` is the rack's own clock when it sent the renewal (the rack
    counts its lease from it); ``received_at`` is the clock of the leader
    ``leader`` (in Raft term ``term``) when that leader received it. Clocks of
    different racks are not comparable: only ``leader`` may use ``received_at``.
    """

    rack: str
    issued_at: float
    received_at: float
    leader: str = ""
    term: int = 0

    def __post_init__(self) -> None:
        validate_name("rack", self.rack)
        if self.leader:
            validate_name("leader rack", self.leader)
        for key in ("issued_at", "received_at"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"lease {self.rack}: {key} must be a number")
            if value != value or value in (float("inf"), float("-inf")):
                raise InvalidInput(f"lease {self.rack}: {key} must be a finite number")
        _int_field(f"lease {self.rack}", "term", self.term, 0, 1 << 62)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rack": self.rack,
            "issued_at": self.issued_at,
            "received_at": self.received_at,
            "leader": self.leader,
            "term": self.term,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lease:
        fields = {"rack", "issued_at", "received_at", "leader", "term"}
        _check_keys("lease", data, fields, {"rack", "issued_at", "received_at"})
        return cls(**data)


@dataclass(frozen=True)
class ClusterSnapshot:
    """An immutable view of the placement map, read once per control-loop cycle."""

    cluster_id: str
    racks: Mapping[str, Rack] = field(default_factory=dict)
    appliances: Mapping[str, ApplianceSpec] = field(default_factory=dict)
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    revision: int = 0
    # Added for the Raft placement map (meshcloud/core/state.py):
    leases: Mapping[str, Lease] = field(default_factory=dict)
    replica_generations: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    voters: tuple[str, ...] = ()
    # Appliances an operator stopped (their desired state, kept in the map):
    stopped: frozenset[str] = frozenset()
    # Added for power-aware placement (meshcloud/power, docs/power.md):
    power: Mapping[str, RackPower] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, rack in self.racks.items():
            if name != rack.name:
                raise InvalidInput(f"rack key {name!r} does not match rack name {rack.name!r}")
        for name, spec in self.appliances.items():
            if name != spec.name:
                raise InvalidInput(f"appliance key {name!r} does not match {spec.name!r}")
        for name, asg in self.assignments.items():
            if name != asg.appliance:
                raise InvalidInput(f"assignment key {name!r} does not match {asg.appliance!r}")
        for name, lease in self.leases.items():
            if name != lease.rack:
                raise InvalidInput(f"lease key {name!r} does not match rack {lease.rack!r}")
        for name, power in self.power.items():
            if name != power.rack:
                raise InvalidInput(f"power key {name!r} does not match rack {power.rack!r}")

    def assigned_to(self, rack: str) -> tuple[str, ...]:
        """Appliances whose primary is ``rack``, sorted by name."""
        return tuple(
            sorted(
                a.appliance
                for a in self.assignments.values()
                if a.primary == rack and a.state == ApplianceState.RUNNING
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "revision": self.revision,
            "racks": {k: v.to_dict() for k, v in sorted(self.racks.items())},
            "appliances": {k: v.to_dict() for k, v in sorted(self.appliances.items())},
            "assignments": {k: v.to_dict() for k, v in sorted(self.assignments.items())},
            "leases": {k: v.to_dict() for k, v in sorted(self.leases.items())},
            "replica_generations": {
                k: dict(sorted(v.items())) for k, v in sorted(self.replica_generations.items())
            },
            "voters": list(self.voters),
            "stopped": sorted(self.stopped),
            "power": {k: v.to_dict() for k, v in sorted(self.power.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterSnapshot:
        fields = {
            "cluster_id", "revision", "racks", "appliances", "assignments",
            "leases", "replica_generations", "voters", "stopped", "power",
        }  # fmt: skip
        _check_keys("snapshot", data, fields, {"cluster_id"})
        return cls(
            cluster_id=data["cluster_id"],
            revision=data.get("revision", 0),
            racks={k: Rack.from_dict(v) for k, v in data.get("racks", {}).items()},
            appliances={
                k: ApplianceSpec.from_dict(v) for k, v in data.get("appliances", {}).items()
            },
            assignments={
                k: Assignment.from_dict(v) for k, v in data.get("assignments", {}).items()
            },
            leases={k: Lease.from_dict(v) for k, v in data.get("leases", {}).items()},
            replica_generations={
                k: dict(v) for k, v in data.get("replica_generations", {}).items()
            },
            voters=tuple(data.get("voters", ())),
            stopped=frozenset(data.get("stopped", ())),
            power={k: RackPower.from_dict(v) for k, v in data.get("power", {}).items()},
        )
