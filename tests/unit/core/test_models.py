from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import (
    ApplianceSpec,
    Assignment,
    Capacity,
    ClusterSnapshot,
    Rack,
    appliance_mac,
)


def spec(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tile-cache",
        "image": "demo",
        "vcpus": 1,
        "memory_mib": 256,
        "disks": [{"name": "data", "size_gib": 1}],
        "priority": 700,
        "replicas": 2,
        "ports": [{"name": "http", "port": 80}],
    }
    data.update(overrides)
    return data


def test_spec_round_trips() -> None:
    parsed = ApplianceSpec.from_dict(spec())
    assert ApplianceSpec.from_dict(parsed.to_dict()) == parsed
    assert parsed.disk_gib == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": "tile/../cache"}, "appliance name"),
        ({"name": "x' onload='y"}, "appliance name"),
        ({"image": "<img>"}, "image name"),
        ({"vcpus": 0}, "vcpus (0) must be between 1 and 64"),
        ({"vcpus": -2}, "vcpus (-2)"),
        ({"vcpus": "2"}, "vcpus must be an integer"),
        ({"vcpus": True}, "vcpus must be an integer"),
        ({"memory_mib": 10**12}, "memory_mib"),
        ({"priority": 1001}, "priority"),
        ({"replicas": 9}, "replicas"),
        ({"disks": [{"name": "a", "size_gib": 0}]}, "size_gib (0)"),
        ({"disks": [{"name": "a", "size_gib": 1}, {"name": "a", "size_gib": 1}]}, "unique"),
        ({"disks": [{"name": "../a", "size_gib": 1}]}, "disk name"),
        ({"disks": "big"}, "disks must be a list"),
        ({"ports": [{"name": "http", "port": 70000}]}, "port (70000)"),
        ({"ports": [{"name": "http", "port": 80, "protocol": "sctp"}]}, "protocol"),
        ({"ip": "not-an-ip"}, "is not an IP address"),
        ({"ip": "224.0.0.1"}, "unicast IPv4"),
        ({"boot_args": "init=/bin/sh; rm"}, "boot_args may hold only"),
        ({"boot_args": "a" * 300}, "boot_args longer"),
        ({"colour": "red"}, "unknown field(s) colour"),
    ],
)
def test_hostile_specs_are_refused(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidInput) as info:
        ApplianceSpec.from_dict(spec(**overrides))
    assert expected in str(info.value)


def test_missing_required_fields() -> None:
    with pytest.raises(InvalidInput, match="missing field"):
        ApplianceSpec.from_dict({"name": "a"})


def test_mac_is_stable_local_and_distinct() -> None:
    mac = appliance_mac("c1", "voip")
    assert mac == appliance_mac("c1", "voip")
    assert mac != appliance_mac("c1", "voip2")
    assert mac != appliance_mac("c2", "voip")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast


def test_assignment_rules() -> None:
    with pytest.raises(InvalidInput, match="also a replica"):
        Assignment("a", "r1", ("r1",))
    with pytest.raises(InvalidInput, match="distinct"):
        Assignment("a", "r1", ("r2", "r2"))
    assert Assignment("a", "r1", ("r2",)).holders() == ("r1", "r2")


def test_snapshot_round_trips_and_lists_assigned() -> None:
    cap = Capacity(8, 8192, 100)
    snap = ClusterSnapshot(
        cluster_id="c1",
        racks={"r1": Rack("r1", "a", cap), "r2": Rack("r2", "b", cap)},
        appliances={"voip": ApplianceSpec("voip", "demo")},
        assignments={"voip": Assignment("voip", "r1", ("r2",), epoch=3)},
        revision=7,
    )
    assert ClusterSnapshot.from_dict(snap.to_dict()) == snap
    assert snap.assigned_to("r1") == ("voip",)
    assert snap.assigned_to("r2") == ()


@given(
    st.integers(0, 64), st.integers(0, 10**6), st.integers(0, 10**4),
    st.integers(0, 64), st.integers(0, 10**6), st.integers(0, 10**4),
)  # fmt: skip
def test_capacity_fits_matches_minus(v: int, m: int, d: int, nv: int, nm: int, nd: int) -> None:
    have, need = Capacity(v, m, d), Capacity(nv, nm, nd)
    if have.fits(need):
        left = have.minus(need)
        assert min(left.vcpus, left.memory_mib, left.disk_gib) >= 0
    else:
        with pytest.raises(InvalidInput):
            have.minus(need)
