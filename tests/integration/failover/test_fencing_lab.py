"""Self-fencing with the real daemon and the real demo appliance: blip, partition, frozen daemon.

One three-rack lab, one appliance replicated to one other rack, the
invariant checker watching every rack's QEMU every 0.1 s:

1. **blip**: the primary is cut off just long enough to lose its lease: it
   pauses the appliance (and disarms its watchdog), and when the lease comes
   back it resumes it: same QEMU process, same epoch, no reboot;
2. **partition**: the primary is cut off for good: it pauses the appliance
   *before* the majority starts it elsewhere, and destroys it after the grace
   period; after healing, its copy, which holds writes the new primary never
   received, is kept aside, listed (API and events, with size and time span)
   and discarded when an operator asks;
3. **frozen daemon**: the new primary's daemon hangs (SIGSTOP): the fencing
   helper kills its QEMU before the appliance starts elsewhere;
4. **epochs**: every rack refuses volume operations under an older epoch
   (a promotion on the rack, a fence through the replication key).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from meshcloud.lab.api import LabApi
from meshcloud.lab.checker import InvariantChecker
from meshcloud.lab.lab import Lab
from meshcloud.lab.pytest_plugin import MakeLab
from meshcloud.replication.manifest import StaleEpoch
from meshcloud.replication.source import VERB
from meshcloud.replication.store import ReplicaStore
from meshcloud.replication.transport import SshTarget, ssh_argv

from .scenario import (
    BOOT_TIMEOUT_S,
    FAILOVER_TIMEOUT_S,
    LAB_VM,
    PLACE_TIMEOUT_S,
    assignment,
    counter,
    deploy,
    live_racks,
    replicated,
    spec,
    start_lab,
    watch,
)

pytestmark = LAB_VM

WaitFor = Callable[..., Any]
IP = "10.90.0.11"
FENCE_GRACE_S = 10.0  # timers.fence_grace_s default


def _state_on(checker: InvariantChecker, rack: str, since: float) -> list[tuple[float, str]]:
    """When ``rack``'s VM of app1 was seen running / paused / gone, since ``since``."""
    out: list[tuple[float, str]] = []
    for change in checker.timeline.get("app1", []):
        if change.at < since:
            continue
        state = (
            "running" if rack in change.running else "paused" if rack in change.paused else "gone"
        )
        if not out or out[-1][1] != state:
            out.append((change.at, state))
    return out


def _first(states: list[tuple[float, str]], state: str) -> float | None:
    return next((t for t, s in states if s == state), None)


def _primary(api: LabApi, lab: Lab, via: str | None = None) -> tuple[str, int]:
    asg = assignment(api, lab, "app1", via)
    assert asg is not None and asg["primary"]
    return asg["primary"], asg["epoch"]


def test_blip_partition_and_frozen_daemon_fence_before_anyone_restarts(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.1)
    lab, api = start_lab(lab_factory, 3, wait_for)
    deploy(api, lab, spec("app1", IP, replicas=1))
    wait_for(lambda: assignment(api, lab, "app1"), PLACE_TIMEOUT_S, "app1 to be placed")
    checker = watch(lab, api)
    try:
        _scenario(lab, api, checker, wait_for)
    finally:
        checker.stop()
    checker.assert_ok()


