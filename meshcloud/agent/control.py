"""The API's view of the cluster (web.control.ClusterControl) on the placement-map store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from meshcloud.agent.lease import LeaseKeeper
from meshcloud.core.errors import NotFound, Unavailable
from meshcloud.core.events import Event
from meshcloud.core.models import ApplianceSpec, ClusterSnapshot
from meshcloud.core.moves import move_command
from meshcloud.core.state import PlacementState
from meshcloud.raft.store import PlacementStore
from meshcloud.web.sse import Broadcaster
from meshcloud.web.tls import PLAIN, PeerTLS, certificate_problem

log = logging.getLogger(__name__)

LEADER_VIEW_TTL_S = 3.0  # older than this, the leader's judgement is not shown


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
        self.replication: Any = None  # the daemon's ReplicationWiring, once it runs
        self.loop_lag: Any = None  # the daemon's LoopLag monitor
        self.drills: Any = None  # the daemon's DrillRunner (meshcloud.agent.drill)
        # The leader's judgement of the racks, fetched by follow_leader() on other racks.
        self._leader_view: tuple[str, float, dict[str, Any]] | None = None
        self._leader_tls_problem: str | None = None  # logged once, not every second

    def attach(self, store: PlacementStore, lease: LeaseKeeper | None = None) -> None:
        """Serve from ``store`` from now on and start publishing its changes."""
        self.store = store
        self.lease = lease
        self._watcher = asyncio.create_task(self._watch(), name="control-watch")

    def attach_replication(self, wiring: Any) -> None:
        """Show the replication engine's lag and metrics (a ReplicationWiring)."""
        self.replication = wiring

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
        judged_by = self.rack if alive is not None else None
        leader_racks: dict[str, Any] = {}
        if alive is None and (seen := self.leader_view()) is not None:
            judged_by, leader_racks = seen  # the leader judges liveness; show its judgement
        racks: dict[str, Any] = {}
        for name in state.racks:
            if alive is not None:
                rack_state = "alive" if name in alive else "lost"
                age = round(silent[name], 3) if name in silent else None
            elif isinstance(theirs := leader_racks.get(name), dict):
                rack_state = str(theirs.get("state", "member"))
                age = theirs.get("lease_age_s")
            else:  # nobody's judgement at hand: just a member
                rack_state, age = "member", None
            racks[name] = {"state": rack_state, "voter": name in state.voters, "lease_age_s": age}
        own = self.lease.expires_in() if self.lease is not None else None
        return {
            "formed": True,
            "store": status.to_dict(),
            "racks": racks,
            "judged_by": judged_by,
            "own_lease_s": round(own, 3) if own is not None else None,
            "replication": self.replication_status(),
        }

    # -- the leader's judgement, on the other racks ------------------------------------

    def leader_view(self, now: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """(leader, racks) as the leader last judged them, if fresh (LEADER_VIEW_TTL_S)."""
        seen = self._leader_view
        if seen is None:
            return None
        leader, at, racks = seen
        if (time.monotonic() if now is None else now) - at > LEADER_VIEW_TTL_S:
            return None
        return leader, racks

    def note_leader_view(self, leader: str, doc: Any, now: float | None = None) -> bool:
        """Keep the racks of the leader's health (its /api/v1/cluster); False if malformed."""
        if not isinstance(doc, dict) or doc.get("judged_by") != leader:
            return False
        racks = doc.get("racks")
        if not isinstance(racks, dict):
            return False
        clean: dict[str, Any] = {}
        for name, entry in racks.items():
            if not isinstance(entry, dict) or entry.get("state") not in ("alive", "lost"):
                return False
            age = entry.get("lease_age_s")
            ok_age = age is None or (isinstance(age, int | float) and not isinstance(age, bool))
            clean[str(name)] = {"state": entry["state"], "lease_age_s": age if ok_age else None}
        self._leader_view = (leader, time.monotonic() if now is None else now, clean)
        return True

    async def follow_leader(
        self, token: str, interval_s: float = 1.0, tls: PeerTLS = PLAIN
    ) -> None:
        """On racks that do not lead, fetch the leader's judgement of the racks every second.

        Only the leader can tell which racks are alive (leases count on its clock), so
        without this a console opened on any other rack could not say which rack is lost.
        ``tls`` says whether racks speak plain HTTP or HTTPS verified with the kit's CA.
        """
        import aiohttp

        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=max(0.5, interval_s * 2))
        async with aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=tls.connector()
        ) as session:
            while True:
                await self._fetch_leader_view(session, tls)
                await asyncio.sleep(interval_s)

    async def _fetch_leader_view(self, session: Any, tls: PeerTLS = PLAIN) -> None:
        import aiohttp

        store, lease = self.store, self.lease
        if store is None or (lease is not None and lease.alive() is not None):
            return  # not in a cluster yet, or this rack leads and judges for itself
        leader = store.status().leader
        rack = store.state().racks.get(leader) if leader else None
        if leader is None or rack is None or not rack.address or not rack.api_port:
            return
        url = tls.base_url(rack.address, rack.api_port) + "/api/v1/cluster"
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    doc = await r.json()
                    self.note_leader_view(
                        leader, doc.get("health") if isinstance(doc, dict) else None
                    )
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            # stale after LEADER_VIEW_TTL_S: the console then shows plain members
            problem = certificate_problem(exc)
            if problem is not None and problem != self._leader_tls_problem:
                log.warning("leader view from %s: %s", leader, problem)
            self._leader_tls_problem = problem
        else:
            self._leader_tls_problem = None

    # -- failover and replication (meshcloud.web.failover_api) ------------------------

    def replication_status(self) -> dict[str, Any]:
        """This rack's engine: whether it ships, whether it is fenced, each replica's lag."""
        wiring = self.replication
        if wiring is None:
            return {"shipping": False, "fenced": None, "lag_s": {}}
        return {
            "shipping": wiring.ships,
            "fenced": wiring.engine.fenced,
            "lag_s": wiring.lags(),
        }

    def diverged(self) -> list[dict[str, Any]]:
        """Copies racks kept aside after failovers, from the map (any rack answers)."""
        state = self._require().state()
        return [c.to_dict() for _key, c in sorted(state.diverged.items())]

    async def discard_diverged(self, rack: str, ident: str) -> dict[str, Any]:
        """Ask ``rack`` to delete a kept-aside copy (it does so when it next runs)."""
        store = self._require()
        if f"{rack}/{ident}" not in store.state().diverged:
            raise NotFound(f"rack {rack} has no diverged copy {ident}")
        await store.propose({"op": "diverged_discard", "rack": rack, "id": ident})
        return store.state().diverged[f"{rack}/{ident}"].to_dict()

    # -- the fire drill (meshcloud.agent.drill, docs/drill.md) ---------------------------

    def _drills(self) -> Any:
        if self.drills is None:
            raise Unavailable(f"this rack has not joined a cluster yet: {self.formation_reason()}")
        return self.drills

    async def start_drill(self, appliance: str | None, restore: bool) -> dict[str, Any]:
        """Check and begin a drill run from this rack; its report so far."""
        report: dict[str, Any] = await self._drills().start(appliance, restore)
        return report

    def drill_status(self, ident: str | None) -> dict[str, Any]:
        """The map's drill and this rack's run ``ident`` (None: its latest)."""
        if self.drills is None:
            return {"current": None, "report": None}
        status: dict[str, Any] = self.drills.status(ident)
        return status

    async def end_drill(self) -> dict[str, Any]:
        """End the map's drill (its cut rack renews again)."""
        ended: dict[str, Any] = await self._drills().end()
        return ended

    def metrics_text(self) -> str:
        """Prometheus text: leases, this rack's replication, kept-aside copies."""
        lines: list[str] = []
        if self.lease is not None:
            own = self.lease.expires_in()
            k = self.lease
            lines += [
                "# HELP meshcloud_lease_remaining_seconds Time left on this rack's own lease.",
                "# TYPE meshcloud_lease_remaining_seconds gauge",
                f"meshcloud_lease_remaining_seconds {max(own, 0.0) if own is not None else 0:.3f}",
                "# HELP meshcloud_lease_commit_seconds Issue-to-commit time of renewals.",
                "# TYPE meshcloud_lease_commit_seconds gauge",
                f'meshcloud_lease_commit_seconds{{which="last"}} {k.last_commit_s or 0:.3f}',
                f'meshcloud_lease_commit_seconds{{which="max"}} {k.max_commit_s:.3f}',
                "# HELP meshcloud_lease_renewals_total Renewals committed / failed.",
                "# TYPE meshcloud_lease_renewals_total counter",
                f'meshcloud_lease_renewals_total{{outcome="committed"}} {k.renewals}',
                f'meshcloud_lease_renewals_total{{outcome="failed"}} {k.failed_renewals}',
                "# HELP meshcloud_lease_lapses_total Times this rack's own lease ran out.",
                "# TYPE meshcloud_lease_lapses_total counter",
                f"meshcloud_lease_lapses_total {k.lapses}",
            ]
        if self.loop_lag is not None:
            lines += [
                "# HELP meshcloud_loop_lag_seconds How late the daemon's event loop ran timers.",
                "# TYPE meshcloud_loop_lag_seconds gauge",
                f'meshcloud_loop_lag_seconds{{which="max"}} {self.loop_lag.max_s:.3f}',
            ]
        if self.store is not None:
            st = self.store.status()
            lines += [
                "# HELP meshcloud_raft_term The Raft term this rack knows.",
                "# TYPE meshcloud_raft_term gauge",
                f"meshcloud_raft_term {st.term}",
            ]
        if self.lease is not None:
            silent = self.lease.silent_for()
            if silent:
                lines += [
                    "# HELP meshcloud_rack_silent_seconds Time since a rack last renewed"
                    " (the leader's view).",
                    "# TYPE meshcloud_rack_silent_seconds gauge",
                ]
                lines += [
                    f'meshcloud_rack_silent_seconds{{rack="{r}"}} {v:.3f}'
                    for r, v in sorted(silent.items())
                ]
        if self.store is not None:
            lines += [
                "# HELP meshcloud_diverged_copies Copies kept aside after failovers.",
                "# TYPE meshcloud_diverged_copies gauge",
                f"meshcloud_diverged_copies {len(self.store.state().diverged)}",
            ]
        text = "\n".join(lines) + "\n" if lines else ""
        if self.replication is not None:
            text += self.replication.metrics_text()
        return text

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

    async def set_desired(self, name: str, state: str) -> None:
        """Keep an operator's ``running`` / ``stopped`` in the map (placement follows it)."""
        store = self._require()
        if name not in store.state().appliances:
            raise NotFound(f"appliance {name} does not exist")
        await store.propose({"op": "appliance_desired", "name": name, "state": state})

    async def move_appliance(self, name: str, to: str | None, reason: str = "") -> dict[str, Any]:
        """Begin a planned move of ``name`` (meshcloud.core.moves.move_command); its record.

        The entry point for operators and for power evacuations that pick their
        own target; the leader finishes the move (docs/failover.md#planned-moves).
        """
        store = self._require()
        await store.propose(move_command(store.snapshot(), name, to, reason))
        move = store.snapshot().assignments[name].move
        if move is None:
            raise Unavailable(f"the move of {name} was committed but is not visible yet; retry")
        return move.to_dict()

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self.bus.subscribe()
