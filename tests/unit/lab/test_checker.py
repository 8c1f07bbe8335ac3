"""The invariant checker's pure parts: libvirt status files, QEMU command lines, verdicts."""

from __future__ import annotations

from meshcloud.lab.checker import (
    Change,
    Fact,
    Guest,
    InvariantChecker,
    double_runs,
    guest_name,
    parse_domstatus,
    value_at,
)

STATUS = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE.
-->
<domstatus state='paused' reason='user' pid='4242'>
  <domain type='qemu'>
    <metadata>
      <meshcloud:appliance xmlns:meshcloud="https://meshcloud.invalid/xmlns/appliance/1" cluster="c" epoch="7"/>
    </metadata>
  </domain>
</domstatus>
"""


def test_status_file_gives_state_pid_and_epoch() -> None:
    assert parse_domstatus(STATUS) == ("paused", 4242, 7)
    assert parse_domstatus(STATUS.replace("paused", "running")) == ("running", 4242, 7)
    assert parse_domstatus("<domain type='qemu'/>") is None


def test_guest_name_from_qemu_command_line() -> None:
    argv = b"\0".join([b"qemu-system-x86_64", b"-name", b"guest=mc-app1,debug-threads=on", b"-S"])
    assert guest_name(argv) == "app1"
    assert guest_name(b"qemu-system-x86_64\0-name\0guest=other") is None


def test_paused_does_not_count_as_running_and_doubt_does() -> None:
    guests = [
        Guest("r1", "app1", 1, "paused", 1),
        Guest("r2", "app1", 2, "running", 2),
        Guest("r1", "app2", 3, "unknown", None),
        Guest("r3", "app2", 4, "running", 5),
    ]
    assert set(double_runs(guests)) == {"app2"}


def test_the_floor_is_the_best_value_at_or_below_the_reported_generation() -> None:
    facts = [
        Fact("a", "r2", 1, 10, 100, 0.0),
        Fact("a", "r2", 1, 12, 130, 1.0),
        Fact("a", "r3", 1, 14, 150, 1.0),
        Fact("a", "r3", 2, 3, 999, 1.0),  # another epoch's history
    ]
    assert value_at(facts, "a", 1, 12) == 130
    assert value_at(facts, "a", 1, 11) == 100
    assert value_at(facts, "a", 1, 9) == 0


def test_outages_from_the_timeline() -> None:
    checker = InvariantChecker(lambda: {}, None)
    checker.timeline["a"] = [
        Change(10.0, {"r1": 1}),
        Change(20.0, {}, frozenset({"r1"})),
        Change(26.0, {"r2": 2}),
        Change(30.0, {}),
    ]
    assert checker.outages("a", until=35.0) == [(20.0, 26.0), (30.0, 35.0)]
    assert checker.first_running_after("a", 15.0, exclude=["r1"]) == (26.0, "r2")
