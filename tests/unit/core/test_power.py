"""Rack power reports: validation, the map's power_report op, and placement's power inputs."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import Capacity, ClusterSnapshot, Rack
from meshcloud.core.power import (
    MAINS_PREFERENCE,
    PowerSource,
    RackPower,
    battery_phrase,
    must_evacuate,
    power_inputs,
    preference,
)
from meshcloud.core.state import EMPTY, PlacementState, apply

INIT = {"op": "cluster_init", "cluster_id": "c1", "max_voters": 3, "voters": ["r1"]}


def battery(
    rack: str = "r2",
    runtime_s: float | None = 540.0,
    low: bool = False,
    charge: float | None = 40.0,
    threshold: float = 600.0,
) -> RackPower:
    return RackPower(
        rack,
        PowerSource.NUT,
        on_battery=True,
        low_battery=low,
        charge_pct=charge,
        runtime_s=runtime_s,
        evacuate_below_s=threshold,
        updated_at=100.0,
        status="OB LB" if low else "OB",
    )


def joined(*names: str) -> PlacementState:
    s, _ = apply(EMPTY, INIT)
    for n in names:
        s, r = apply(s, {"op": "rack_join", "rack": Rack(n, "s", Capacity(4, 4096, 50)).to_dict()})
        assert r["ok"]
    return s


# -- the model ----------------------------------------------------------------------------


def test_round_trips_through_json() -> None:
    p = battery(low=True)
    assert RackPower.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert RackPower.from_dict({"rack": "r1", "source": "mains", "on_battery": False,
                                "low_battery": False}) == RackPower("r1")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rack": "R 1"}, "rack"),
        ({"source": "diesel"}, "source"),
        ({"on_battery": "yes"}, "on_battery"),
        ({"charge_pct": 101}, "charge_pct"),
        ({"charge_pct": float("nan")}, "charge_pct"),
        ({"runtime_s": -1}, "runtime_s"),
        ({"runtime_s": True}, "runtime_s"),
        ({"evacuate_below_s": None}, "evacuate_below_s"),
        ({"updated_at": float("inf")}, "updated_at"),
        ({"status": "OB; rm -rf"}, "status"),
        ({"status": "O" * 65}, "status"),
        ({"error": "x" * 201}, "error"),
        ({"error": "bad\nline"}, "printable"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_bad_reports_are_refused_with_the_field_named(change: dict[str, Any], words: str) -> None:
    doc = battery().to_dict() | change
    with pytest.raises(InvalidInput, match=words):
        RackPower.from_dict(doc)


# -- the map --------------------------------------------------------------------------------


def test_power_report_is_stored_validated_and_removed_with_the_rack() -> None:
    s = joined("r1", "r2")
    report = {"op": "power_report", "power": battery().to_dict()}
    s2, r = apply(s, report)
    assert r["ok"] and r["changed"] and s2.revision == s.revision + 1
    assert s2.snapshot().power["r2"] == battery()
    s3, r = apply(s2, report)
    assert r["ok"] and not r["changed"] and s3.revision == s2.revision
    _, r = apply(s2, {"op": "power_report", "power": battery("r9").to_dict()})
    assert r["error"] == "not_found"
    _, r = apply(s2, {"op": "power_report", "power": {"rack": "r2"}})
    assert r["error"] == "invalid" and "missing" in r["message"]
    restored = PlacementState.from_dict(json.loads(json.dumps(s2.to_dict())))
    assert restored == s2 and restored.snapshot() == s2.snapshot()
    s4, _ = apply(s2, {"op": "rack_remove", "rack": "r2"})
    assert "r2" not in s4.power
    snap = s2.snapshot()
    assert ClusterSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap


# -- what placement makes of it -------------------------------------------------------------


@pytest.mark.parametrize(
    ("power", "evacuate", "phrase"),
    [
        (RackPower("r2"), False, ""),
        (battery(runtime_s=3600), False, "on battery, 60 min left"),
        (battery(runtime_s=599), True, "on battery, 9 min left"),
        (battery(runtime_s=42), True, "on battery, 42 s left"),
        (battery(runtime_s=3600, low=True), True, "on battery, low battery, 60 min left"),
        (battery(runtime_s=None, charge=12), False, "on battery, charge 12 %"),
        (battery(runtime_s=100, threshold=0), False, "on battery, 1 min left"),
        # The last good reading holds while the UPS cannot be read.
        (RackPower("r2", PowerSource.NUT, True, True, error="upsd unreachable"), True, ""),
    ],
)
def test_when_a_rack_must_be_evacuated(power: RackPower, evacuate: bool, phrase: str) -> None:
    assert must_evacuate(power) is evacuate
    if phrase:
        assert battery_phrase(power) == phrase


def test_preference_ranks_mains_then_long_runtime_then_short() -> None:
    ranked = [
        RackPower("r1"),
        battery(runtime_s=5 * 3600),
        battery(runtime_s=3600),
        battery(runtime_s=700),
        battery(runtime_s=500),
        battery(runtime_s=60),
        battery(runtime_s=30, low=True),
    ]
    prefs = [preference(p) for p in ranked]
    assert prefs[0] == MAINS_PREFERENCE == preference(None)
    assert all(a >= b for a, b in itertools.pairwise(prefs))
    assert prefs[0] > prefs[1] and prefs[2] > prefs[3] > prefs[4] > prefs[5]
    # An unreadable UPS is no reason to avoid a rack.
    assert preference(RackPower("r2", PowerSource.NUT, error="no reading yet")) == 0.0


def test_power_inputs_name_the_racks_and_why() -> None:
    inputs = power_inputs(
        {"r1": RackPower("r1"), "r2": battery(), "r9": battery("r9")}, racks={"r1", "r2"}
    )
    assert inputs.evacuating == {"r2": "r2 on battery, 9 min left"}
    assert set(inputs.rack_preference) == {"r1", "r2"}
