"""The discovery service the daemon runs: mDNS hints and static peers in, admitted peers out.

:class:`Discovery` keeps a set of *targets* (addresses to knock at: from
mDNS announcements, from ``cluster.peers``, and from racks that admitted
themselves to us) and runs the admission exchange with each, again every
``refresh_s`` while this rack is unformed (peers' reports must stay fresh
for formation) and every ``formed_refresh_s`` afterwards. A target that
fails is retried with exponential back-off; failures are logged, never fatal.

Admitted peers are never forgotten (views only grow; see
docs/discovery.md): admission says who *belongs*, never who is *alive*.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from meshcloud import __version__
from meshcloud.aio import wait_event
from meshcloud.config import DaemonConfig
from meshcloud.core.errors import InvalidInput
from meshcloud.core.formation import (
    MAX_MEMBERS,
    NOT_FORMED,
    Decision,
    FormationStatus,
    Found,
    Member,
    decide,
    validate_address,
    validate_port,
)
from meshcloud.core.names import validate_name
from meshcloud.core.state import founding_voters
from meshcloud.discovery import admission
from meshcloud.discovery.admission import (
    AdmissionFailed,
    AdmissionRefused,
    AdmissionServer,
    AdmittedPeer,
)
from meshcloud.discovery.mdns import MdnsAgent
from meshcloud.discovery.proof import ClusterKeys
from meshcloud.discovery.records import Announcement, RackReport
from meshcloud.web.tls import PLAIN, PeerTLS, peer_tls

log = logging.getLogger(__name__)

MAX_TARGETS = 256
MAX_SUBSCRIBER_BACKLOG = 1024


@dataclass(frozen=True)
class LocalRack:
    """This rack, as it announces itself."""

    name: str
    site: str
    address: str
    api_port: int
    raft_port: int
    version: str = __version__

    def __post_init__(self) -> None:
        validate_name("rack", self.name)
        validate_name("site", self.site)
        validate_address("bind address", self.address)
        validate_port("api_port", self.api_port)
        validate_port("raft_port", self.raft_port)

    def member(self) -> Member:
        return Member(self.name, self.address, self.raft_port, self.api_port)


def parse_peer(text: str) -> tuple[str, int]:
    """Split ``"ip:port"`` or ``"[v6]:port"`` (as in ``cluster.peers``) into address and port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInput(f"peer {text!r} must be ip:port")
    address = validate_address(f"peer {text!r}", host.strip("[]"))
    return address, validate_port(f"peer {text!r}", int(port))


@dataclass(frozen=True)
class TargetState:
    """Where discovery knocks, and how it went (for logs, the API and the console)."""

    address: str
    api_port: int
    via: str
    hint_name: str | None
    admitted_name: str | None
    failures: int
    last_problem: str


