"""Wiring of the appliance loops into the daemon: hypervisor, volumes, images, agent, placement.

The daemon calls :func:`run_appliance_loops` once the rack is in its
cluster; it runs until cancelled:

- the leader's :class:`~meshcloud.agent.leader.PlacementLoop` (acts only
  while this rack leads; alive racks from the lease keeper);
- the rack's :class:`~meshcloud.agent.rack.RackAgent`, on the hypervisor
  of ``hypervisor.uri`` (default: an embedded libvirt root in the state
  directory, reached through a short symlink when its path is too long for
  QEMU's sockets). If the hypervisor cannot be opened, the rack says so in
  its events and tries again every ``HYPERVISOR_RETRY_S``; the rest of the
  daemon keeps running.

Disks live in ``<state_dir>/volumes`` in the replication engine's layout;
images in ``<state_dir>/images`` (docs/catalog.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from meshcloud import clock
from meshcloud.agent.executor import ActionExecutor, HostSettings
from meshcloud.agent.hooks import CycleHooks
from meshcloud.agent.images import ImageCatalog
from meshcloud.agent.leader import PlacementLoop
from meshcloud.agent.rack import AgentSettings, RackAgent, short_embed_uri
from meshcloud.agent.volumes import ApplianceVolumes
from meshcloud.config import DaemonConfig
from meshcloud.core.errors import MeshcloudError, ReplicationError
from meshcloud.core.reconcile import RestartPolicy
from meshcloud.raft.store import PlacementStore
from meshcloud.replication.engine import ReplicationEngine

log = logging.getLogger("meshcloud.agent")

HYPERVISOR_RETRY_S = 10.0
# The leader re-places at least this often: a rack counts as lost the moment its
# lease runs out on the leader's clock, and nothing else wakes the loop then.
PLACEMENT_PERIOD_S = 0.2
EventSink = Callable[[str, str, "str | None"], None]


def _no_links(rack: str) -> Any:
    raise ReplicationError(
        f"replication to {rack} is not configured on this rack yet (see docs/replication.md)"
    )


def volume_engine(cfg: DaemonConfig) -> ReplicationEngine:
    """An engine over ``<state_dir>/volumes`` used for its volume layer only (not started)."""
    return ReplicationEngine(cfg.state_dir / "volumes", link_for=_no_links)


def host_settings(cfg: DaemonConfig) -> HostSettings:
    return HostSettings(
        bridge=cfg.network.appliance_bridge,
        console_dir=cfg.state_dir / "console",
        kvm=cfg.hypervisor.kvm,
    )


async def run_appliance_loops(
    cfg: DaemonConfig,
    store: PlacementStore,
    lease: Any,
    on_event: EventSink,
    *,
    engine: ReplicationEngine | None = None,
    hooks: CycleHooks | None = None,
    on_hypervisor: Callable[[Any], None] | None = None,
) -> None:
    """Run the placement loop and the rack agent until cancelled.

    ``lease`` is the daemon's LeaseKeeper (``view()`` for this rack,
    ``alive()`` for the leader), or None to act as if every rack held one.
    ``engine``: the daemon's replication engine if it runs one; otherwise an
    engine is made for the volume layer alone. ``hooks``: the daemon's fencing
    hooks into each agent cycle (watchdog, replication). ``on_hypervisor`` is
    called with the hypervisor adapter once it is open.
    """
    rack = cfg.rack.name
    placement = PlacementLoop(
        rack,
        store,
        alive=(lambda _snap: lease.alive()) if lease is not None else None,
        on_event=on_event,
        period_s=PLACEMENT_PERIOD_S,
    )
    placement_task = asyncio.create_task(placement.run(), name="placement")
    own_engine = engine is None
    volumes_engine = engine if engine is not None else volume_engine(cfg)
    try:
        await _run_agent(cfg, store, lease, on_event, volumes_engine, hooks, on_hypervisor)
    finally:
        placement_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await placement_task
        if own_engine:
            await asyncio.to_thread(volumes_engine.stop)


async def _run_agent(
    cfg: DaemonConfig,
    store: PlacementStore,
    lease: Any,
    on_event: EventSink,
    engine: ReplicationEngine,
    hooks: CycleHooks | None = None,
    on_hypervisor: Callable[[Any], None] | None = None,
) -> None:
    from meshcloud.hypervisor.libvirt_hv import LibvirtHypervisor

    rack = cfg.rack.name
    uri = await asyncio.to_thread(short_embed_uri, cfg.libvirt_uri())
    while True:
        hv = LibvirtHypervisor(uri, label=rack, guest_nice=cfg.hypervisor.guest_nice)
        try:
            await hv.async_open()
        except MeshcloudError as exc:
            message = (
                f"rack {rack} cannot run appliances: {exc}; retrying in {HYPERVISOR_RETRY_S:g} s"
            )
            log.error("%s", message)
            on_event("agent", message, None)
            await asyncio.sleep(HYPERVISOR_RETRY_S)
            continue
        break
    log.info("rack %s runs appliances on %s", rack, uri)
    if on_hypervisor is not None:
        on_hypervisor(hv)
    executor = ActionExecutor(
        hv, ApplianceVolumes(engine), ImageCatalog(cfg.state_dir / "images"), host_settings(cfg)
    )
    agent = RackAgent(
        rack,
        store,
        hv,
        executor,
        settings=AgentSettings(policy=RestartPolicy(fence_grace_s=cfg.timers.fence_grace_s)),
        lease_view=lease.view if lease is not None else None,
        engine=engine,
        on_event=on_event,
        clock=clock.now,
        hooks=hooks,
    )
    try:
        await agent.run()
    finally:
        await hv.async_close()
