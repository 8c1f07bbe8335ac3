"""The placement-map store: a small interface in front of the consensus engine.

Like Patroni's DCS layer, the rest of meshcloud talks to the replicated
placement map only through :class:`PlacementStore`, so that another proven
engine (etcd, for large deployments) could stand behind it later. The one
implementation today is :class:`meshcloud.raft.syncobj_store.SyncObjStore`
(pysyncobj 0.3.17, hardened).

Contract, for every implementation:

* ``start()`` joins or founds the cluster and returns once the engine runs
  (not once it has a leader); ``stop()`` leaves the local files intact so a
  restarted rack keeps its state.
* ``snapshot()`` / ``state()`` return the latest *applied* map of this rack,
  immutable, without blocking and without I/O; it only moves forward. A rack
  cut off from the leader serves a stale map: decide liveness from leases,
  never from the store's status. After ``propose`` returns, ``state()``
  already includes the command (read your writes).
* ``propose(command)`` sends one command (see meshcloud.core.state) through
  the log and returns the result once it is committed and applied here. It
  raises Unavailable if that does not happen within the timeout (no leader,
  no quorum, leader changed): the command is never queued for later, but a
  command that timed out, or whose leader changed after it was sent, MAY
  still have been committed (as with any consensus system: the message says
  "outcome unknown"; read the map to find out). A rack that cannot reach a
  quorum for longer than the Raft connection timeout (1.5 s) drops what it
  had sent, so such a command does not commit later. It raises InvalidInput,
  Conflict or NotFound when the state machine refuses the command; such a
  command changed nothing.
* ``add_member(rack)`` registers a rack (or updates its address, ports,
  capacity); the map decides whether it votes (at most ``max_voters``,
  spread across sites) or follows. ``remove_member(name)`` removes it; if
  it voted, a follower is promoted. Both go through ``propose``.
* ``status()`` describes the engine for the API and the console: who this
  rack believes leads, the term, commit index, members. It is a hint for
  humans: it lags, and two racks may both believe they lead.
* Nothing blocks the asyncio loop.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from meshcloud.aio import wait_event
from meshcloud.core.errors import Unavailable
from meshcloud.core.models import ClusterSnapshot, Rack
from meshcloud.core.state import PlacementState


@dataclass(frozen=True)
class MemberStatus:
    """One rack of the Raft group as this rack sees it."""

    name: str
    address: str
    voter: bool
    connected: bool


@dataclass(frozen=True)
class StoreStatus:
    """The engine's view from this rack (a hint: it may lag or be wrong)."""

    rack: str
    role: str  # "voter", "follower", "starting" or "stopped"
    leader: str | None  # the rack this rack believes leads, if known
    term: int
    commit_index: int
    last_applied: int
    revision: int
    members: tuple[MemberStatus, ...] = ()
    recovering: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["members"] = [asdict(m) for m in self.members]
        return data


class PlacementStore(ABC):
    """The replicated placement map, as the rest of meshcloud sees it (contract above)."""

    @abstractmethod
    async def start(self) -> None:
        """Start the engine (found, join or rejoin the cluster)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the engine; local state stays on disk."""

    @abstractmethod
    def state(self) -> PlacementState:
        """The latest map applied on this rack (immutable; never goes backwards)."""

    def snapshot(self) -> ClusterSnapshot:
        """The latest map as the ClusterSnapshot the control loops read."""
        return self.state().snapshot()

    @abstractmethod
    async def propose(
        self, command: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Commit one command and return its result; raise Unavailable if it cannot in time."""

    async def add_member(self, rack: Rack) -> dict[str, Any]:
        """Register (or update) a rack; the map decides whether it votes."""
        return await self.propose({"op": "rack_join", "rack": rack.to_dict()})

    async def remove_member(self, name: str) -> dict[str, Any]:
        """Remove a rack; a follower takes its voting seat if it had one."""
        return await self.propose({"op": "rack_remove", "rack": name})

    @abstractmethod
    def status(self) -> StoreStatus:
        """The engine's view from this rack, for the API (a hint only)."""

    @abstractmethod
    def _changed(self) -> asyncio.Event:
        """An event set (and replaced) whenever the applied map changes."""

    async def wait_for(
        self, predicate: Callable[[PlacementState], bool], *, timeout_s: float
    ) -> PlacementState:
        """Wait until the applied map satisfies ``predicate``; raise Unavailable on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            event = self._changed()
            current = self.state()
            if predicate(current):
                return current
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"the placement map did not reach the expected state within {timeout_s} s"
                )
            await wait_event(event, remaining)
