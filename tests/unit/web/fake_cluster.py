"""An in-memory cluster behind the web API, for console tests without a lab."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from meshcloud.core.errors import NotFound
from meshcloud.core.events import Event, Severity
from meshcloud.core.models import (
    ApplianceSpec,
    ApplianceState,
    Assignment,
    Capacity,
    ClusterSnapshot,
    Move,
    MovePhase,
    Rack,
)
from meshcloud.core.moves import move_command
from meshcloud.web.sse import Broadcaster

# Cheap argon2 parameters: tests hash many passwords.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORDS = {"admin": "admin-password-1", "oper": "operator-pass-1", "view": "viewer-pass-1"}
ROLES = {"admin": "admin", "oper": "operator", "view": "viewer"}
CODES = ["ABCD-EFGH-JKMN", "PQRS-TUVW-XYZ2"]


def write_users(path: Path, must_change: tuple[str, ...] = ()) -> None:
    """A users file in the kit's format: admin, oper, view and two emergency codes."""
    doc = {
        "version": 1,
        "users": [
            {
                "name": name,
                "role": ROLES[name],
                "password_argon2": FAST_HASHER.hash(pw),
                "must_change_password": name in must_change,
            }
            for name, pw in PASSWORDS.items()
        ],
        "emergency_codes": [
            {"id": i + 1, "argon2": FAST_HASHER.hash(c), "used": False} for i, c in enumerate(CODES)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


class MemoryControl:
    """ClusterControl in memory: three racks on two sites, health as the leader sees it."""

    def __init__(self) -> None:
        cap = Capacity(8, 8192, 100)
        # loopback addresses with no API behind them: a rack that talks to its peers
        # (users_sync.py) only ever reaches this machine, and finds nobody
        self.racks = {
            f"rack-{i}": Rack(f"rack-{i}", site, cap, address=f"127.0.0.{10 + i}", api_port=9)
            for i, site in ((1, "north"), (2, "north"), (3, "south"))
        }
        self.appliances: dict[str, ApplianceSpec] = {}
        self.assignments: dict[str, Assignment] = {}
        self.generations: dict[str, dict[str, int]] = {}
        self.lost: set[str] = set()
        self.stopped: set[str] = set()
        self.events: list[Event] = []
        self.bus = Broadcaster()

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            "c0ffee00-1111-2222-3333-444455556666",
            dict(self.racks),
            dict(self.appliances),
            dict(self.assignments),
            len(self.events),
            replica_generations={k: dict(v) for k, v in self.generations.items()},
            stopped=frozenset(self.stopped),
        )

    def health(self) -> dict[str, Any]:
        return {
            "formed": True,
            "racks": {
                name: {
                    "state": "lost" if name in self.lost else "alive",
                    "voter": True,
                    "lease_age_s": 7.5 if name in self.lost else 0.2,
                }
                for name in self.racks
            },
        }

    def leader(self) -> str | None:
        return "rack-1"

    def recent_events(self, limit: int) -> list[Event]:
        return self.events[-limit:]

    def add_event(self, kind: str, message: str, severity: Severity = Severity.INFO) -> None:
        event = Event(len(self.events) + 1, time.time(), "rack-1", kind, message, severity)
        self.events.append(event)
        self.bus.publish("event", event.to_dict())

    def publish(self) -> None:
        from meshcloud.web.api import cluster_document

        self.bus.publish("cluster", cluster_document(self, "rack-1"))

    def place(self, name: str) -> None:
        spec = self.appliances[name]
        alive = [r for r in self.racks if r not in self.lost and not self.racks[r].drained]
        primary = alive[len(self.assignments) % len(alive)]
        replicas = tuple(r for r in alive if r != primary)[: spec.replicas]
        self.assignments[name] = Assignment(name, primary, replicas, 1, reason="placed")
        self.generations[name] = {primary: 12, **{r: 11 for r in replicas}}

    async def put_appliance(self, spec: ApplianceSpec) -> None:
        self.appliances[spec.name] = spec
        self.place(spec.name)
        self.add_event("placement", f"{spec.name} placed on {self.assignments[spec.name].primary}")
        self.publish()

    async def delete_appliance(self, name: str) -> None:
        if name not in self.appliances:
            raise NotFound(f"appliance {name} does not exist")
        del self.appliances[name]
        self.assignments.pop(name, None)
        self.add_event("placement", f"{name} removed")
        self.publish()

    async def set_drained(self, rack: str, drained: bool) -> None:
        if rack not in self.racks:
            raise NotFound(f"rack {rack} does not exist")
        old = self.racks[rack]
        self.racks[rack] = Rack(
            old.name, old.site, old.capacity, old.address, old.api_port, drained=drained
        )
        self.publish()

    async def set_desired(self, name: str, state: str) -> None:
        if name not in self.appliances:
            raise NotFound(f"appliance {name} does not exist")
        asg = self.assignments[name]
        if state == "stopped":
            self.stopped.add(name)
            new_state, said = (
                ApplianceState.STOPPED,
                f"{name} stopped by an operator on {asg.primary}",
            )
        else:
            self.stopped.discard(name)
            new_state, said = ApplianceState.RUNNING, f"{name} started by an operator"
        self.assignments[name] = Assignment(
            name, asg.primary, asg.replicas, asg.epoch, new_state, said, asg.move
        )
        self.add_event("placement", said)
        self.publish()

    async def move_appliance(self, name: str, to: str | None) -> dict[str, Any]:
        """The whole planned move at once: handover, final sync, switch, running there."""
        command = move_command(self.snapshot(), name, to)
        asg = self.assignments[name]
        assert asg.primary is not None
        target = str(command["to"])
        replicas = tuple(sorted((set(asg.replicas) - {target}) | {asg.primary}))
        move = Move(asg.primary, target, MovePhase.DONE, str(command["reason"]), 12,
                    time.time() - 1.2, 1.2)  # fmt: skip
        self.assignments[name] = Assignment(
            name, target, replicas, asg.epoch + 1, reason=f"moved from {asg.primary}", move=move
        )
        self.add_event(
            "move",
            f"moved {name} from {asg.primary} to {target} without losing a write: down 1.20 s",
        )
        self.publish()
        return move.to_dict()

    def lose(self, rack: str) -> None:
        self.lost.add(rack)
        self.add_event("lease", f"{rack} lost: no lease renewal for 7.5 s", Severity.CRITICAL)
        self.publish()

    def recover(self, rack: str) -> None:
        self.lost.discard(rack)
        self.add_event("lease", f"{rack} is back")
        self.publish()

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self.bus.subscribe()
