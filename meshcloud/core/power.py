"""Rack power: the state a rack reports, and what placement makes of it.

A rack reads its power source (a UPS through Network UPS Tools, or a static
"mains" source when it has none; meshcloud/power) and publishes a
:class:`RackPower` through the placement map (``power_report``). This
module turns the map's reports into the two inputs of placement
(:func:`power_inputs`): a preference per rack for new primaries (mains, then
battery with the most runtime) and the racks that must be evacuated (on
battery below their own threshold, or low battery), each with the phrase
that explains why ("on battery, 9 min left"). Pure: no clock, no I/O.
docs/power.md explains the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name

DEFAULT_EVACUATE_BELOW_S = 600.0
# Preferences for primaries (placement's rack_preference: higher is preferred, 0.0 neutral).
MAINS_PREFERENCE = 0.0  # and racks with no report, or whose UPS cannot be read
BATTERY_PREFERENCE = -1.0  # plus up to 1.0 for runtime: more runtime, more preferred
EVACUATING_PREFERENCE = -2.0  # last resort only (placement keeps primaries off them)
RUNTIME_HORIZON_S = 4 * 3600.0  # runtimes beyond this all rank as "long"


class PowerSource(StrEnum):
    """Where a rack's power state comes from."""

    MAINS = "mains"  # no UPS: a static source that always says "on mains"
    NUT = "nut"  # a UPS read through Network UPS Tools (upsd)


MAX_POWER_RUNTIME_S = 10 * 365 * 86400
MAX_POWER_TEXT_LEN = 200
_POWER_STATUS_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ ")


