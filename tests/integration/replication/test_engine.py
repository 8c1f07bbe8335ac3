"""The engine schedules cycles of several appliances, reports lag and metrics, and fences."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshcloud.replication.engine import EngineSettings, ReplicationDuty, ReplicationEngine
from meshcloud.replication.source import ApplianceSource, ReplicaLink
from meshcloud.replication.store import ReplicaStore
from meshcloud.replication.transport import RsyncSettings

from .conftest import Pair, qemu_write, wait_for

pytestmark = pytest.mark.root


def test_engine_replicates_reports_and_fences(pair: Pair, tmp_path: Path) -> None:
    events: list[str] = []
    engine = ReplicationEngine(
        tmp_path / "engine-source",
        link_for=lambda rack: ReplicaLink(rack, pair.link.target, RsyncSettings(compress=False)),
        settings=EngineSettings(interval_s=0.3, merge_interval_s=0.5, workers=2),
        on_event=events.append,
    )
    paths = {
        name: engine.create_volumes(name, {"data": 16 << 20}, epoch=1) for name in ("voip", "tiles")
    }
    qemu_write(paths["voip"]["data"], 0, 4096, 1)
    engine.set_duties(
        {
            "voip": ReplicationDuty("voip", 1, priority=900, replicas=("rack-b",)),
            "tiles": ReplicationDuty("tiles", 1, priority=100, replicas=("rack-b",)),
        }
    )
    engine.start()
    try:

        def acked(name: str) -> int:
            return engine.replica_generations().get(name, {}).get("rack-b", 0)

        wait_for(lambda: acked("voip") >= 3 and acked("tiles") >= 3, 60, "three generations each")
        lags = engine.lags()
        assert set(lags) == {"voip", "tiles"} and all(v["rack-b"] < 30 for v in lags.values())
        text = engine.metrics_text()
        assert 'meshcloud_replication_lag_seconds{appliance="voip",replica="rack-b"}' in text
        assert 'meshcloud_replication_acked_generation{appliance="tiles",replica="rack-b"}' in text
        replica = ReplicaStore(pair.store.root)
        assert replica.held()["voip"][0] >= 3

        engine.fence()
        stopped_at = {n: acked(n) for n in ("voip", "tiles")}
        time.sleep(1.0)  # several intervals: nothing may be shipped while fenced
        assert {n: acked(n) for n in ("voip", "tiles")} == pytest.approx(stopped_at, abs=1)
        assert any("fenced" in e for e in events)
        engine.resume()
        wait_for(lambda: acked("voip") > stopped_at["voip"] + 1, 30, "cycles after resume")
    finally:
        engine.stop()


def test_order_by_priority_when_workers_are_scarce(pair: Pair, tmp_path: Path) -> None:
    engine = ReplicationEngine(
        tmp_path / "prio-source",
        link_for=lambda rack: pair.link,
        settings=EngineSettings(interval_s=100.0, workers=1),
    )
    for name in ("low", "high", "mid"):
        engine.create_volumes(name, {"data": 8 << 20}, epoch=1)
    engine.set_duties(
        {
            "low": ReplicationDuty("low", 1, priority=10, replicas=("rack-b",)),
            "high": ReplicationDuty("high", 1, priority=990, replicas=("rack-b",)),
            "mid": ReplicationDuty("mid", 1, priority=500, replicas=("rack-b",)),
        }
    )
    assert [d.appliance for d in engine._due(time.time())] == ["high", "mid", "low"]
    assert isinstance(engine.source("high"), ApplianceSource)
    engine.stop()