def _scenario(lab: Lab, api: LabApi, checker: InvariantChecker, wait_for: WaitFor) -> None:
    primary, epoch = _primary(api, lab)
    wait_for(lambda: counter(lab, primary, IP), BOOT_TIMEOUT_S, "app1 to serve its counter")
    wait_for(lambda: replicated(api, lab, "app1", 2), PLACE_TIMEOUT_S, "app1's replica to report")
    pid = checker_pid(checker, primary)

    # 1. a blip: cut off until it paused, then healed at once: resumed, not restarted
    cut = time.monotonic()
    lab.partition(primary)
    wait_for(lambda: _first(_state_on(checker, primary, cut), "paused"), 10.0, "the pause")
    lab.heal()
    wait_for(
        lambda: _state_on(checker, primary, cut)[-1][1] == "running",
        FAILOVER_TIMEOUT_S,
        f"app1 to resume on {primary}",
    )
    assert _primary(api, lab) == (primary, epoch), "a short blip must not move the appliance"
    assert checker_pid(checker, primary) == pid, "resumed in place, not rebooted"
    fencer_log = (lab.log_dir(primary) / "fencer.log").read_text()
    assert "killed QEMU [" not in fencer_log, "the watchdog killed a paused appliance"
    wait_for(lambda: counter(lab, primary, IP), BOOT_TIMEOUT_S, "app1 to count again")

    # 2. a partition: paused on the cut-off rack before it starts on the majority side
    wait_for(lambda: checker.replicated_now("app1") >= 10, BOOT_TIMEOUT_S, "a replicated value")
    cut = time.monotonic()
    lab.partition(primary)
    started = wait_for(
        lambda: checker.first_running_after("app1", cut, exclude=[primary]),
        FAILOVER_TIMEOUT_S,
        "app1 to start on the majority side",
    )
    states = _state_on(checker, primary, cut)
    paused_at = _first(states, "paused")
    assert paused_at is not None and paused_at < started[0], f"not fenced first: {states}"
    assert _first(states, "running") is None or states[-1][1] != "running"
    print(
        f"partition: paused after {paused_at - cut:.2f} s, restarted after {started[0] - cut:.2f} s"
    )
    wait_for(
        lambda: _state_on(checker, primary, cut)[-1][1] == "gone",
        FENCE_GRACE_S + 30.0,
        f"app1 to be destroyed on {primary} after the grace period",
    )
    old_primary, (new_primary, new_epoch) = primary, _primary(api, lab, via=started[1])
    assert new_epoch > epoch and new_primary == started[1]
    lab.heal()

    def kept() -> dict[str, Any] | None:
        doc = api.get(live_racks(lab)[0], "/api/v1/diverged")
        mine = [c for c in doc["diverged"] if c["rack"] == old_primary]
        return mine[0] if mine else None

    copy = wait_for(kept, PLACE_TIMEOUT_S, f"{old_primary} to keep its diverged writes aside")
    assert copy["appliance"] == "app1" and copy["epoch"] == epoch and copy["bytes"] > 0
    assert copy["first_write_at"] <= copy["last_write_at"] and not copy["discard"]
    events = api.cluster(old_primary)["events"]
    said = [e for e in events if e["kind"] == "diverged" and copy["id"] in e["message"]]
    assert said and any(unit in said[0]["message"] for unit in ("KiB", "MiB")), events[-5:]
    kept_dir = lab.state_dir(old_primary) / "volumes" / ".diverged" / copy["id"]
    assert kept_dir.is_dir()
    api.request(new_primary, "DELETE", f"/api/v1/diverged/{old_primary}/{copy['id']}")
    wait_for(lambda: kept() is None and not kept_dir.exists(), PLACE_TIMEOUT_S, "the discard")

    # 3. a frozen daemon: its watchdog kills QEMU before anyone else starts the appliance
    wait_for(lambda: counter(lab, new_primary, IP), BOOT_TIMEOUT_S, "app1 to serve again")
    cut = time.monotonic()
    lab.freeze(new_primary)
    try:
        restarted = wait_for(
            lambda: checker.first_running_after("app1", cut, exclude=[new_primary]),
            FAILOVER_TIMEOUT_S,
            "app1 to start off the frozen rack",
        )
        states = _state_on(checker, new_primary, cut)
        gone_at = _first(states, "gone")
        assert gone_at is not None and gone_at < restarted[0], f"not killed first: {states}"
        assert "killed QEMU [" in (lab.log_dir(new_primary) / "fencer.log").read_text()
        print(
            f"freeze: killed after {gone_at - cut:.2f} s, restarted after {restarted[0] - cut:.2f} s"
        )
    finally:
        lab.thaw(new_primary)

    # the thawed rack finds its lease gone and its appliance moved: its copy goes aside too
    wait_for(
        lambda: not (lab.state_dir(new_primary) / "volumes" / "app1").exists(),
        PLACE_TIMEOUT_S,
        f"{new_primary} to keep its copy aside after the thaw",
    )

    # 4. an older epoch is refused on every rack: a promotion, and a fence through the key
    latest, latest_epoch = _primary(api, lab)
    for rack in lab.racks():
        store = ReplicaStore(lab.state_dir(rack) / "volumes")
        if not store.volume("app1").exists():
            continue
        with pytest.raises(StaleEpoch):
            store.promote("app1", 1)
        if rack == latest:
            continue
        info = lab.rack(rack)
        target = SshTarget(info.ip, lab.replication_key, lab.known_hosts, user="mcrepl")
        out = lab.exec(None, ssh_argv(target, [VERB, "fence", "app1", "1"]), check=False)
        reply = json.loads(out.stdout.strip().splitlines()[-1])
        assert reply["ok"] is False and reply["error"] == "StaleEpoch", reply
    assert _primary(api, lab) == (latest, latest_epoch)


def checker_pid(checker: InvariantChecker, rack: str) -> int:
    """The pid of app1's QEMU on ``rack`` right now (from a fresh scan)."""
    guests = [g for g in checker.poll_once() if g.appliance == "app1" and g.rack == rack]
    assert len(guests) == 1, guests
    return guests[0].pid