def _optional_number(owner: str, key: str, value: object, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{owner}: {key} must be a number or null, not {type(value).__name__}")
    if not (value == value and low <= value <= high):
        raise InvalidInput(f"{owner}: {key} ({value}) must be between {low:g} and {high:g}")


@dataclass(frozen=True)
class RackPower:
    """A rack's power state as the rack itself reported it (``power_report``).

    ``charge_pct`` and ``runtime_s`` are the UPS's estimates (None when it
    gives none). ``evacuate_below_s`` is the rack's own threshold: on battery
    with less runtime than this (or with low battery) it asks placement to
    move its primaries away. ``updated_at`` is the rack's clock when it read
    the source (a hint: racks' clocks are not comparable). ``status`` is the
    UPS's raw ``ups.status`` flags; ``error`` says why the source could not
    be read: the other fields then hold the last good reading (or mains if
    there was none), and placement keeps deciding on them.
    """

    rack: str
    source: PowerSource = PowerSource.MAINS
    on_battery: bool = False
    low_battery: bool = False
    charge_pct: float | None = None
    runtime_s: float | None = None
    evacuate_below_s: float = 600.0
    updated_at: float = 0.0
    status: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        validate_name("rack", self.rack)
        owner = f"power of {self.rack}"
        if self.source not in (PowerSource.MAINS, PowerSource.NUT):
            raise InvalidInput(f"{owner}: source must be 'mains' or 'nut'")
        for key in ("on_battery", "low_battery"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidInput(f"{owner}: {key} must be true or false")
        _optional_number(owner, "charge_pct", self.charge_pct, 0, 100)
        _optional_number(owner, "runtime_s", self.runtime_s, 0, MAX_POWER_RUNTIME_S)
        _optional_number(owner, "evacuate_below_s", self.evacuate_below_s, 0, MAX_POWER_RUNTIME_S)
        _optional_number(owner, "updated_at", self.updated_at, -(1 << 62), 1 << 62)
        if self.evacuate_below_s is None or self.updated_at is None:
            raise InvalidInput(f"{owner}: evacuate_below_s and updated_at are required")
        if not isinstance(self.status, str) or len(self.status) > 64:
            raise InvalidInput(f"{owner}: status must be a string of at most 64 characters")
        if set(self.status) - _POWER_STATUS_ALLOWED:
            raise InvalidInput(f"{owner}: status may hold only capital letters and spaces")
        if not isinstance(self.error, str) or len(self.error) > MAX_POWER_TEXT_LEN:
            raise InvalidInput(
                f"{owner}: error must be a string of at most {MAX_POWER_TEXT_LEN} characters"
            )
        if not self.error.isprintable():
            raise InvalidInput(f"{owner}: error must be printable text")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rack": self.rack,
            "source": str(self.source),
            "on_battery": self.on_battery,
            "low_battery": self.low_battery,
            "charge_pct": self.charge_pct,
            "runtime_s": self.runtime_s,
            "evacuate_below_s": self.evacuate_below_s,
            "updated_at": self.updated_at,
            "status": self.status,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RackPower:
        fields = {
            "rack", "source", "on_battery", "low_battery", "charge_pct", "runtime_s",
            "evacuate_below_s", "updated_at", "status", "error",
        }  # fmt: skip
        if not isinstance(data, Mapping):
            raise InvalidInput(f"power must be an object, not {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise InvalidInput(f"power: unknown field(s) {', '.join(unknown)}")
        missing = sorted({"rack", "source", "on_battery", "low_battery"} - set(data))
        if missing:
            raise InvalidInput(f"power: missing field(s) {', '.join(missing)}")
        source = data["source"]
        if source not in ("mains", "nut"):
            raise InvalidInput(
                f"power of {data.get('rack')!r:.40}: source must be 'mains' or 'nut'"
            )
        kwargs = dict(data)
        kwargs["source"] = PowerSource(source)
        return cls(**kwargs)


def battery_phrase(power: RackPower) -> str:
    """Why a rack on battery is short of power, e.g. "on battery, 9 min left"."""
    parts = ["on battery"]
    if power.low_battery:
        parts.append("low battery")
    if power.runtime_s is not None:
        minutes = int(power.runtime_s // 60)
        parts.append(f"{minutes} min left" if minutes else f"{int(power.runtime_s)} s left")
    elif power.charge_pct is not None:
        parts.append(f"charge {power.charge_pct:.0f} %")
    return ", ".join(parts)


def must_evacuate(power: RackPower) -> bool:
    """True when the rack is on battery with low battery or less runtime than its threshold."""
    if not power.on_battery:
        return False
    if power.low_battery:
        return True
    return power.runtime_s is not None and power.runtime_s < power.evacuate_below_s


def preference(power: RackPower | None) -> float:
    """The rack's preference for new primaries: mains 0.0 > battery (more runtime first)."""
    if power is None or not power.on_battery:
        return MAINS_PREFERENCE
    if power.runtime_s is not None:
        # Whole minutes: the score moves in steps, so equal racks tie and names break it.
        share = min(power.runtime_s // 60 * 60, RUNTIME_HORIZON_S) / (RUNTIME_HORIZON_S + 60)
    elif power.charge_pct is not None:
        share = power.charge_pct / 101
    else:
        share = 0.0
    base = EVACUATING_PREFERENCE if must_evacuate(power) else BATTERY_PREFERENCE
    return base + share


@dataclass(frozen=True)
class PowerInputs:
    """What placement takes from the racks' power reports."""

    rack_preference: Mapping[str, float]
    evacuating: Mapping[str, str]  # rack -> "r2 on battery, 9 min left"


def power_inputs(power: Mapping[str, RackPower], racks: Any = None) -> PowerInputs:
    """Placement's power inputs from the map's reports (for racks in ``racks`` if given)."""
    prefs: dict[str, float] = {}
    evacuating: dict[str, str] = {}
    for name in sorted(power):
        if racks is not None and name not in racks:
            continue
        report = power[name]
        prefs[name] = preference(report)
        if must_evacuate(report):
            evacuating[name] = f"{name} {battery_phrase(report)}"
    return PowerInputs(prefs, evacuating)
