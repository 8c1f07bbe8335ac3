"""Helpers for cluster tests on the lab: probing racks through the API."""

from __future__ import annotations

from typing import Any

from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.lab import Lab


def health_or_none(api: LabApi, rack: str) -> dict[str, Any] | None:
    try:
        return api.health(rack)
    except ApiError:
        return None


def cluster_ids(api: LabApi, racks: list[str]) -> dict[str, str | None]:
    """Each rack's cluster uuid as the API reports it (None: not formed or unreachable)."""
    out: dict[str, str | None] = {}
    for rack in racks:
        try:
            out[rack] = api.cluster(rack)["cluster_id"]
        except ApiError:
            out[rack] = None
    return out


def one_cluster(api: LabApi, racks: list[str]) -> str | None:
    """The cluster uuid if every rack is in the same formed cluster with all of ``racks``."""
    ids = cluster_ids(api, racks)
    if None in ids.values() or len(set(ids.values())) != 1:
        return None
    for rack in racks:
        doc = api.cluster(rack)
        if sorted(doc["racks"]) != sorted(racks):
            return None
    return next(iter(ids.values()))


def try_write(api: LabApi, rack: str, name: str) -> bool:
    """Store a small appliance spec through ``rack``; True if it was acknowledged."""
    try:
        api.put_appliance(rack, {"name": name, "image": "demo", "replicas": 0})
    except ApiError:
        return False
    return True


def appliances(api: LabApi, rack: str) -> set[str]:
    return set(api.cluster(rack)["appliances"])


def leader_of(api: LabApi, racks: list[str]) -> str | None:
    """The leader every reachable rack agrees on, if any."""
    seen = set()
    for rack in racks:
        h = health_or_none(api, rack)
        if h is None:
            continue
        seen.add(h.get("leader"))
    if len(seen) == 1:
        (leader,) = seen
        return leader if isinstance(leader, str) else None
    return None


def alive_racks(lab: Lab) -> list[str]:
    return [r for r in lab.racks() if lab.rack(r).power == "on"]