@dataclass
class _Target:
    address: str
    api_port: int
    via: str
    hint_name: str | None = None
    admitted_name: str | None = None
    failures: int = 0
    last_problem: str = ""
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Discovery:
    """Finds and admits the racks of this cluster; feeds cluster formation.

    Use from the event loop only. Lifecycle: construct, :meth:`add_routes` on
    the API application (before it starts), ``await start()``, ...,
    ``await stop()``. Nothing here blocks the loop.
    """

    def __init__(
        self,
        rack: LocalRack,
        secret: str,
        *,
        bootstrap_expect: int,
        max_voters: int = 5,
        status: FormationStatus = NOT_FORMED,
        static_peers: Sequence[str] = (),
        mdns: bool = True,
        refresh_s: float = 1.0,
        formed_refresh_s: float = 15.0,
        max_backoff_s: float = 5.0,
        request_timeout_s: float = 3.0,
        tls: PeerTLS = PLAIN,
    ) -> None:
        self.rack = rack
        self.tls = tls
        self.keys = ClusterKeys.from_secret(secret)
        self.bootstrap_expect = bootstrap_expect
        self.max_voters = max_voters
        self.static_peers = tuple(parse_peer(p) for p in static_peers)
        self.use_mdns = mdns
        self.refresh_s = refresh_s
        self.formed_refresh_s = formed_refresh_s
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s
        self._status = status
        self._peers: dict[str, AdmittedPeer] = {}
        self._targets: dict[tuple[str, int], _Target] = {}
        self._subscribers: set[asyncio.Queue[AdmittedPeer]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._mdns: MdnsAgent | None = None
        self._txt_task: asyncio.Task[None] | None = None
        self._txt_dirty = asyncio.Event()
        self._running = False
        self.server = AdmissionServer(self.keys, rack.name, self.report, self._on_inbound_admitted)

    @classmethod
    def from_config(
        cls,
        cfg: DaemonConfig,
        secret: str,
        status: FormationStatus = NOT_FORMED,
        tls: PeerTLS | None = None,
    ) -> Discovery:
        """Build from the daemon's configuration, its secret and its persisted status.

        ``tls`` defaults to what ``cfg.console`` says (verified HTTPS or plain HTTP).
        """
        rack = LocalRack(
            name=cfg.rack.name,
            site=cfg.rack.site,
            address=cfg.network.bind_address,
            api_port=cfg.network.api_port,
            raft_port=cfg.network.raft_port,
        )
        return cls(
            rack,
            secret,
            bootstrap_expect=cfg.cluster.bootstrap_expect,
            max_voters=cfg.cluster.max_voters,
            status=status,
            static_peers=cfg.cluster.peers,
            mdns=cfg.cluster.mdns,
            tls=tls if tls is not None else peer_tls(cfg.console),
        )

    # --- what the daemon reads ------------------------------------------------------

    @property
    def cluster_id(self) -> str:
        return self.keys.cluster_id

    @property
    def status(self) -> FormationStatus:
        """This rack's formation status as reported to peers."""
        return self._status

    @property
    def peers(self) -> Mapping[str, AdmittedPeer]:
        """Every admitted peer by name, with its latest report (a copy)."""
        return dict(self._peers)

    @property
    def targets(self) -> list[TargetState]:
        """Every address discovery knocks at, with its last problem (empty when admitted)."""
        return [
            TargetState(
                t.address,
                t.api_port,
                t.via,
                t.hint_name,
                t.admitted_name,
                t.failures,
                t.last_problem,
            )
            for t in self._targets.values()
        ]

    def report(self) -> RackReport:
        """This rack's report as sent to peers now: status and current view."""
        return RackReport(
            name=self.rack.name,
            site=self.rack.site,
            address=self.rack.address,
            api_port=self.rack.api_port,
            raft_port=self.rack.raft_port,
            version=self.rack.version,
            bootstrap_expect=self.bootstrap_expect,
            status=self._status,
            candidates=frozenset({self.rack.name, *self._peers}),
            known=tuple(
                Member(p.name, p.address, p.raft_port, p.api_port)
                for _, p in sorted(self._peers.items())
            )[:MAX_MEMBERS],
        )

    def announcement(self) -> Announcement:
        return Announcement(
            cluster_id=self.keys.cluster_id,
            rack=self.rack.name,
            site=self.rack.site,
            raft_port=self.rack.raft_port,
            api_port=self.rack.api_port,
            version=self.rack.version,
            formed=self._status.formed,
            cluster_uuid=self._status.cluster_uuid,
        )

    async def updates(self) -> AsyncIterator[AdmittedPeer]:
        """Yield every peer when it is first admitted and whenever its report changes.

        Each caller gets its own stream, starting with the peers already admitted.
        """
        queue: asyncio.Queue[AdmittedPeer] = asyncio.Queue(MAX_SUBSCRIBER_BACKLOG)
        for peer in self._peers.values():
            queue.put_nowait(peer)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    # --- what the daemon tells us ---------------------------------------------------

    def decide_formation(self) -> Decision:
        """Run cluster formation on what this rack knows now (sync, never awaits).

        When the decision is :class:`Found`, this rack's reported status is
        switched to formed (new cluster uuid, itself as leader and sole member)
        before this returns, in the same loop step as the decision: no peer
        can be told "unformed" afterwards. The daemon must then persist that
        status and found the Raft group; for :class:`Join` it asks the leader
        to add it and calls :meth:`update_formation` once it is a member.
        """
        decision = decide(
            self.rack.name,
            self._status,
            self.bootstrap_expect,
            {name: peer.report.formation_report() for name, peer in self._peers.items()},
            new_cluster_uuid=str(uuid.uuid4()),
        )
        if isinstance(decision, Found):
            assert decision.cluster_uuid is not None
            self._set_status(
                FormationStatus(
                    formed=True,
                    cluster_uuid=decision.cluster_uuid,
                    leader=self.rack.name,
                    members=(self.rack.member(),),
                    founding=self._founding_voters(decision.founding_set),
                )
            )
        return decision

    def _founding_voters(self, founding_set: Sequence[str]) -> tuple[Member, ...]:
        """The founding racks that start as one static Raft group (core.state.founding_voters).

        Empty when this rack founds alone: it is then its group's only voter.
        """
        if len(founding_set) < 2:
            return ()
        me = self.rack.member()
        known: dict[str, tuple[str, Member]] = {me.name: (self.rack.site, me)}
        for name, peer in self._peers.items():
            r = peer.report
            known[name] = (r.site, Member(r.name, r.address, r.raft_port, r.api_port))
        sites = {n: known[n][0] for n in founding_set}
        return tuple(known[n][1] for n in founding_voters(me.name, sites, self.max_voters))

    def update_formation(
        self,
        formed: bool,
        cluster_uuid: str | None,
        *,
        leader: str | None = None,
        members: Sequence[Member] = (),
        founding: Sequence[Member] = (),
    ) -> None:
        """Set this rack's formation status (sync); the TXT record follows shortly.

        A rack that is formed never becomes unformed again, nor changes cluster:
        both raise InvalidInput.
        """
        status = FormationStatus(
            formed=formed,
            cluster_uuid=cluster_uuid,
            leader=leader,
            members=tuple(members),
            founding=tuple(founding),
        )
        if self._status.formed and not status.formed:
            raise InvalidInput("a formed rack cannot become unformed again")
        if self._status.formed and status.cluster_uuid != self._status.cluster_uuid:
            raise InvalidInput(
                f"this rack belongs to cluster {self._status.cluster_uuid}; it cannot move to"
                f" {status.cluster_uuid}"
            )
        self._set_status(status)

    def _set_status(self, status: FormationStatus) -> None:
        before = self.announcement()
        changed_formed = status.formed != self._status.formed
        self._status = status
        if self.announcement() != before:
            self._txt_dirty.set()
        if changed_formed:
            self._push_report()

    def _push_report(self, except_name: str | None = None) -> None:
        """Re-admit every target now, so that peers get this rack's new report at once."""
        for target in self._targets.values():
            if target.admitted_name != except_name:
                target.wake.set()

    def add_routes(self, app: web.Application) -> None:
        """Register ``POST /api/v1/peer/hello`` on the rack's API application."""
        admission.add_routes(app, self.server)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client, announce and browse over mDNS, knock at static peers."""
        if self._running:
            return
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self._running = True
        connector = self.tls.connector(local_addr=(self.rack.address, 0), limit=32)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
        )
        for address, port in self.static_peers:
            if (address, port) != (self.rack.address, self.rack.api_port):
                self._add_target(address, port, "static")
        if self.use_mdns:
            self._mdns = MdnsAgent(
                self.rack.address, self.keys.cluster_id, self.rack.name, self._on_announcement
            )
            await self._mdns.start(self.announcement())
            self._txt_task = asyncio.get_running_loop().create_task(self._txt_loop())
        log.info(
            "discovery started for rack %s (cluster id %s, mDNS %s, %d static peer(s))",
            self.rack.name,
            self.keys.cluster_id,
            "on" if self.use_mdns else "off",
            len(self.static_peers),
        )

    async def stop(self) -> None:
        """Stop probing, withdraw the mDNS announcement, close the HTTP client."""
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        if self._txt_task is not None:
            tasks.append(self._txt_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._txt_task = None
        if self._mdns is not None:
            await self._mdns.stop()
            self._mdns = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- targets and probing --------------------------------------------------------

    def _add_target(
        self, address: str, api_port: int, via: str, hint_name: str | None = None
    ) -> None:
        key = (address, api_port)
        target = self._targets.get(key)
        if target is not None:
            if hint_name is not None:
                target.hint_name = hint_name
            return
        if not self._running:
            return
        if len(self._targets) >= MAX_TARGETS:
            log.warning("ignoring %s:%d: already %d targets", address, api_port, MAX_TARGETS)
            return
        target = _Target(address=address, api_port=api_port, via=via, hint_name=hint_name)
        self._targets[key] = target
        target.task = asyncio.get_running_loop().create_task(self._probe_loop(target))

    def _on_announcement(self, ann: Announcement, addresses: tuple[str, ...]) -> None:
        if not self._running:
            return
        for address in addresses:
            key = (address, ann.api_port)
            if key in self._targets:
                self._targets[key].hint_name = ann.rack
                self._targets[key].wake.set()  # a changed TXT may mean a changed status
                return
        self._add_target(addresses[0], ann.api_port, "mdns", ann.rack)

    def _on_inbound_admitted(self, peer: AdmittedPeer) -> None:
        self._record(peer)
        self._add_target(peer.address, peer.api_port, "inbound", peer.name)

    def _learn_known(self, peer: AdmittedPeer) -> None:
        """Knock at the racks an admitted peer knows (gossip: one address finds them all)."""
        for member in (*peer.report.known, *peer.report.status.members):
            if member.name != self.rack.name and member.name not in self._peers:
                self._add_target(member.address, member.api_port, "gossip", member.name)

    def _record(self, peer: AdmittedPeer) -> None:
        if peer.name == self.rack.name:
            return
        old = self._peers.get(peer.name)
        if old is not None and old.report.address != peer.report.address:
            log.warning(
                "rack %s now reports address %s (was %s)",
                peer.name,
                peer.report.address,
                old.report.address,
            )
        self._peers[peer.name] = peer
        self._learn_known(peer)
        if old is None and not self._status.formed:
            self._push_report(except_name=peer.name)  # our view grew: tell the others now
        if old is None:
            log.info(
                "admitted rack %s (site %s) at %s:%d via %s",
                peer.name,
                peer.site,
                peer.address,
                peer.api_port,
                peer.via,
            )
        if old is None or old.report != peer.report:
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(peer)
                except asyncio.QueueFull:
                    log.warning("a discovery subscriber is not keeping up; update dropped")

    def _interval(self) -> float:
        return self.formed_refresh_s if self._status.formed else self.refresh_s

    async def _probe_loop(self, target: _Target) -> None:
        where = f"{target.address}:{target.api_port}"
        while self._running:
            target.wake.clear()
            try:
                assert self._session is not None
                peer = await admission.hello(
                    self._session,
                    self.keys,
                    self.rack.name,
                    self.report,
                    target.address,
                    target.api_port,
                    via=target.via,
                    tls=self.tls,
                )
            except (AdmissionRefused, AdmissionFailed) as exc:
                target.failures += 1
                problem = str(exc)
                if problem != target.last_problem:
                    level = logging.WARNING if isinstance(exc, AdmissionRefused) else logging.INFO
                    log.log(level, "admission of %s failed: %s", where, problem)
                    target.last_problem = problem
                if (
                    target.admitted_name is None
                    and target.via in ("mdns", "gossip")
                    and target.failures > 30
                ):
                    log.info("giving up on %s (never admitted; mDNS hint only)", where)
                    del self._targets[(target.address, target.api_port)]
                    return
                delay = min(self.max_backoff_s, 0.25 * 2 ** min(target.failures, 8))
                delay *= random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
            else:
                target.failures = 0
                target.last_problem = ""
                if target.hint_name is not None and target.hint_name != peer.name:
                    log.info(
                        "%s was announced as %s but is rack %s", where, target.hint_name, peer.name
                    )
                target.admitted_name = peer.name
                self._record(peer)
                delay = self._interval() * random.uniform(0.8, 1.2)  # noqa: S311
            await wait_event(target.wake, delay)

    async def _txt_loop(self) -> None:
        while self._running:
            await self._txt_dirty.wait()
            self._txt_dirty.clear()
            if self._mdns is not None:
                try:
                    await self._mdns.update(self.announcement())
                except Exception:  # the announcement is a hint; admission carries the truth
                    log.exception("could not update the mDNS announcement")
