"""In-memory stand-ins for the agent's unit tests: a placement store and a hypervisor.

The real store (Raft) and the real hypervisor (libvirt) are exercised by the
lab tests in tests/integration/agent/; these fakes keep the loops' own logic
testable in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from meshcloud.core.errors import Conflict, NotFound
from meshcloud.core.models import ApplianceSpec
from meshcloud.core.state import EMPTY, PlacementState, apply, raise_for_result
from meshcloud.hypervisor.base import (
    DomainInfo,
    DomainState,
    EventKind,
    Hypervisor,
    LifecycleEvent,
)
from meshcloud.hypervisor.domain_xml import HostDetails
from meshcloud.raft.store import PlacementStore, StoreStatus


class MemoryStore(PlacementStore):
    """The replicated state machine applied in memory, with a settable leader."""

    def __init__(self, leader: str | None = "r1") -> None:
        self._state = EMPTY
        self._event = asyncio.Event()
        self.leader = leader
        self.proposed: list[dict[str, Any]] = []
        self.fail_next: Exception | None = None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def state(self) -> PlacementState:
        return self._state

    def apply_now(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a command synchronously (test set-up); raise if it is refused."""
        self._state, result = apply(self._state, dict(command))
        event, self._event = self._event, asyncio.Event()
        event.set()
        return dict(raise_for_result(result))

    async def propose(
        self, command: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        self.proposed.append(dict(command))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self.apply_now(command)

    def status(self) -> StoreStatus:
        return StoreStatus("r1", "voter", self.leader, 1, 0, 0, self._state.revision)

    def _changed(self) -> asyncio.Event:
        return self._event


class FakeHypervisor(Hypervisor):
    """Domains in a dict; every call is recorded. ``crash(name)`` kills one as QEMU dying would."""

    def __init__(self) -> None:
        super().__init__()
        self.domains: dict[str, DomainInfo] = {}
        self.hosts: dict[str, HostDetails] = {}
        self.calls: list[tuple[str, str]] = []
        self.stop_gate: asyncio.Event | None = None  # set: a guest that takes its time to stop

    async def async_open(self) -> None:
        pass

    async def async_close(self) -> None:
        pass

    def _set(self, name: str, state: DomainState, event: EventKind, detail: str) -> None:
        self.domains[name] = DomainInfo(name, state, self.domains[name].epoch)
        self._publish(LifecycleEvent(name, event, detail))

    def _get(self, name: str) -> DomainInfo:
        if name not in self.domains:
            raise NotFound(f"appliance {name} is not defined on this rack")
        return self.domains[name]

    async def async_define(self, spec: ApplianceSpec, host: HostDetails) -> None:
        self.calls.append(("define", spec.name))
        old = self.domains.get(spec.name)
        running = old is not None and old.state is not DomainState.SHUTOFF
        # like libvirt: a live domain keeps its epoch until it boots again
        epoch = old.epoch if running and old is not None else host.epoch
        state = old.state if old is not None else DomainState.SHUTOFF
        self.domains[spec.name] = DomainInfo(spec.name, state, epoch)
        self.hosts[spec.name] = host

    async def async_start(self, appliance: str) -> None:
        self.calls.append(("start", appliance))
        dom = self._get(appliance)
        if dom.state is DomainState.RUNNING:
            return
        if dom.state is DomainState.PAUSED:
            raise Conflict(f"{appliance} is paused")
        self.domains[appliance] = DomainInfo(
            appliance, DomainState.RUNNING, self.hosts[appliance].epoch
        )
        self._publish(LifecycleEvent(appliance, EventKind.STARTED, "booted"))

    async def async_pause(self, appliance: str) -> None:
        self.calls.append(("pause", appliance))
        if self._get(appliance).state is DomainState.RUNNING:
            self._set(appliance, DomainState.PAUSED, EventKind.SUSPENDED, "paused")

    async def async_resume(self, appliance: str) -> None:
        self.calls.append(("resume", appliance))
        if self._get(appliance).state is DomainState.PAUSED:
            self._set(appliance, DomainState.RUNNING, EventKind.RESUMED, "unpaused")

    async def async_stop(self, appliance: str, timeout_s: float = 30.0) -> None:
        self.calls.append(("stop", appliance))
        self._get(appliance)
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        if self._get(appliance).state is not DomainState.SHUTOFF:
            self._set(appliance, DomainState.SHUTOFF, EventKind.STOPPED, "shutdown")

    async def async_destroy(self, appliance: str) -> None:
        self.calls.append(("destroy", appliance))
        if self._get(appliance).state is not DomainState.SHUTOFF:
            self._set(appliance, DomainState.SHUTOFF, EventKind.STOPPED, "destroyed")

    async def async_undefine(self, appliance: str) -> None:
        self.calls.append(("undefine", appliance))
        dom = self.domains.get(appliance)
        if dom is None:
            return
        if dom.state is not DomainState.SHUTOFF:
            raise Conflict(f"{appliance} is running")
        del self.domains[appliance]

    async def async_state(self, appliance: str) -> DomainState:
        return self._get(appliance).state

    async def async_list(self) -> dict[str, DomainInfo]:
        return dict(self.domains)

    def crash(self, appliance: str) -> None:
        """QEMU died under the guest."""
        self._set(appliance, DomainState.SHUTOFF, EventKind.STOPPED, "failed")

    def running(self) -> dict[str, int]:
        """``{appliance: epoch}`` of the domains running now."""
        return {n: d.epoch for n, d in self.domains.items() if d.state is DomainState.RUNNING}
