"""The replication engine inside the daemon: links, duties, reports, fencing, lag.

:class:`ReplicationWiring` owns the rack's :class:`ReplicationEngine` and
connects it to the rest of the daemon (docs/failover.md):

- **links**: a replica rack is reached over SSH at the address the placement
  map lists for it, with the cluster's replication key
  (``replication.ssh_key``) and pinned host keys (``replication.known_hosts``);
  the receiving rack's sshd forces a command for that key that runs rsync's
  daemon mode (write-only into ``<volumes>/.incoming``) for rsync and
  ``meshcloud.replication.serve`` for the replication verbs:
  :func:`install_authorized_keys` writes that line into
  ``<state_dir>/ssh/authorized_keys`` and the daemon's ``rsyncd.conf`` beside
  it at start-up;
- **duties**: the rack agent sets them every cycle from the map (primary here,
  running: ship to its replicas under the assignment's epoch and priority);
- **reports**: every ``REPORT_PERIOD_S``, each replica copy this rack holds
  for an appliance whose map lists it as a replica, and which follows the
  current epoch, is published with ``replica_report`` (the generation a
  failover would promote);
- **fencing**: the engine stops shipping at once when the lease is lost
  (:meth:`lease_seen`) and resumes when it is regained;
- **lag**: :meth:`lags` for the API, :meth:`metrics_text` for ``/metrics``.

Copies left behind by failovers (a returning old primary, a replica whose
history diverged) are handled by :mod:`meshcloud.agent.divergence`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcloud.config import DaemonConfig
from meshcloud.core.errors import MeshcloudError, ReplicationError
from meshcloud.core.models import ClusterSnapshot
from meshcloud.hypervisor.domain_xml import domain_name
from meshcloud.raft.store import PlacementStore
from meshcloud.replication.engine import EngineSettings, ReplicationEngine
from meshcloud.replication.live import LibvirtLiveOps
from meshcloud.replication.manifest import Manifest, Role
from meshcloud.replication.source import ReplicaLink
from meshcloud.replication.transport import (
    RsyncSettings,
    SshTarget,
    authorized_keys_line,
    rsyncd_conf_text,
)
from meshcloud.replication.volume import VolumeSet, list_appliances, write_durably

log = logging.getLogger("meshcloud.replication")

REPORT_PERIOD_S = 0.5
EVENT_REPEAT_S = 60.0  # the same engine sentence (numbers aside) is published once a minute
_NUMBERS = re.compile(r"\d+(\.\d+)?")
CONTROL_ROOT = Path("/run/meshcloud/ssh")
EventSink = Callable[[str, str, "str | None"], None]


# -- pure helpers ---------------------------------------------------------------------


@dataclass(frozen=True)
class CopyInfo:
    """What a rack's manifest says about its copy of one appliance."""

    role: Role
    epoch: int
    generation: int


def copy_info(manifest: Manifest) -> CopyInfo:
    return CopyInfo(manifest.role, manifest.epoch, manifest.generation)


def generation_reports(
    rack: str, snapshot: ClusterSnapshot, copies: Mapping[str, CopyInfo]
) -> list[dict[str, Any]]:
    """The ``replica_report`` commands this rack owes the map (pure).

    A copy is reported only when it is a replica, the map lists this rack as
    one of the appliance's replicas, and the copy has seen the assignment's
    epoch (it accepted a delta or a seed from the current primary, so it is on
    the current history), and only when its generation is above what the map
    holds. A diverged or stale copy is never advertised to a failover.
    """
    commands = []
    for name, info in sorted(copies.items()):
        asg = snapshot.assignments.get(name)
        if asg is None or name not in snapshot.appliances or rack not in asg.replicas:
            continue
        if info.role is not Role.REPLICA or info.epoch != asg.epoch:
            continue
        known = snapshot.replica_generations.get(name, {}).get(rack)
        if known is not None and info.generation <= known:
            continue
        commands.append(
            {
                "op": "replica_report",
                "appliance": name,
                "rack": rack,
                "generation": info.generation,
            }
        )
    return commands


