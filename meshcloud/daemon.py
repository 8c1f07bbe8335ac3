"""The rack daemon: one asyncio program that runs every part of a rack."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshcloud.agent.cluster import Membership, load_formation
from meshcloud.agent.control import StoreControl
from meshcloud.agent.fencing import LoopLag, RackHooks, WatchdogGate
from meshcloud.agent.lease import LeaseKeeper
from meshcloud.agent.watchdog import Watchdog, keep_ticking, make_watchdog
from meshcloud.aio import dump_tasks
from meshcloud.config import DaemonConfig
from meshcloud.core.leases import LeaseTimers
from meshcloud.discovery import Discovery
from meshcloud.power.reporter import PowerReporter
from meshcloud.power.source import source_from_config
from meshcloud.raft.store import PlacementStore
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.tls import peer_tls, tls_context
from meshcloud.web.users import UserStore

if TYPE_CHECKING:
    from meshcloud.agent.drill import DrillWatcher
    from meshcloud.agent.replication_wiring import ReplicationWiring

log = logging.getLogger("meshcloud.daemon")


RACK_RUNTIME_MODULES = (
    "meshcloud.agent.replication_wiring",
    "meshcloud.agent.runtime",
    "meshcloud.agent.divergence",
    "meshcloud.agent.drill",
)


def _load_rack_runtime() -> None:
    """Import what a rack needs once it is in its cluster (see Daemon._join_cluster)."""
    for name in RACK_RUNTIME_MODULES:
        importlib.import_module(name)


class Daemon:
    """Starts the rack's parts in order and stops them in reverse."""

    def __init__(self, cfg: DaemonConfig, secret: str) -> None:
        self.cfg = cfg
        self.secret = secret
        self.stopping = asyncio.Event()
        self.peer_tls = peer_tls(cfg.console)  # how this rack calls the others
        self.store: PlacementStore | None = None
        self.lease: LeaseKeeper | None = None
        self.discovery = Discovery.from_config(
            cfg, secret, load_formation(cfg.state_dir), tls=self.peer_tls
        )
        self.membership = Membership(cfg, secret, self.discovery)
        self.control = StoreControl(cfg.rack.name, lambda: self.membership.reason)
        self.web_context = WebContext(
            rack=cfg.rack.name,
            site=cfg.rack.site,
            api_token=api_token(secret),
            control=self.control,
            status=self.status,
            users=UserStore(cfg.users_path(), seed=cfg.console.kit_users_file),
            session_idle_s=cfg.console.session_idle_s,
            audit=self.control.add_event,
            failover=self.control,
            peer_tls=self.peer_tls,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._tasks_stopped = False
        w = cfg.watchdog
        self.watchdog: Watchdog = make_watchdog(w.mode, w.socket, w.device)
        self.gate = WatchdogGate(self.watchdog, self._lease_expiry)
        self.wiring: ReplicationWiring | None = None
        self.drill: DrillWatcher | None = None

    def status(self) -> dict[str, Any]:
        """What /api/v1/health adds: formation progress and the store's view (hints)."""
        doc: dict[str, Any] = {
            "formed": self.discovery.status.formed,
            "formation": self.membership.reason,
            "peers": sorted(self.discovery.peers),
        }
        if self.store is not None:
            st = self.store.status()
            doc.update(leader=st.leader, role=st.role, revision=st.revision)
        return doc

    async def _start_web(self, stack: AsyncExitStack) -> None:
        app = create_app(self.web_context)
        self.discovery.add_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        net = self.cfg.network
        tls = tls_context(self.cfg.console.tls_cert, self.cfg.console.tls_key)
        site = web.TCPSite(
            runner, net.bind_address, net.api_port, reuse_address=True, ssl_context=tls
        )
        await site.start()
        scheme = "https" if tls is not None else "http"
        log.info("API and console at %s://%s:%d/", scheme, net.bind_address, net.api_port)

    def _lease_expiry(self) -> float | None:
        if self.lease is None:
            return None
        return self.lease.own.expires_at(self.lease.timers.lease_s)

    async def _join_cluster(self) -> None:
        store = await self.membership.establish()
        self.store = store
        t = self.cfg.timers
        self.lease = LeaseKeeper(
            self.cfg.rack.name,
            store,
            LeaseTimers(t.renew_s, t.lease_s, t.margin_s),
            on_extended=self.gate.lease_extended,
            fence_ahead_s=t.pause_ahead_s,
        )
        self._spawn(self.lease.run(), "lease")
        # The API serves the map from now on, before the rest of the rack loads.
        self.control.attach(store, self.lease)
        # Imported once the rack is in the cluster: replication and the hypervisor are
        # not needed to form it, and racks starting together share the CPU. In a thread,
        # so that the API and Raft keep answering meanwhile.
        await asyncio.to_thread(_load_rack_runtime)
        from meshcloud.agent.replication_wiring import ReplicationWiring
        from meshcloud.agent.runtime import run_appliance_loops

        self.wiring = ReplicationWiring(self.cfg, store, self.control.add_event)
        await self.wiring.async_start()
        self._spawn(
            self.control.follow_leader(api_token(self.secret), tls=self.peer_tls), "leader-view"
        )
        self.control.attach_replication(self.wiring)
        self._spawn(self.wiring.report_loop(), "replica-reports")
        self._spawn(self._power_reporter(store).run(), "power")
        drill = self._drills(store)
        wiring = self.wiring
        hooks = RackHooks(
            self.gate,
            self.lease.fence_in,
            lambda held: wiring.lease_seen(held and not drill.holding()),
        )
        self._spawn(
            run_appliance_loops(
                self.cfg,
                store,
                self.lease,
                self.control.add_event,
                engine=self.wiring.engine,
                hooks=hooks,
                on_hypervisor=self._hypervisor_ready,
            ),
            "appliances",
        )
        cluster_uuid = self.discovery.status.cluster_uuid
        log.info("rack %s is in cluster %s", self.cfg.rack.name, cluster_uuid)
        await self.membership.publish_loop(store)

    def _drills(self, store: PlacementStore) -> DrillWatcher:
        """This rack's part in fire drills, and the runner its API starts (docs/drill.md)."""
        from meshcloud.agent.drill import DrillRunner, DrillWatcher

        wiring, lease = self.wiring, self.lease
        assert wiring is not None and lease is not None
        watcher = DrillWatcher(
            self.cfg.rack.name,
            store,
            on_cut=lambda: wiring.lease_seen(False),
            lags=wiring.lags,
            on_event=self.control.add_event,
        )
        lease.hold = watcher.holding
        self.drill = watcher
        self.control.drills = DrillRunner(
            self.cfg.rack.name,
            store,
            lease.timers,
            leader_alive=lease.alive,
            move=self.control.move_appliance,
            on_event=self.control.add_event,
        )
        self._spawn(watcher.run(), "drill")
        return watcher

    def _power_reporter(self, store: PlacementStore) -> PowerReporter:
        """Publishes the rack's power state (UPS or mains) through the map (docs/power.md)."""
        p = self.cfg.power
        return PowerReporter(
            self.cfg.rack.name,
            source_from_config(p),
            store,
            poll_s=p.poll_s,
            evacuate_below_s=p.evacuate_below_s,
            on_event=self.control.add_event,
        )

    def _hypervisor_ready(self, hv: Any) -> None:
        """The agent opened the hypervisor: live replication, and the divergence keeper."""
        from meshcloud.agent.divergence import DivergenceKeeper

        wiring, store, lease = self.wiring, self.store, self.lease
        assert wiring is not None and store is not None and lease is not None
        wiring.attach_hypervisor(hv)
        if self.drill is not None:
            self.drill.hv = hv
        keeper = DivergenceKeeper(
            self.cfg.rack.name,
            wiring.volumes,
            store,
            status_of=wiring.primary_status,
            list_domains=hv.async_list,
            lease_held=lambda: lease.view().held,
            on_event=self.control.add_event,
        )
        self._spawn(keeper.run(), "divergence")
        self._spawn(_warm_up(hv, self.cfg.state_dir), "hypervisor-warm-up")

    def _spawn(self, coro: Any, name: str) -> None:
        if self._tasks_stopped:
            coro.close()  # the daemon is stopping: nothing new starts (see _stop_tasks)
            return
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %s; stopping the daemon", task.get_name(), exc, exc_info=exc)
            self.stopping.set()

    async def _stop_tasks(self) -> None:
        """Cancel every task and wait for them, including any started meanwhile.

        A task can finish a step after its cancellation and spawn another (a rack
        told to stop just as it joined its cluster spawns its lease); a single pass
        would then wait for a task nobody cancelled, forever.
        """
        self._tasks_stopped = True
        while pending := [t for t in self._tasks if not t.done()]:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _stop_store(self) -> None:
        if self.store is not None:
            await self.store.stop()

    async def _stop_replication(self) -> None:
        if self.wiring is not None:
            await asyncio.to_thread(self.wiring.stop)

    async def run(self) -> None:
        """Run until ``stopping`` is set (SIGTERM/SIGINT)."""
        async with AsyncExitStack() as stack:
            await self._start_web(stack)
            await self.discovery.start()
            stack.callback(self.watchdog.close)
            stack.push_async_callback(self.discovery.stop)
            stack.push_async_callback(self._stop_store)
            stack.push_async_callback(self._stop_replication)
            stack.push_async_callback(self.control.close)
            stack.push_async_callback(self._stop_tasks)
            self._spawn(keep_ticking(self.watchdog), "watchdog-tick")
            self.control.loop_lag = LoopLag()
            self._spawn(self.control.loop_lag.run(), "loop-lag")
            self._spawn(self._join_cluster(), "cluster")
            log.info("rack %s (site %s) started", self.cfg.rack.name, self.cfg.rack.site)
            await self.stopping.wait()
            log.info("rack %s stopping", self.cfg.rack.name)


WARM_UP_DOMAIN = "meshcloud-warm-up"  # not an appliance name (no "mc-" prefix)


def _warm_up_xml(disk: Path) -> str:
    return (
        f"<domain type='qemu'><name>{WARM_UP_DOMAIN}</name><memory unit='MiB'>16</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )


async def _warm_up(hv: Any, state_dir: Path) -> None:
    """Have libvirt do its slow first-time work now, not when a failover starts an appliance.

    libvirt (9.0, embedded) probes the QEMU binary's capabilities, 4-6 s on a
    loaded host, the first time a domain is defined; and once a domain with a
    disk has started, it probes them once more at the next definition
    (measured: its cache file is rewritten then). Both happen here, off the
    adapter's thread: a probe, one transient domain started paused (it never
    runs guest code) and destroyed at once, and a probe again. A failover onto
    this rack then defines its domain in milliseconds.
    """
    import libvirt

    from meshcloud.hypervisor.qemu_img import run_qemu_img

    disk = state_dir / "run" / "warm-up.qcow2"

    def probe(conn: Any) -> None:
        conn.getDomainCapabilities(None, None, None, "qemu", 0)

    def start_once(conn: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(WARM_UP_DOMAIN).destroy()  # left by a daemon that died here
        dom = conn.createXML(_warm_up_xml(disk), libvirt.VIR_DOMAIN_START_PAUSED)
        dom.destroy()

    try:
        await asyncio.to_thread(hv.run_blocking, probe)
        disk.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(
            run_qemu_img, ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"]
        )
        await asyncio.to_thread(hv.run_blocking, start_once)
        await asyncio.to_thread(hv.run_blocking, probe)
    except Exception as exc:  # only an optimisation: a start probes anyway
        log.info("warming libvirt up ahead of time failed: %s", exc)
    finally:
        disk.unlink(missing_ok=True)


def run_daemon(cfg: DaemonConfig) -> None:
    """Entry point of `meshcloud daemon`: refuses to start without a good secret."""
    secret = cfg.read_secret()
    os.umask(0o077)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def main() -> None:
        daemon = Daemon(cfg, secret)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.warning("tasks:\n%s", dump_tasks()))
        await daemon.run()

    asyncio.run(main())
