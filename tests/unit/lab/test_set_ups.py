"""Lab.set_ups: every rewrite of ups.dev is one NUT's dummy-ups driver notices.

dummy-ups (NUT 2.8, mode dummy-once) re-reads its ``.dev`` file only when
the file's mtime differs *in whole seconds* from the one it read last. Two
set_ups within one second (on battery, then low battery as soon as the rack
reported it) used to leave the second state unseen for good.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcloud.lab import plan
from meshcloud.lab.lab import Lab, LabError, write_ups_dev
from meshcloud.lab.state import LabState, RackState, save_state


def _seconds(path: Path) -> int:
    """The mtime as dummy-ups compares it (st_mtim.tv_sec)."""
    return path.stat().st_mtime_ns // 1_000_000_000


def _nut_lab(root: Path) -> Lab:
    state = LabState(name="ups", root=str(root), bridge_netns="mcl-ups-net",
                     shaper_backend="nfqueue", daemon_argv=["d", "{config}"],
                     bootstrap_expect=1, nut=True)  # fmt: skip
    state.racks["r1"] = RackState(name="r1", index=1, site="a", ip="10.77.0.1",
                                  netns="mcl-ups-r1", port="veth-r1")  # fmt: skip
    save_state(state)
    lab = Lab("ups", root=root)
    lab.nut_dir("r1").mkdir(parents=True)
    (lab.nut_dir("r1") / "ups.dev").write_text(plan.nut_files()["ups.dev"])
    return lab


def test_back_to_back_set_ups_each_change_the_mtime_second(tmp_path: Path) -> None:
    lab = _nut_lab(tmp_path)
    path = lab.nut_dir("r1") / "ups.dev"
    seen = [_seconds(path)]
    for status, charge, runtime in (("OB DISCHRG", 80, 3600), ("OB DISCHRG LB", 8, 120),
                                    ("OL CHRG", 30, 900)):  # fmt: skip
        lab.set_ups("r1", status, charge, runtime)
        seen.append(_seconds(path))
        assert path.read_text() == plan.ups_dev(status, charge, runtime)
    assert seen == sorted(set(seen)), f"mtime seconds {seen} must strictly increase"
    assert not path.with_suffix(".tmp").exists()


def test_write_ups_dev_uses_the_clock_unless_that_is_not_later(tmp_path: Path) -> None:
    path = tmp_path / "ups.dev"
    write_ups_dev(path, "a\n", now=lambda: 1000.9)
    assert _seconds(path) == 1000
    write_ups_dev(path, "b\n", now=lambda: 1000.95)  # same second: pushed one ahead
    assert _seconds(path) == 1001
    write_ups_dev(path, "c\n", now=lambda: 999.0)  # the clock went back: still ahead
    assert _seconds(path) == 1002
    write_ups_dev(path, "d\n", now=lambda: 2000.5)  # the clock caught up: it wins
    assert (_seconds(path), path.read_text()) == (2000, "d\n")


def test_set_ups_on_a_lab_without_ups_says_how_to_get_one(tmp_path: Path) -> None:
    lab = _nut_lab(tmp_path)
    (lab.nut_dir("r1") / "ups.dev").unlink()
    with pytest.raises(LabError, match="nut=True"):
        lab.set_ups("r1", "OB", 50, 600)