def control_dir(state_dir: Path) -> Path:
    """A short per-rack directory for SSH connection masters (socket paths are short).

    ssh names its master sockets after a hash of (local host, remote host,
    port, user): racks sharing a host (the lab) must not share masters.
    """
    return CONTROL_ROOT / hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


def authorized_keys_text(
    public_key: str, python: Path, volumes: Path, rsyncd_conf: Path, *, nice: int = 0
) -> str:
    """The rack's authorized_keys: the cluster's replication key and its forced command."""
    rsync = shutil.which("rsync") or "/usr/bin/rsync"
    line = authorized_keys_line(public_key, python, volumes, rsyncd_conf, rsync=rsync, nice=nice)
    return line + "\n"


def install_authorized_keys(cfg: DaemonConfig, python: Path | None = None) -> Path | None:
    """Write ``<state_dir>/ssh/authorized_keys`` for the replication key; None if unset.

    The rack's sshd reads that file (the lab's sshd_config, the rack image's
    ``AuthorizedKeysFile``); the key may then only run replication verbs and
    rsync into ``<volumes>/.incoming`` (docs/replication.md).
    """
    key = cfg.replication.ssh_key
    if key is None:
        return None
    public = key.with_name(key.name + ".pub")
    try:
        line = public.read_text().strip()
    except OSError as exc:
        raise ReplicationError(
            f"replication.ssh_key: cannot read the public key {public}: {exc};"
            " install the kit's ssh/replication_ed25519.pub next to the private key"
        ) from exc
    volumes = cfg.state_dir / "volumes"
    (volumes / ".incoming").mkdir(parents=True, exist_ok=True)
    target = cfg.state_dir / "ssh" / "authorized_keys"
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = target.with_name("rsyncd.conf")
    # the configuration first: the forced command names it
    _write_if_changed(conf, rsyncd_conf_text(volumes / ".incoming"))
    _write_if_changed(
        target,
        authorized_keys_text(
            line, python or Path(sys.executable), volumes, conf, nice=cfg.replication.nice
        ),
    )
    return target


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        write_durably(path, text.encode())
        os.chmod(path, 0o600)


# -- the wiring -------------------------------------------------------------------------


