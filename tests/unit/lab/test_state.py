import json
from pathlib import Path

import pytest

from meshcloud.lab.state import (
    LabNotUp,
    LabState,
    LabStateError,
    ProcessRecord,
    RackState,
    list_labs,
    load_state,
    locked,
    save_state,
)


def _state(root: Path) -> LabState:
    state = LabState(name="x", root=str(root), bridge_netns="mcl-x-net", shaper_backend="nfqueue",
                     daemon_argv=["d", "{config}"], bootstrap_expect=3)  # fmt: skip
    rack = RackState(name="r1", index=1, site="a", ip="10.77.0.1", netns="mcl-x-r1", port="veth-r1")
    rack.services["sshd"] = ["/usr/sbin/sshd", "-D"]
    rack.processes["sshd"] = ProcessRecord(pid=10, starttime=20, argv=["sshd"], log="/l")
    state.racks["r1"] = rack
    state.partition = [["r1"], ["r2"]]
    return state


def test_state_round_trips(tmp_path: Path) -> None:
    state = _state(tmp_path)
    save_state(state)
    assert load_state(tmp_path, "x") == state
    assert list_labs(tmp_path) == ["x"]
    assert load_state(tmp_path, "nope") is None


def test_damaged_state_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "state.json").write_text("{not json")
    with pytest.raises(LabStateError, match="lab down"):
        load_state(tmp_path, "x")
    (tmp_path / "x" / "state.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(LabStateError, match="version"):
        load_state(tmp_path, "x")


def test_lock_does_not_create_a_lab_by_accident(tmp_path: Path) -> None:
    with pytest.raises(LabNotUp, match="not up"), locked(tmp_path, "ghost"):
        pass
    assert not (tmp_path / "ghost").exists()
    with locked(tmp_path, "ghost", create=True):
        assert (tmp_path / "ghost" / "lock").exists()
