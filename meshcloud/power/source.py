"""Power sources: where a rack learns whether it runs on mains or on battery.

:class:`PowerSourceAdapter` is the contract; :class:`MainsSource` stands in
when the rack has no UPS (it always says "mains", like Patroni's do-nothing
watchdog), :class:`NutSource` reads a UPS through upsd. Turning upsd's
variables into a reading (:func:`reading_from_vars`) is pure.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshcloud.core.power import MAX_POWER_RUNTIME_S, PowerSource
from meshcloud.power.nut import NutClient, NutError

if TYPE_CHECKING:
    from meshcloud.config import PowerConfig

_FLAG = re.compile(r"^[A-Z]{1,12}$")
MAX_STATUS_LEN = 64


@dataclass(frozen=True)
class PowerReading:
    """One reading of a power source. ``error`` is set when it could not be read."""

    source: PowerSource
    on_battery: bool = False
    low_battery: bool = False
    charge_pct: float | None = None
    runtime_s: float | None = None
    status: str = ""
    error: str = ""


class PowerSourceAdapter(ABC):
    """A rack's power source.

    ``async_read`` returns the current reading and never raises for a source
    that cannot be read: it returns a reading whose ``error`` says why.
    ``describe`` names the source for events ("UPS ups@127.0.0.1:3493").
    """

    kind: PowerSource

    @abstractmethod
    async def async_read(self) -> PowerReading: ...

    @abstractmethod
    def describe(self) -> str: ...


class MainsSource(PowerSourceAdapter):
    """No UPS: the rack is always on mains."""

    kind = PowerSource.MAINS

    async def async_read(self) -> PowerReading:
        return PowerReading(PowerSource.MAINS)

    def describe(self) -> str:
        return "mains (no UPS configured)"


def _number(vars_: Mapping[str, str], key: str, high: float) -> float | None:
    text = vars_.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, high)


def reading_from_vars(vars_: Mapping[str, str]) -> PowerReading:
    """A reading from upsd's variables: ``ups.status`` flags, ``battery.charge``/``runtime``.

    A missing ``ups.status`` is an error; unparseable numbers count as absent;
    status flags that are not 1-12 capital letters are dropped.
    """
    status = vars_.get("ups.status")
    if status is None:
        return PowerReading(PowerSource.NUT, error="the UPS reports no ups.status")
    flags = [f for f in status.split() if _FLAG.fullmatch(f)]
    while len(" ".join(flags)) > MAX_STATUS_LEN:
        flags.pop()
    return PowerReading(
        PowerSource.NUT,
        on_battery="OB" in flags,
        low_battery="LB" in flags,
        charge_pct=_number(vars_, "battery.charge", 100.0),
        runtime_s=_number(vars_, "battery.runtime", float(MAX_POWER_RUNTIME_S)),
        status=" ".join(flags),
    )


class NutSource(PowerSourceAdapter):
    """A UPS read through Network UPS Tools' upsd."""

    kind = PowerSource.NUT

    def __init__(self, client: NutClient) -> None:
        self.client = client

    async def async_read(self) -> PowerReading:
        try:
            return reading_from_vars(await self.client.async_list_vars())
        except NutError as exc:
            text = "".join(c if c.isprintable() else "?" for c in str(exc))
            return PowerReading(PowerSource.NUT, error=text[:200])

    def describe(self) -> str:
        return f"UPS {self.client.where}"


def source_from_config(power: PowerConfig) -> PowerSourceAdapter:
    """The source ``power.source`` names: MainsSource for ``none``, NutSource for ``nut``."""
    if power.source == "nut":
        client = NutClient(
            power.nut_host, power.nut_port, power.nut_ups, timeout_s=power.nut_timeout_s
        )
        return NutSource(client)
    return MainsSource()