class ReplicationWiring:
    """The daemon's replication engine and what connects it (see the module docstring)."""

    def __init__(
        self,
        cfg: DaemonConfig,
        store: PlacementStore,
        on_event: EventSink | None = None,
    ) -> None:
        self.cfg = cfg
        self.rack = cfg.rack.name
        self.store = store
        self.on_event = on_event
        self.volumes = cfg.state_dir / "volumes"
        self._hv: Any = None
        self._fenced: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events_lock = threading.Lock()
        self._last_gist: dict[str, float] = {}
        r = cfg.replication
        self.rsync = RsyncSettings(bwlimit_kbps=r.bwlimit_kbps, compress=r.compress)
        self.engine = ReplicationEngine(
            self.volumes,
            link_for=self.link_for,
            live_for=self.live_for,
            settings=EngineSettings(
                interval_s=r.interval_s, max_interval_s=r.max_interval_s, nice=r.nice
            ),
            on_event=self._engine_event,
        )

    @property
    def ships(self) -> bool:
        """Whether this rack can ship at all (a replication key is configured)."""
        return self.cfg.replication.ssh_key is not None

    # -- links and live operations ----------------------------------------------------

    def link_for(self, rack: str) -> ReplicaLink:
        """How to reach ``rack``'s replication endpoint (its address from the map)."""
        r = self.cfg.replication
        if r.ssh_key is None or r.known_hosts is None:
            raise ReplicationError(
                f"replication to {rack} is not configured on this rack: set"
                " replication.ssh_key and replication.known_hosts (docs/failover.md)"
            )
        member = self.store.state().racks.get(rack)
        if member is None or not member.address:
            raise ReplicationError(f"rack {rack} has no address in the map yet; retrying")
        target = SshTarget(
            host=member.address,
            port=r.ssh_port,
            identity_file=r.ssh_key,
            known_hosts_file=r.known_hosts,
            user=r.ssh_user,
            control_dir=control_dir(self.cfg.state_dir),
            connect_timeout_s=5,
            alive_interval_s=2,
            alive_count=3,
        )
        return ReplicaLink(rack, target, self.rsync)

    def attach_hypervisor(self, hv: Any) -> None:
        """The agent's hypervisor adapter, for live snapshots and block commits."""
        self._hv = hv

    def live_for(self, appliance: str) -> LibvirtLiveOps | None:
        hv = self._hv
        if hv is None:
            return None
        return LibvirtLiveOps(hv.run_blocking, domain_name(appliance))

    # -- running ------------------------------------------------------------------------

    async def async_start(self) -> None:
        """:meth:`start` off the event loop (recovery reads every manifest)."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.start)

    def primary_status(self, rack: str, appliance: str) -> dict[str, Any]:
        """The ``status`` of ``appliance`` on ``rack`` over the replication link (blocking)."""
        return self.engine.transport.call(self.link_for(rack), ["status", appliance])

    def start(self) -> None:
        """Recover interrupted seeds and merges, install the key, start the engine's threads."""
        control_dir(self.cfg.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        path = install_authorized_keys(self.cfg)
        if path is not None:
            log.info("replication key installed in %s", path)
        else:
            log.warning(
                "no replication.ssh_key: this rack keeps its appliances' disks but ships nothing"
            )
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def lease_seen(self, held: bool) -> None:
        """Every agent cycle: fence the engine when the lease is lost, resume when regained."""
        if held and self._fenced is not False:
            self.engine.resume()
            if self._fenced:
                self._emit("replication resumed: the lease is held again")
            self._fenced = False
        elif not held and self._fenced is not True:
            self.engine.fence()
            self._fenced = True

    async def report_loop(self) -> None:
        """Publish replica generations through the map until cancelled."""
        while True:
            await asyncio.sleep(REPORT_PERIOD_S)
            try:
                await self.report_once()
            except Exception as exc:  # a bad pass must not end the loop (nor the daemon)
                log.warning("replica report failed: %s", exc)

    async def report_once(self) -> int:
        copies = await asyncio.to_thread(self.local_copies)
        commands = generation_reports(self.rack, self.store.snapshot(), copies)
        sent = 0
        for command in commands:
            with contextlib.suppress(MeshcloudError):
                await self.store.propose(command, timeout_s=2.0)
                sent += 1
        return sent

    def local_copies(self) -> dict[str, CopyInfo]:
        """``{appliance: CopyInfo}`` for every copy in this rack's volumes (blocking)."""
        out = {}
        for name in list_appliances(self.volumes):
            try:
                out[name] = copy_info(VolumeSet(self.volumes, name).load())
            except MeshcloudError:
                continue
        return out

    # -- what the API shows ----------------------------------------------------------------

    def lags(self) -> dict[str, dict[str, float]]:
        """``{appliance: {replica: seconds of writes it lacks}}`` for appliances primary here."""
        out = {}
        for app, per_rack in self.engine.lags().items():
            out[app] = {
                r: (round(v, 3) if v != float("inf") else -1.0) for r, v in per_rack.items()
            }
        return out

    def metrics_text(self) -> str:
        return self.engine.metrics_text()

    # -- events -----------------------------------------------------------------------------

    def _engine_event(self, sentence: str) -> None:
        """From the engine's threads: log, and publish when the news changed (on the loop)."""
        gist = _NUMBERS.sub("#", sentence)
        now = time.monotonic()
        with self._events_lock:
            last = self._last_gist.get(gist)
            if last is not None and now - last < EVENT_REPEAT_S:
                log.debug("%s", sentence)
                return
            self._last_gist[gist] = now
            if len(self._last_gist) > 256:
                self._last_gist.clear()
        log.info("%s", sentence)
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is stopping
            loop.call_soon_threadsafe(self._emit, sentence)

    def _emit(self, sentence: str) -> None:
        if self.on_event is not None:
            self.on_event("replication", sentence, None)
