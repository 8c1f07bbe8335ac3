"""Kept-aside copies in the placement map: reported, discarded by an operator, removed."""

from __future__ import annotations

from typing import Any

import pytest

from meshcloud.core.state import EMPTY, DivergedCopy, PlacementState, apply

COPY = DivergedCopy("r1", "app.e1.g12.0", "app", 1, 10, 12, 4096, 1011.0, 1012.5, 1100.0, "why")


def run(state: PlacementState, command: dict[str, Any]) -> tuple[PlacementState, dict[str, Any]]:
    return apply(state, command)


def test_report_discard_remove() -> None:
    s, r = run(EMPTY, {"op": "diverged_report", "record": COPY.to_dict()})
    assert r["ok"] and s.diverged["r1/app.e1.g12.0"] == COPY
    _same, r = run(s, {"op": "diverged_report", "record": COPY.to_dict()})
    assert r == {"ok": True, "changed": False, "revision": s.revision}
    s, r = run(s, {"op": "diverged_discard", "rack": "r1", "id": COPY.id})
    assert r["ok"] and s.diverged[COPY.key].discard
    # the rack re-reporting its copy does not undo the operator's decision
    s, r = run(s, {"op": "diverged_report", "record": COPY.to_dict()})
    assert s.diverged[COPY.key].discard
    s, r = run(s, {"op": "diverged_remove", "rack": "r1", "id": COPY.id})
    assert r["ok"] and s.diverged == {}
    _, r = run(s, {"op": "diverged_discard", "rack": "r1", "id": COPY.id})
    assert r["error"] == "not_found"


def test_records_survive_a_dump_round_trip() -> None:
    s, _ = run(EMPTY, {"op": "diverged_report", "record": COPY.to_dict()})
    assert PlacementState.from_dict(s.to_dict()).diverged == s.diverged
    assert PlacementState.from_dict({}).diverged == {}  # dumps from before the field


@pytest.mark.parametrize(
    "change",
    [
        {"id": "other.e1.g1.0"},  # must name its appliance
        {"id": "app/../x"},
        {"rack": "R 1"},
        {"bytes": -1},
        {"first_write_at": float("nan")},
        {"reason": "x" * 501},
        {"unknown": 1},
    ],
)
def test_bad_records_are_refused(change: dict[str, Any]) -> None:
    record = {**COPY.to_dict(), **change}
    s, r = run(EMPTY, {"op": "diverged_report", "record": record})
    assert not r["ok"] and r["error"] == "invalid" and s is EMPTY
