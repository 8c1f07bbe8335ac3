"""The store's guards and the replicated machine, without a network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshcloud.config import parse_config
from meshcloud.core.errors import ConfigError, InvalidInput
from meshcloud.core.models import Capacity, Rack
from meshcloud.core.state import EMPTY
from meshcloud.raft import machine as machine_module
from meshcloud.raft.machine import PlacementMachine, encode_command
from meshcloud.raft.syncobj_store import (
    RaftSettings,
    SyncObjStore,
    check_secret,
    make_conf,
    raft_password,
)

SECRET = "s" * 40
RACK = Rack("r1", "a", Capacity(4, 4096, 100), address="127.0.0.1", raft_port=7440)


@pytest.mark.parametrize("secret", ["", "   ", "changeme", "secret", "short-secret"])
def test_store_refuses_weak_secrets(secret: str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        check_secret(secret)
    with pytest.raises(ConfigError):
        SyncObjStore(RaftSettings(rack=RACK, state_dir=Path("/tmp/x"), secret=secret))


def test_store_refuses_a_wildcard_or_missing_address() -> None:
    for address, port in (("0.0.0.0", 7440), ("", 7440), ("127.0.0.1", 0)):
        rack = Rack("r1", "a", Capacity(1, 64, 1), address=address, raft_port=port)
        with pytest.raises(ConfigError):
            SyncObjStore(RaftSettings(rack=rack, state_dir=Path("/tmp/x"), secret=SECRET))


def test_raft_password_is_derived_not_the_secret() -> None:
    password = raft_password(SECRET)
    assert SECRET not in password and len(password) == 64
    assert raft_password(SECRET) == password != raft_password(SECRET + "x")


def test_conf_has_the_hardened_settings(tmp_path: Path) -> None:
    settings = RaftSettings(rack=RACK, state_dir=tmp_path, secret=SECRET)
    conf = make_conf(settings, tmp_path / "dump")
    assert conf.password == raft_password(SECRET)
    assert conf.commandsWaitLeader is False
    assert conf.leaderFallbackTimeout == 1.0
    assert (conf.raftMinTimeout, conf.raftMaxTimeout) == (0.2, 0.6)
    assert (conf.appendEntriesPeriod, conf.connectionTimeout) == (0.05, 1.5)
    assert conf.bindAddress == "127.0.0.1:7440"
    assert conf.fullDumpFile == str(tmp_path / "dump")
    conf.validate()


def test_settings_from_the_daemon_config(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "rack": {"name": "r2", "site": "b"},
            "network": {"bind_address": "10.1.0.2", "raft_port": 7441, "api_port": 8441},
            "state_dir": str(tmp_path),
            "cluster": {"max_voters": 3},
        }
    )
    settings = RaftSettings.from_config(cfg, SECRET, peers=("10.1.0.1:7441",))
    assert settings.address == "10.1.0.2:7441"
    assert settings.rack.site == "b" and settings.max_voters == 3
    assert settings.peers == ("10.1.0.1:7441",)


def test_commands_are_size_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_module, "MAX_COMMAND_BYTES", 20)
    with pytest.raises(InvalidInput, match="larger than 20 bytes"):
        encode_command({"op": "append", "key": "h", "value": "x" * 30})


def test_commands_are_validated_and_canonical() -> None:
    text = encode_command({"value": 1, "op": "append", "key": "h"})
    assert text == '{"key":"h","op":"append","value":1}'
    with pytest.raises(InvalidInput):
        encode_command({"op": "append", "key": "h"})
    with pytest.raises(InvalidInput):
        encode_command(
            {"op": "lease_renew", "rack": "r1", "issued_at": float("inf"), "received_at": 1.0}
        )


def test_machine_applies_json_and_round_trips() -> None:
    machine = PlacementMachine()
    seen = []
    machine._on_apply = lambda state, result: seen.append(result)
    result = machine.apply_json(
        encode_command({"op": "append", "key": "h", "value": 7}), _doApply=True
    )
    assert result["ok"] and machine.state.logs["h"] == (7,)
    assert machine.apply_json("not json", _doApply=True)["error"] == "invalid"
    assert len(seen) == 2
    dumped = json.loads(json.dumps(machine._serialize()))
    other = PlacementMachine()
    other._deserialize(dumped)
    assert other.state == machine.state
    other.reset()
    assert other.state == EMPTY
    with pytest.raises(ValueError, match="format"):
        other._deserialize({"format": 99, "state": {}})
