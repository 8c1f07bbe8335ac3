"""The rack's power reporter: read the source, publish the state through the map.

Every ``poll_s`` the reporter reads the rack's power source and proposes a
``power_report`` when what placement looks at changed (on battery or not,
low battery, the source's error) or the estimate moved enough to matter
(:func:`report_key`: on battery, every 30 s of runtime and every 1 % of
charge; on mains, every 10 min and 10 %), so the map is not rewritten
every poll. While the source cannot be read the report keeps the last good
reading and says why in ``error``. Transitions (on battery, low battery,
asking to be evacuated, back on mains, unreadable) are events with one
sentence each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from meshcloud.core.errors import MeshcloudError
from meshcloud.core.power import RackPower, battery_phrase, must_evacuate
from meshcloud.power.source import PowerReading, PowerSourceAdapter
from meshcloud.raft.store import PlacementStore

log = logging.getLogger("meshcloud.power")

EventSink = Callable[[str, str, "str | None"], None]
PROPOSE_TIMEOUT_S = 2.0


def report_key(power: RackPower | None) -> tuple[Any, ...] | None:
    """What must change before the rack reports again (coarser on mains than on battery)."""
    if power is None:
        return None
    charge, runtime = power.charge_pct, power.runtime_s
    if power.on_battery:
        charge_step: float | None = None if charge is None else round(charge)
        runtime_step: float | None = None if runtime is None else runtime // 30
    else:
        charge_step = None if charge is None else round(charge / 10)
        runtime_step = None if runtime is None else runtime // 600
    return (
        power.source,
        power.on_battery,
        power.low_battery,
        power.status,
        power.error,
        power.evacuate_below_s,
        charge_step,
        runtime_step,
    )


def merge_reading(
    rack: str,
    reading: PowerReading,
    last_good: RackPower | None,
    evacuate_below_s: float,
    now: float,
) -> RackPower:
    """The report for ``reading``: an unreadable source keeps the last good values."""
    if reading.error and last_good is not None:
        return replace(last_good, error=reading.error, updated_at=now)
    return RackPower(
        rack,
        reading.source,
        on_battery=reading.on_battery,
        low_battery=reading.low_battery,
        charge_pct=reading.charge_pct,
        runtime_s=reading.runtime_s,
        evacuate_below_s=evacuate_below_s,
        updated_at=now,
        status=reading.status,
        error=reading.error,
    )


def describe_change(
    rack: str, before: RackPower | None, after: RackPower, source: str
) -> str | None:
    """One sentence when the state placement acts on changed, else None."""
    if after.error and (before is None or not before.error):
        return f"{rack} cannot read its power source ({source}): {after.error}"
    if before is not None and before.error and not after.error:
        prefix = f"{rack} reads its power source again ({source}); "
    else:
        prefix = ""
    was_evacuating = before is not None and must_evacuate(before)
    was_on_battery = before is not None and before.on_battery
    if must_evacuate(after) and not was_evacuating:
        return (
            f"{prefix}{rack} {battery_phrase(after)}: asking for its appliances to move away"
            f" (threshold {after.evacuate_below_s / 60:g} min)"
        )
    if after.on_battery and not was_on_battery:
        return f"{prefix}{rack} {battery_phrase(after)} ({source})"
    if not after.on_battery and was_on_battery:
        return f"{prefix}{rack} back on mains ({source}); it takes new appliances again"
    if before is not None and before.low_battery and not after.low_battery and after.on_battery:
        return f"{prefix}{rack} no longer reports low battery: {battery_phrase(after)}"
    return prefix.rstrip("; ") or None


class PowerReporter:
    """Publishes this rack's power state through the placement map until cancelled."""

    def __init__(
        self,
        rack: str,
        source: PowerSourceAdapter,
        store: PlacementStore,
        *,
        poll_s: float = 5.0,
        evacuate_below_s: float = 600.0,
        on_event: EventSink | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.rack = rack
        self.source = source
        self.store = store
        self.poll_s = poll_s
        self.evacuate_below_s = evacuate_below_s
        self.on_event = on_event
        self.wall_clock = wall_clock
        self.last_good: RackPower | None = None
        self.current: RackPower | None = None  # the latest reading, reported or not
        self.reports = 0

    async def run(self) -> None:
        """Poll and report until cancelled; a failed pass is logged and retried."""
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad pass must not end the loop (nor the daemon)
                log.warning("power report failed: %s", exc)
            await asyncio.sleep(self.poll_s)  # pacing, not synchronisation

    async def poll_once(self) -> bool:
        """Read the source once; propose a report if it matters. True if one committed."""
        reading = await self.source.async_read()
        power = merge_reading(
            self.rack, reading, self.last_good, self.evacuate_below_s, self.wall_clock()
        )
        if not reading.error:
            self.last_good = power
        before = self.current
        self.current = power
        sentence = describe_change(self.rack, before, power, self.source.describe())
        if sentence:
            log.info("power: %s", sentence)
            if self.on_event is not None:
                self.on_event("power", sentence, None)
        published = self.store.snapshot().power.get(self.rack)
        if report_key(published) == report_key(power):
            return False
        try:
            await self.store.propose(
                {"op": "power_report", "power": power.to_dict()}, timeout_s=PROPOSE_TIMEOUT_S
            )
        except MeshcloudError as exc:
            log.warning("power report not committed (%s); retrying in %g s", exc, self.poll_s)
            return False
        self.reports += 1
        return True
