"""The power reporter: what it publishes through the map, when, and what it says."""

from __future__ import annotations

import pytest

from meshcloud.config import parse_config
from meshcloud.core.errors import ConfigError, Unavailable
from meshcloud.core.models import Capacity, Rack
from meshcloud.core.power import PowerSource, RackPower
from meshcloud.power.reporter import PowerReporter, describe_change, report_key
from meshcloud.power.source import (
    MainsSource,
    NutSource,
    PowerReading,
    PowerSourceAdapter,
    source_from_config,
)
from tests.unit.agent.fakes import MemoryStore


class ScriptedSource(PowerSourceAdapter):
    """Readings set by the test (the real sources are tested against a fake upsd and NUT)."""

    kind = PowerSource.NUT

    def __init__(self) -> None:
        self.reading = PowerReading(PowerSource.NUT, status="OL")

    async def async_read(self) -> PowerReading:
        return self.reading

    def describe(self) -> str:
        return "UPS ups@127.0.0.1:3493"


def store_with_rack() -> MemoryStore:
    store = MemoryStore()
    store.apply_now({"op": "cluster_init", "cluster_id": "c1", "max_voters": 1, "voters": ["r2"]})
    store.apply_now({"op": "rack_join", "rack": Rack("r2", "s", Capacity(4, 4096, 50)).to_dict()})
    return store


def reporter(store: MemoryStore, source: PowerSourceAdapter) -> tuple[PowerReporter, list[str]]:
    events: list[str] = []
    clock = iter(float(i) for i in range(1000))
    rep = PowerReporter(
        "r2",
        source,
        store,
        poll_s=1.0,
        evacuate_below_s=600.0,
        on_event=lambda kind, msg, app: events.append(msg),
        wall_clock=lambda: next(clock),
    )
    return rep, events


async def test_a_rack_without_ups_reports_mains_once() -> None:
    store = store_with_rack()
    rep, events = reporter(store, MainsSource())
    assert await rep.poll_once()
    assert not await rep.poll_once()
    power = store.snapshot().power["r2"]
    assert (power.source, power.on_battery) == (PowerSource.MAINS, False)
    assert events == []


async def test_battery_low_battery_and_mains_again() -> None:
    store = store_with_rack()
    source = ScriptedSource()
    rep, events = reporter(store, source)
    assert await rep.poll_once()
    source.reading = PowerReading(PowerSource.NUT, True, False, 80.0, 3600.0, "OB DISCHRG")
    assert await rep.poll_once()
    assert events[-1] == "r2 on battery, 60 min left (UPS ups@127.0.0.1:3493)"
    # A few seconds more or less runtime: not worth a map write.
    source.reading = PowerReading(PowerSource.NUT, True, False, 80.0, 3615.0, "OB DISCHRG")
    assert not await rep.poll_once()
    source.reading = PowerReading(PowerSource.NUT, True, True, 10.0, 3500.0, "OB DISCHRG LB")
    assert await rep.poll_once()
    assert events[-1].startswith("r2 on battery, low battery, 58 min left: asking for its")
    power = store.snapshot().power["r2"]
    assert (power.low_battery, power.status, power.evacuate_below_s) == (True, "OB DISCHRG LB", 600)
    # The UPS cannot be read: the last good reading stands, with the reason.
    source.reading = PowerReading(PowerSource.NUT, error="upsd did not answer within 3 s")
    assert await rep.poll_once()
    power = store.snapshot().power["r2"]
    assert power.low_battery and power.error == "upsd did not answer within 3 s"
    assert events[-1].startswith("r2 cannot read its power source")
    source.reading = PowerReading(PowerSource.NUT, False, False, 12.0, 3000.0, "OL CHRG")
    assert await rep.poll_once()
    assert "back on mains" in events[-1] and "reads its power source again" in events[-1]
    assert not store.snapshot().power["r2"].on_battery


async def test_a_refused_report_is_retried_next_poll() -> None:
    store = store_with_rack()
    rep, _ = reporter(store, MainsSource())
    store.fail_next = Unavailable("no leader")
    assert not await rep.poll_once()
    assert await rep.poll_once()


def test_report_key_is_coarse_on_mains_and_fine_on_battery() -> None:
    mains = RackPower("r2", PowerSource.NUT, charge_pct=91.0, runtime_s=4000.0)
    assert report_key(mains) == report_key(RackPower("r2", PowerSource.NUT, charge_pct=94.0,
                                                     runtime_s=4100.0))  # fmt: skip
    ob = RackPower("r2", PowerSource.NUT, True, charge_pct=91.0, runtime_s=4000.0)
    assert report_key(ob) != report_key(RackPower("r2", PowerSource.NUT, True, charge_pct=90.0,
                                                  runtime_s=4000.0))  # fmt: skip
    assert describe_change("r2", ob, ob, "x") is None


def test_config_picks_the_source() -> None:
    base = {"rack": {"name": "r2"}}
    assert isinstance(source_from_config(parse_config(base).power), MainsSource)
    cfg = parse_config(base | {"power": {"source": "nut", "nut_ups": "rack-ups", "nut_port": 3494}})
    source = source_from_config(cfg.power)
    assert isinstance(source, NutSource) and source.describe() == "UPS rack-ups@127.0.0.1:3494"
    for bad, words in [
        ({"source": "diesel"}, "none or nut"),
        ({"nut_host": "ups.local"}, "not an IP"),
        ({"nut_ups": "-x"}, "UPS name"),
        ({"poll_s": 0}, "poll_s"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config(base | {"power": bad})
