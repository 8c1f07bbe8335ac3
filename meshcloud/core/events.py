"""Events: the one-sentence reasons the control loops give, as data."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Event:
    """Something the cluster did or saw, explained in one sentence.

    ``at`` is the proposer's wall-clock time in seconds since the epoch (racks
    may have no time source, so treat it as a hint); ``seq`` orders events.
    """

    seq: int
    at: float
    rack: str
    kind: str
    message: str
    severity: Severity = Severity.INFO
    appliance: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "rack": self.rack,
            "kind": self.kind,
            "message": self.message,
            "severity": str(self.severity),
            "appliance": self.appliance,
        }
