"""Copies left behind by failovers: which are kept aside, demoted, retired or left (pure rules)."""

from __future__ import annotations

import json

import pytest

from meshcloud.agent.divergence import (
    Verdict,
    decide,
    describe,
    discard,
    diverged_on_disk,
    diverged_span,
    needs_check,
    top_has_writes,
)
from meshcloud.agent.replication_wiring import CopyInfo, generation_reports
from meshcloud.core.models import ApplianceSpec, Assignment, ClusterSnapshot
from meshcloud.core.state import DivergedCopy
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import GenerationRecord, Manifest, Role

ASG = Assignment("app", "r2", ("r3",), epoch=2)


def manifest(
    role: Role, generation: int, lineage: tuple[tuple[int, int], ...], epoch: int = 1
) -> Manifest:
    m = mf.new_manifest(
        "app", role, epoch, {"data": 1 << 30}, generation=generation, lineage=lineage
    )
    history = tuple(
        GenerationRecord(g, 1, 1000.0 + g, 1000.5 + g, 4096) for g in range(1, generation + 1)
    )
    from dataclasses import replace

    return replace(m, history=history, active_opened_at=2000.0 if role is Role.PRIMARY else None)


def status(
    generation: int, lineage: list[list[int]], epoch: int = 2, role: str = "primary"
) -> dict:
    return {"role": role, "epoch": epoch, "generation": generation, "lineage": lineage}


@pytest.mark.parametrize(
    ("rack", "asg", "role", "epoch", "live", "expected"),
    [
        ("r1", None, Role.PRIMARY, 1, False, False),  # not in the map: the agent's business
        ("r1", ASG, Role.PRIMARY, 1, True, False),  # a VM of it is live here
        ("r2", ASG, Role.REPLICA, 1, False, False),  # this rack is the primary (promotes)
        ("r1", Assignment("app", None, ("r3",), 2), Role.REPLICA, 1, False, False),  # waiting
        ("r3", ASG, Role.REPLICA, 2, False, False),  # a replica following the current epoch
        ("r3", ASG, Role.REPLICA, 1, False, True),  # a replica of the old epoch
        ("r1", ASG, Role.PRIMARY, 1, False, True),  # the old primary, back
        ("r4", ASG, Role.REPLICA, 2, False, True),  # current epoch but no longer listed
    ],
)
def test_which_copies_are_compared_with_the_primary(
    rack: str, asg: Assignment | None, role: Role, epoch: int, live: bool, expected: bool
) -> None:
    assert needs_check(rack, asg, role, epoch, live) is expected


def test_the_old_primarys_unshipped_generations_are_kept_aside() -> None:
    old = manifest(Role.PRIMARY, 12, ((1, 1),))
    # r2 was promoted from generation 10 and has made 11-13 under epoch 2
    d = decide("r1", ASG, old, status(13, [[1, 1], [2, 11]]), active_written=False)
    assert d.verdict is Verdict.KEEP_ASIDE and d.common_generation == 10
    assert "11-12" in d.reason


def test_writes_in_the_old_primarys_active_overlay_are_kept_aside() -> None:
    old = manifest(Role.PRIMARY, 10, ((1, 1),))
    d = decide("r1", ASG, old, status(10, [[1, 1]]), active_written=True)
    assert d.verdict is Verdict.KEEP_ASIDE and d.common_generation == 10
    clean = decide("r1", ASG, old, status(10, [[1, 1]]), active_written=False)
    assert clean.verdict is Verdict.DEMOTE  # a planned move: nothing written after the sync


def test_a_replica_ahead_of_the_promoted_one_diverged() -> None:
    replica = manifest(Role.REPLICA, 11, ((1, 1),))
    d = decide("r3", ASG, replica, status(10, [[1, 1]]), active_written=False)
    assert d.verdict is Verdict.KEEP_ASIDE and d.common_generation == 10


def test_a_replica_behind_stays_when_listed_and_is_retired_otherwise() -> None:
    replica = manifest(Role.REPLICA, 8, ((1, 1),))
    st = status(13, [[1, 1], [2, 11]])
    assert decide("r3", ASG, replica, st, active_written=False).verdict is Verdict.LEAVE
    assert decide("r4", ASG, replica, st, active_written=False).verdict is Verdict.RETIRE


