"""The hypervisor contract every rack's agent talks to.

Contract of :class:`Hypervisor` (the libvirt one is the real implementation):

- **Names.** Operations take an appliance name (validated); the hypervisor
  maps it to its own object (libvirt: the domain ``mc-<name>``) and ignores
  objects it does not own.
- **Async, never blocking the loop.** Every ``async_`` method must be awaited
  on the event loop; blocking work runs on the implementation's own thread.
  Operations on one hypervisor are executed one at a time, in call order.
- **Idempotent where it is safe.** ``define`` replaces the definition (for
  a running appliance, from its next boot on); ``start`` of a running, ``pause`` of a paused, ``resume``
  of a running, ``destroy`` / ``stop`` of a stopped appliance, and
  ``undefine`` of an unknown one succeed without doing anything. ``start``
  of a paused appliance raises Conflict: resume it (or destroy it) instead.
- **Fencing.** ``pause`` freezes the guest at once (no more disk writes
  leave it); ``destroy`` kills it at once; ``stop`` asks the guest to power
  off and destroys it if it has not after ``timeout_s``.
- **Errors.** Unknown appliance: NotFound. Anything the hypervisor refuses or
  fails: HypervisorError, whose message says what to do.
- **Events.** :meth:`subscribe` returns a subscription that receives every
  lifecycle event (defined, started, suspended, resumed, stopped, ...) of
  meshcloud's appliances from the moment it is made, in order, on the loop.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from meshcloud.aio import within
from meshcloud.core.models import ApplianceSpec
from meshcloud.hypervisor import qemu_img
from meshcloud.hypervisor.domain_xml import HostDetails


class DomainState(StrEnum):
    """Where an appliance's VM is in its life."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


class EventKind(StrEnum):
    """Lifecycle events, as libvirt reports them."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    OTHER = "other"


@dataclass(frozen=True)
class LifecycleEvent:
    """One lifecycle event of one appliance; ``detail`` refines it (e.g. destroyed)."""

    appliance: str
    kind: EventKind
    detail: str = ""


@dataclass(frozen=True)
class DomainInfo:
    """What the hypervisor knows about one appliance it holds."""

    appliance: str
    state: DomainState
    epoch: int


class EventSubscription:
    """Lifecycle events delivered to the loop; iterate with ``async for``, close when done."""

    def __init__(self, owner: Hypervisor) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[LifecycleEvent] = asyncio.Queue()
        self.closed = False

    def _deliver(self, event: LifecycleEvent) -> None:
        """Called on the loop for each event."""
        if not self.closed:
            self._queue.put_nowait(event)

    async def async_next(self, timeout_s: float | None = None) -> LifecycleEvent:
        """The next event; raises TimeoutError after ``timeout_s``."""
        return await within(self._queue.get(), timeout_s)

    def pending(self) -> list[LifecycleEvent]:
        """Events received and not yet taken, without waiting."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    def close(self) -> None:
        self.closed = True
        self._owner._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[LifecycleEvent]:
        return self

    async def __anext__(self) -> LifecycleEvent:
        if self.closed:
            raise StopAsyncIteration
        return await self._queue.get()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Hypervisor(ABC):
    """Runs appliances on this rack. See the module docstring for the contract."""

    def __init__(self) -> None:
        self._subscriptions: list[EventSubscription] = []

    # lifecycle of the adapter itself
    @abstractmethod
    async def async_open(self) -> None:
        """Connect; must be called (on the loop) before anything else."""

    @abstractmethod
    async def async_close(self) -> None:
        """Disconnect. Running appliances keep running."""

    # appliances
    @abstractmethod
    async def async_define(self, spec: ApplianceSpec, host: HostDetails) -> None:
        """Define (or redefine) the appliance; does not start it."""

    @abstractmethod
    async def async_start(self, appliance: str) -> None:
        """Boot a defined, stopped appliance."""

    @abstractmethod
    async def async_pause(self, appliance: str) -> None:
        """Freeze a running appliance at once."""

    @abstractmethod
    async def async_resume(self, appliance: str) -> None:
        """Let a paused appliance run again."""

    @abstractmethod
    async def async_stop(self, appliance: str, timeout_s: float = 30.0) -> None:
        """Ask the guest to power off; destroy it if it has not after ``timeout_s``."""

    @abstractmethod
    async def async_destroy(self, appliance: str) -> None:
        """Kill the appliance's VM at once (its definition stays)."""

    @abstractmethod
    async def async_undefine(self, appliance: str) -> None:
        """Forget a stopped appliance (destroy it first); its disks are left alone."""

    @abstractmethod
    async def async_state(self, appliance: str) -> DomainState:
        """The appliance's state; NotFound if it is not defined here."""

    @abstractmethod
    async def async_list(self) -> dict[str, DomainInfo]:
        """Every meshcloud appliance defined here, by name."""

    # events
    def subscribe(self) -> EventSubscription:
        """Start receiving lifecycle events (call on the loop)."""
        sub = EventSubscription(self)
        self._subscriptions.append(sub)
        return sub

    def _unsubscribe(self, sub: EventSubscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    def _publish(self, event: LifecycleEvent) -> None:
        """Hand ``event`` to every subscription (on the loop)."""
        for sub in list(self._subscriptions):
            sub._deliver(event)

    # disks: qcow2 files, the same for any QEMU-based hypervisor
    async def async_create_disk(self, path: Path, size_bytes: int) -> None:
        """Create an empty qcow2 disk with 4 KiB clusters."""
        await asyncio.to_thread(qemu_img.run_qemu_img, qemu_img.create_argv(path, size_bytes))

    async def async_create_overlay(self, overlay: Path, base: Path) -> None:
        """Create a qcow2 overlay (4 KiB clusters) on ``base``, named relatively."""
        argv = qemu_img.create_overlay_argv(overlay, base)
        await asyncio.to_thread(qemu_img.run_qemu_img, argv)

    async def __aenter__(self) -> Hypervisor:
        await self.async_open()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.async_close()
