"""Cluster membership: from discovery to a running placement-map store.

The decision (wait, found, join) is pure (meshcloud.core.formation); this
module runs it on what discovery has admitted, persists the rack's formation
status, starts the Raft store accordingly, and keeps the status that peers
see (leader, members) up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from meshcloud.aio import wait_event
from meshcloud.config import DaemonConfig
from meshcloud.core.errors import ConfigError, MeshcloudError
from meshcloud.core.formation import (
    NOT_FORMED,
    AlreadyFormed,
    FormationStatus,
    Found,
    Join,
    Member,
)
from meshcloud.discovery import Discovery
from meshcloud.raft.store import PlacementStore
from meshcloud.raft.syncobj_store import RaftSettings, SyncObjStore

log = logging.getLogger("meshcloud.cluster")

FORMATION_FILE = "formation.json"
JOIN_TIMEOUT_S = 15.0
WAIT_TICK_S = 1.0


def load_formation(state_dir: Path) -> FormationStatus:
    """The persisted formation status, or NOT_FORMED on a new rack."""
    path = state_dir / FORMATION_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return NOT_FORMED
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); restore it from a backup") from exc
    try:
        return FormationStatus(
            formed=data["formed"],
            cluster_uuid=data.get("cluster_uuid"),
            leader=data.get("leader"),
            members=tuple(Member(**m) for m in data.get("members", [])),
            founding=tuple(Member(**m) for m in data.get("founding", [])),
        )
    except (KeyError, TypeError, MeshcloudError) as exc:
        raise ConfigError(f"{path}: malformed ({exc}); restore it from a backup") from exc


def save_formation(state_dir: Path, status: FormationStatus) -> None:
    """Persist ``status`` atomically (write, fsync, rename, fsync the directory)."""
    doc = {
        "formed": status.formed,
        "cluster_uuid": status.cluster_uuid,
        "leader": status.leader,
        "members": [m.__dict__ for m in status.members],
        "founding": [m.__dict__ for m in status.founding],
    }
    path = state_dir / FORMATION_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def raft_peers(members: tuple[Member, ...], me: str) -> tuple[str, ...]:
    return tuple(sorted(f"{m.address}:{m.raft_port}" for m in members if m.name != me))


@contextlib.asynccontextmanager
async def stopped_unless_kept(store: SyncObjStore) -> AsyncIterator[None]:
    """Stop ``store`` when the block fails or is cancelled (the daemon stopping meanwhile).

    Nobody else holds the store until ``establish`` returns it; without this a
    rack stopped while it starts its Raft node would leave the node running.
    """
    try:
        yield
    except BaseException:
        await store.stop()
        raise


class Membership:
    """Brings this rack into its cluster and keeps its reported status current."""

    def __init__(self, cfg: DaemonConfig, secret: str, discovery: Discovery) -> None:
        self.cfg = cfg
        self.secret = secret
        self.discovery = discovery
        self.reason = "looking for peers"
        self.founding: tuple[Member, ...] = ()  # the founding voters a Join named

    def _store(
        self,
        *,
        found: bool,
        peers: tuple[str, ...],
        cluster_uuid: str,
        founding: tuple[Member, ...] = (),
    ) -> SyncObjStore:
        """The Raft store; with ``founding`` naming this rack, it starts as a founding voter."""
        me = self.cfg.rack.name
        voter = any(m.name == me for m in founding)
        settings = RaftSettings.from_config(
            self.cfg,
            self.secret,
            peers=raft_peers(founding, me) if voter else peers,
            found=found,
            cluster_id=cluster_uuid,
            founding_voter=voter,
            founding_voters=tuple(m.name for m in founding) if found else (),
        )
        return SyncObjStore(settings)

    async def establish(self) -> PlacementStore:
        """Found, join or rejoin the cluster; return the started store."""
        me = self.cfg.rack.name
        status = self.discovery.status
        if status.formed:
            assert status.cluster_uuid is not None
            self.reason = f"rejoining cluster {status.cluster_uuid[:8]} from saved state"
            log.info(self.reason)
            store = self._store(
                found=False, peers=raft_peers(status.members, me), cluster_uuid=status.cluster_uuid
            )
            async with stopped_unless_kept(store):
                await store.start()
            return store
        changed = asyncio.Event()

        async def watch() -> None:
            async for _peer in self.discovery.updates():
                changed.set()

        watcher = asyncio.create_task(watch(), name="formation-watch")
        try:
            while True:
                changed.clear()
                decision = self.discovery.decide_formation()
                if decision.reason != self.reason:
                    self.reason = decision.reason
                    log.info("formation: %s", decision.reason)
                if isinstance(decision, Found):
                    assert decision.cluster_uuid is not None
                    await asyncio.to_thread(
                        save_formation, self.cfg.state_dir, self.discovery.status
                    )
                    store = self._store(
                        found=True,
                        peers=(),
                        cluster_uuid=decision.cluster_uuid,
                        founding=self.discovery.status.founding,
                    )
                    async with stopped_unless_kept(store):
                        await store.start()
                    return store
                if isinstance(decision, Join):
                    joined = await self._join(decision)
                    if joined is not None:
                        return joined
                elif isinstance(decision, AlreadyFormed):  # formed meanwhile (cannot happen here)
                    return await self.establish()
                await wait_event(changed, WAIT_TICK_S)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _join(self, decision: Join) -> PlacementStore | None:
        me = self.cfg.rack.name
        store = self._store(
            found=False,
            peers=raft_peers(decision.members, me),
            cluster_uuid=decision.cluster_uuid,
            founding=decision.founding,
        )
        self.founding = decision.founding
        async with stopped_unless_kept(store):
            await store.start()
            try:
                await store.wait_for(lambda s: me in s.racks, timeout_s=JOIN_TIMEOUT_S)
            except MeshcloudError as exc:
                log.warning(
                    "joining cluster %s failed (%s); retrying", decision.cluster_uuid[:8], exc
                )
                await store.stop()
                return None
            await self.publish(store, decision.cluster_uuid)
        log.info("joined cluster %s", decision.cluster_uuid[:8])
        return store

    async def publish(self, store: PlacementStore, cluster_uuid: str) -> None:
        """Tell peers (through discovery) who leads and who the members are; persist it."""
        state = store.state()
        members = tuple(
            Member(r.name, r.address, r.raft_port, r.api_port)
            for r in sorted(state.racks.values(), key=lambda r: r.name)
            if r.address and r.raft_port and r.api_port
        )
        if not members:
            return
        leader = store.status().leader  # a hint; may be an address while Raft starts
        status = FormationStatus(
            formed=True,
            cluster_uuid=cluster_uuid,
            leader=leader if leader in state.racks else None,
            members=members,
            # kept for racks of the founding set that join late (see FormationStatus)
            founding=self.discovery.status.founding or self.founding,
        )
        if status != self.discovery.status:
            self.discovery.update_formation(
                True,
                cluster_uuid,
                leader=status.leader,
                members=status.members,
                founding=status.founding,
            )
            await asyncio.to_thread(save_formation, self.cfg.state_dir, status)

    async def publish_loop(self, store: PlacementStore, period_s: float = 1.0) -> None:
        """Keep the reported status current while the daemon runs."""
        cluster_uuid = self.discovery.status.cluster_uuid
        assert cluster_uuid is not None
        while True:
            try:
                await self.publish(store, cluster_uuid)
            except MeshcloudError as exc:
                log.warning("could not publish formation status: %s", exc)
            await asyncio.sleep(period_s)