def test_nothing_is_decided_before_the_new_primary_took_over() -> None:
    old = manifest(Role.PRIMARY, 12, ((1, 1),))
    not_yet = status(10, [[1, 1]], epoch=1, role="replica")
    assert decide("r1", ASG, old, not_yet, active_written=True).verdict is Verdict.LEAVE


def test_the_time_span_covers_generations_after_the_common_one_and_the_active_overlay() -> None:
    old = manifest(Role.PRIMARY, 12, ((1, 1),))
    assert diverged_span(old, 10, None, 5000.0) == (1011.0, 1012.5)
    assert diverged_span(old, 10, 2100.0, 5000.0) == (1011.0, 2100.0)
    assert diverged_span(old, 12, 2100.0, 5000.0) == (2000.0, 2100.0)
    assert diverged_span(old, 12, None, 5000.0) == (5000.0, 5000.0)


def test_top_has_writes_reads_qemu_img_map() -> None:
    empty = '[{"start": 0, "length": 8192, "depth": 1, "present": true, "data": true}]'
    written = empty[:-1] + ', {"start": 1048576, "length": 4096, "depth": 0, "present": true}]'
    assert not top_has_writes(empty)
    assert top_has_writes(written)
    assert top_has_writes("garbage")  # cannot tell: keep it aside


def test_records_on_disk_and_discard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = DivergedCopy("r1", "app.e1.g12.0", "app", 1, 10, 12, 4096, 1011.0, 1012.5, 1100.0)
    d = tmp_path / ".diverged" / copy.id
    d.mkdir(parents=True)
    (d / "diverged.json").write_text(json.dumps(copy.to_dict()))
    assert diverged_on_disk(tmp_path) == {copy.id: copy}
    assert "generations 11-12" in describe(copy, "r2")
    with pytest.raises(ValueError):
        discard(tmp_path, "../app")
    assert discard(tmp_path, copy.id) and not d.exists()
    assert not discard(tmp_path, copy.id)


def test_generation_reports_only_for_listed_replicas_on_the_current_epoch() -> None:
    snap = ClusterSnapshot(
        cluster_id="c",
        appliances={"app": ApplianceSpec("app", "demo")},
        assignments={"app": ASG},
        replica_generations={"app": {"r3": 5}},
    )
    copies = {"app": CopyInfo(Role.REPLICA, 2, 7)}
    assert generation_reports("r3", snap, copies) == [
        {"op": "replica_report", "appliance": "app", "rack": "r3", "generation": 7}
    ]
    assert generation_reports("r3", snap, {"app": CopyInfo(Role.REPLICA, 2, 5)}) == []  # known
    assert generation_reports("r3", snap, {"app": CopyInfo(Role.REPLICA, 1, 9)}) == []  # old epoch
    assert generation_reports("r1", snap, {"app": CopyInfo(Role.PRIMARY, 1, 9)}) == []  # not listed
    assert generation_reports("r2", snap, {"app": CopyInfo(Role.PRIMARY, 2, 9)}) == []  # primary


def test_the_rack_installs_the_replication_key_with_its_forced_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from meshcloud.agent.replication_wiring import control_dir, install_authorized_keys
    from meshcloud.config import parse_config

    key = tmp_path / "replication_ed25519"
    key.write_text("private")
    key.with_name(key.name + ".pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7t test\n")
    cfg = parse_config(
        {
            "rack": {"name": "r1"},
            "state_dir": str(tmp_path / "state"),
            "replication": {"ssh_key": str(key), "known_hosts": str(tmp_path / "kh")},
        }
    )
    path = install_authorized_keys(cfg, python=Path("/usr/bin/python3"))
    assert path == tmp_path / "state" / "ssh" / "authorized_keys"
    line = path.read_text()
    conf = path.with_name("rsyncd.conf")
    assert line.startswith('command="case $SSH_ORIGINAL_COMMAND in ')
    assert f"--daemon --config={conf} . ;;" in line
    assert "exec /usr/bin/python3 -m meshcloud.replication.serve " in line
    assert ",restrict " in line and line.rstrip().endswith("test")
    assert f"path = {tmp_path}/state/volumes/.incoming" in conf.read_text()
    assert (path.stat().st_mode & 0o777) == 0o600 and (conf.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "state" / "volumes" / ".incoming").is_dir()
    # racks sharing a host (the lab) get different connection-master directories
    a, b = control_dir(tmp_path / "a"), control_dir(tmp_path / "b")
    assert a != b and len(str(a)) <= 60
