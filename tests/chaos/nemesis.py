"""The chaos test's nemesis: random faults on a lab, never more than a minority at once.

Faults: ``kill`` (a silent power cut, later ``restart``), ``freeze`` (the
daemon hangs: SIGSTOP, later SIGCONT), ``partition`` (one or two racks cut
off from the rest, later healed), ``degrade`` (a rack's link gets slow and
lossy, later cleared) and ``restart-daemon`` (the daemon is stopped cleanly
while its VMs keep running, then started again). At most ``max_impaired``
racks are impaired (off, frozen, cut off or without a daemon) at any
moment, so a majority of the five racks is always up; link degradation
impairs nobody.

Every impairment is logged with its span, so that the invariant checker can
ask whether a rack's copy could have been promoted (:meth:`available`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

KINDS = ("kill", "freeze", "partition", "degrade", "restart-daemon")
DEGRADED = ("delay=150ms loss=5%", "delay=300ms loss=2%", "delay=80ms loss=10% rate=5mbit")


@dataclass
class Fault:
    kind: str
    racks: tuple[str, ...]
    started: float
    ended: float | None = None
    detail: str = ""


@dataclass
class Nemesis:
    lab: Any
    rng: random.Random
    max_impaired: int = 2
    faults: list[Fault] = field(default_factory=list)
    active: list[Fault] = field(default_factory=list)

    def impaired(self) -> set[str]:
        return {r for f in self.active if f.kind != "degrade" for r in f.racks}

    def available(self, rack: str, at: float, window_s: float = 10.0) -> bool:
        """Whether ``rack`` was unimpaired during the ``window_s`` before ``at``."""
        for f in self.faults:
            if f.kind == "degrade" or rack not in f.racks:
                continue
            end = f.ended if f.ended is not None else float("inf")
            if f.started <= at and end >= at - window_s:
                return False
        return True

    def inject(self) -> Fault | None:
        """Start one random fault that keeps a majority up; None if none fits now."""
        racks = self.lab.racks()
        busy = {r for f in self.active for r in f.racks}
        free = [r for r in racks if r not in busy]
        room = self.max_impaired - len(self.impaired())
        kinds = [k for k in KINDS if k == "degrade" or room > 0]
        if not free or not kinds:
            return None
        kind = self.rng.choice(kinds)
        partitioned = any(f.kind == "partition" for f in self.active)
        if kind == "partition" and partitioned:
            kind = "kill" if room > 0 else "degrade"
        size = 2 if kind == "partition" and room >= 2 and self.rng.random() < 0.3 else 1
        chosen = tuple(sorted(self.rng.sample(free, min(size, len(free)))))
        now = time.monotonic()
        fault = Fault(kind, chosen, now)
        if kind == "kill":
            self.lab.kill(chosen[0])
        elif kind == "freeze":
            self.lab.freeze(chosen[0])
        elif kind == "partition":
            self.lab.partition(",".join(chosen))
        elif kind == "degrade":
            fault.detail = self.rng.choice(DEGRADED)
            self.lab.degrade(chosen[0], fault.detail)
        elif kind == "restart-daemon":
            self.lab.stop_daemon(chosen[0])
        fault.started = min(now, time.monotonic())
        self.faults.append(fault)
        self.active.append(fault)
        return fault

    def repair(self, fault: Fault) -> None:
        rack = fault.racks[0]
        if fault.kind == "kill":
            self.lab.restart(rack, wait=False)
        elif fault.kind == "freeze":
            self.lab.thaw(rack)
        elif fault.kind == "partition":
            self.lab.heal()
        elif fault.kind == "degrade":
            self.lab.degrade(rack, "clear")
        elif fault.kind == "restart-daemon":
            self.lab.start_daemon(rack, wait=False)
        fault.ended = time.monotonic()
        self.active.remove(fault)

    def repair_all(self) -> None:
        for fault in list(self.active):
            self.repair(fault)
