"""The API's view of the cluster (web.control.ClusterControl) on the placement-map store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from meshcloud.agent.lease import LeaseKeeper
from meshcloud.core.errors import NotFound, Unavailable
from meshcloud.core.events import Event
from meshcloud.core.models import ApplianceSpec, ClusterSnapshot
from meshcloud.core.state import PlacementState
from meshcloud.raft.store import PlacementStore
from meshcloud.web.sse import Broadcaster


class StoreControl:
    """Implements ClusterControl once the store runs; until then reads say why they cannot."""

    def __init__(self, rack: str, formation_reason: Callable[[], str]) -> None:
        self.rack = rack
        self.store: PlacementStore | None = None
        self.lease: LeaseKeeper | None = None
        self.formation_reason = formation_reason
        self.bus = Broadcaster()
        self.local_events: list[Event] = []
        self._watcher: asyncio.Task[None] | None = None

    def attach(self, store: PlacementStore, lease: LeaseKeeper | None = None) -> None:
        """Serve from ``store`` from now on and start publishing its changes."""
        self.store = store
        self.lease = lease
        self._watcher = asyncio.create_task(self._watch(), name="control-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self.bus.close()

    def _require(self) -> PlacementStore:
        if self.store is None:
            raise Unavailable(f"this rack has not joined a cluster yet: {self.formation_reason()}")
        return self.store

    async def _watch(self) -> None:
        from meshcloud.web.api import cluster_document

        store = self._require()
        last_revision = -1
        while True:
            state = await self._next_state(store, last_revision)
            last_revision = state.revision
            if self.bus.clients:
                self.bus.publish("cluster", cluster_document(self, self.rack))

    async def _next_state(self, store: PlacementStore, last_revision: int) -> PlacementState:
        while True:
            with contextlib.suppress(Unavailable):
                return await store.wait_for(lambda s: s.revision != last_revision, timeout_s=60.0)

    def snapshot(self) -> ClusterSnapshot:
        return self._require().snapshot()

    def health(self) -> dict[str, Any]:
        store = self.store
        if store is None:
            return {"formed": False, "reason": self.formation_reason(), "racks": {}}
        status = store.status()
        state = store.state()
        silent = self.lease.silent_for() if self.lease is not None else {}
        alive = self.lease.alive() if self.lease is not None else None
        racks: dict[str, Any] = {}
        for name in state.racks:
            # only the leader judges liveness; other racks just list members
            rack_state = "member" if alive is None else "alive" if name in alive else "lost"
            racks[name] = {
                "state": rack_state,
                "voter": name in state.voters,
                "lease_age_s": round(silent[name], 3) if name in silent else None,
            }
        own = self.lease.expires_in() if self.lease is not None else None
        return {
            "formed": True,
            "store": status.to_dict(),
            "racks": racks,
            "own_lease_s": round(own, 3) if own is not None else None,
        }

    def leader(self) -> str | None:
        return self.store.status().leader if self.store is not None else None

    def recent_events(self, limit: int) -> list[Event]:
        return self.local_events[-limit:]

    def add_event(self, kind: str, message: str, appliance: str | None = None) -> None:
        event = Event(
            len(self.local_events) + 1, time.time(), self.rack, kind, message, appliance=appliance
        )
        self.local_events.append(event)
        del self.local_events[:-500]
        self.bus.publish("event", event.to_dict())

    async def put_appliance(self, spec: ApplianceSpec) -> None:
        await self._require().propose({"op": "appliance_set", "spec": spec.to_dict()})

    async def delete_appliance(self, name: str) -> None:
        store = self._require()
        if name not in store.state().appliances:
            raise NotFound(f"appliance {name} does not exist")
        await store.propose({"op": "appliance_remove", "name": name})

    async def set_drained(self, rack: str, drained: bool) -> None:
        store = self._require()
        current = store.state().racks.get(rack)
        if current is None:
            raise NotFound(f"rack {rack} is not a member of the cluster")
        doc = current.to_dict()
        doc["drained"] = drained
        await store.propose({"op": "rack_join", "rack": doc})

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self.bus.subscribe()
