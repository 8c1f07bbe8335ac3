"""Timers are validated together (docs/safety.md)."""

from __future__ import annotations

import pytest

from meshcloud.config import ReplicationConfig, TimersConfig


def test_defaults_are_consistent() -> None:
    t = TimersConfig()
    assert t.lease_s > 3 * t.renew_s and t.pause_ahead_s < t.lease_s - 2 * t.renew_s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pause_ahead_s": 2.5}, "pause_ahead_s"),
        ({"lease_s": 1.4, "renew_s": 0.5}, "renew_s"),
        ({"raft_max_timeout_s": 2.0}, "raft_max_timeout_s"),
        ({"margin_s": 0.2}, "margin_s"),
    ],
)
def test_inconsistent_timers_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimersConfig(**kwargs)


def test_a_replication_key_needs_pinned_host_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="known_hosts"):
        ReplicationConfig(ssh_key=tmp_path / "k")
    with pytest.raises(ValueError, match="user"):
        ReplicationConfig(ssh_user="-oProxyCommand")
