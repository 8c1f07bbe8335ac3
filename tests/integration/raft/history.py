"""A Jepsen-style history of appends, and the checker that judges it.

Clients append unique values through every rack while a nemesis partitions,
heals, kills and restarts racks. Each attempt ends as ``ok`` (the store
reported it committed), ``fail`` (it reported it was not) or ``unknown``
(timed out, or the rack died mid-request). The verdict:

* every rack ends with the same list (one order);
* every ``ok`` value is in it, exactly once;
* no value appears that nobody attempted, and none appears twice;
* a ``fail`` value may appear only if the failure was not definite.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Answers that prove a write was NOT committed (the state machine refused it).
DEFINITE_FAILURES = frozenset({"invalid", "conflict", "not_found", "InvalidInput", "Conflict"})


@dataclass
class Op:
    value: str
    rack: str
    start: float
    end: float = 0.0
    outcome: str = "pending"  # ok | fail | unknown
    error: str = ""


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)

    def acknowledged(self) -> set[str]:
        return {op.value for op in self.ops if op.outcome == "ok"}

    def attempted(self) -> set[str]:
        return {op.value for op in self.ops}

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.outcome] = counts.get(op.outcome, 0) + 1
        return counts


def check(history: History, finals: Mapping[str, Sequence[str]]) -> list[str]:
    """Every violation of the rules above, as sentences; empty when the history is safe."""
    problems = []
    views = {rack: list(values) for rack, values in finals.items()}
    reference_rack, reference = next(iter(views.items()))
    for rack, values in views.items():
        if values != reference:
            problems.append(
                f"{rack} ended with {len(values)} values, {reference_rack} with"
                f" {len(reference)}: the racks disagree on the history"
            )
    seen: dict[str, int] = {}
    for value in reference:
        seen[value] = seen.get(value, 0) + 1
    duplicates = sorted(v for v, n in seen.items() if n > 1)
    if duplicates:
        problems.append(f"values applied twice: {duplicates[:10]}")
    phantoms = sorted(set(reference) - history.attempted())
    if phantoms:
        problems.append(f"values nobody wrote: {phantoms[:10]}")
    lost = sorted(history.acknowledged() - set(reference))
    if lost:
        problems.append(
            f"{len(lost)} acknowledged writes are missing from the final state: {lost[:10]}"
        )
    definite = {
        op.value for op in history.ops if op.outcome == "fail" and op.error in DEFINITE_FAILURES
    }
    resurrected = sorted(definite & set(reference))
    if resurrected:
        problems.append(f"writes refused by the state machine were applied: {resurrected[:10]}")
    return problems


Append = Callable[[str, str], Awaitable[dict[str, Any]]]


async def client(
    history: History,
    rack: str,
    append: Append,
    stop: asyncio.Event,
    prefix: str,
    pause_s: float = 0.01,
) -> None:
    """Append unique values through ``rack`` until ``stop`` is set; record every attempt."""
    seq = 0
    rng = random.Random(prefix)
    while not stop.is_set():
        seq += 1
        op = Op(value=f"{prefix}-{seq}", rack=rack, start=time.monotonic())
        history.ops.append(op)
        try:
            answer = await append(rack, op.value)
        except (OSError, ValueError) as exc:  # the rack is down or died mid-request
            op.outcome, op.error = "unknown", type(exc).__name__
            answer = None
        op.end = time.monotonic()
        if answer is not None:
            if answer.get("ok"):
                op.outcome = "ok"
            else:
                op.error = str(answer.get("error"))
                op.outcome = "fail" if op.error != "timeout" else "unknown"
        if op.outcome != "ok":
            await asyncio.sleep(0.1 + rng.random() * 0.2)  # the rack is unhappy: back off
        else:
            await asyncio.sleep(pause_s)
