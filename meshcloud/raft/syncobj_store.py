"""The placement-map store on pysyncobj 0.3.17, hardened (see meshcloud/raft/hardening.py).

Files, in ``STATE_DIR/raft/`` (mode 0700): ``journal`` (+ ``journal.meta``:
term, vote, commit index), ``dump`` (the full dump written at log
compaction) and ``role.json`` (voter or follower, and the voters to contact
after a restart). A restarted rack rebuilds its map from the dump and the
journal, then catches up from the leader.

Voters and followers: the map (meshcloud.core.state) decides which racks
vote. A voter runs a full pysyncobj node; a follower runs a pysyncobj
"readonly" node: it receives the log and can propose, but never votes nor
counts for a quorum. Every rack reconciles itself to the map: a follower
the map names as a voter restarts its node as a voter, and the leader adds
it to the Raft configuration; a voter the map no longer names restarts as
a follower, and the leader removes it. Raft configuration changes are made
one at a time, by the leader only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pickle
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObjConf

from meshcloud import clock
from meshcloud.aio import wait_event, within
from meshcloud.config import MIN_SECRET_LEN, WEAK_SECRETS, DaemonConfig
from meshcloud.core.errors import ConfigError, Unavailable
from meshcloud.core.models import Capacity, Rack
from meshcloud.core.state import EMPTY, PlacementState, raise_for_result
from meshcloud.raft.hardening import HardenedSyncObj, HardeningOptions
from meshcloud.raft.machine import PlacementMachine, encode_command
from meshcloud.raft.store import MemberStatus, PlacementStore, StoreStatus

log = logging.getLogger("meshcloud.raft")

# Why a command failed, and whether it may still commit (Raft cannot always tell).
_FAILURES = {
    FAIL_REASON.QUEUE_FULL: "not committed: the Raft command queue is full",
    FAIL_REASON.MISSING_LEADER: "not committed: no Raft leader is known (election, or cut off)",
    FAIL_REASON.DISCARDED: "not committed: a new leader replaced the command",
    FAIL_REASON.REQUEST_DENIED: "not committed: the leader refused the request",
    FAIL_REASON.NOT_LEADER: "outcome unknown: the leader changed after the command was sent"
    " (it may still commit: re-read the map before retrying)",
    FAIL_REASON.LEADER_CHANGED: "outcome unknown: the leader changed after the command was sent"
    " (it may still commit: re-read the map before retrying)",
    FAIL_REASON.UNKNOWN_OUTCOME: "outcome unknown: the map moved past the command"
    " (re-read the map before retrying)",
}


def raft_password(secret: str) -> str:
    """The pysyncobj password: derived from the cluster secret, never the secret itself."""
    return hashlib.sha256(b"meshcloud raft v1\0" + secret.encode()).hexdigest()


def check_secret(secret: str) -> str:
    """Return ``secret`` if it is strong enough to guard the Raft port, else raise ConfigError."""
    if not isinstance(secret, str) or secret.strip().lower() in WEAK_SECRETS:
        raise ConfigError(
            "the Raft store refuses to start without a cluster secret (empty or default"
            " given): make one with `meshcloud kit new`"
        )
    if len(secret.strip()) < MIN_SECRET_LEN:
        raise ConfigError(
            f"the cluster secret has {len(secret.strip())} characters; the Raft store needs at"
            f" least {MIN_SECRET_LEN}"
        )
    return secret


@dataclass(frozen=True)
class RaftSettings:
    """Everything a SyncObjStore needs; see docs/raft.md for the timers."""

    rack: Rack  # this rack: name, site, address (the mesh address), raft_port, capacity
    state_dir: Path
    secret: str = field(repr=False)
    peers: tuple[str, ...] = ()  # host:raft_port of members to contact when joining
    found: bool = False  # found a new cluster (only if this rack has no Raft state yet)
    # A founding voter (named by the founder) with no Raft state starts as a voter of the
    # static group ``peers`` + itself, instead of as a follower promoted later.
    founding_voter: bool = False
    founding_voters: tuple[str, ...] = ()  # the founder's cluster_init names them (rack names)
    cluster_id: str = ""
    max_voters: int = 5
    raft_min_timeout_s: float = 0.2
    raft_max_timeout_s: float = 0.6
    append_period_s: float = 0.05
    connection_timeout_s: float = 1.5
    leader_fallback_s: float = 1.0
    connection_retry_s: float = 0.2
    compaction_min_entries: int = 5000
    compaction_min_time_s: float = 300.0
    propose_timeout_s: float = 3.0
    reconcile_period_s: float = 0.25
    hardening: HardeningOptions = field(default_factory=HardeningOptions)

    @property
    def address(self) -> str:
        return f"{self.rack.address}:{self.rack.raft_port}"

    @classmethod
    def from_config(
        cls,
        cfg: DaemonConfig,
        secret: str,
        *,
        peers: tuple[str, ...] = (),
        found: bool = False,
        cluster_id: str = "",
        founding_voter: bool = False,
        founding_voters: tuple[str, ...] = (),
    ) -> RaftSettings:
        """Settings for the daemon's rack, from its validated configuration."""
        t = cfg.timers
        rack = Rack(
            name=cfg.rack.name,
            site=cfg.rack.site,
            capacity=Capacity(
                cfg.rack.capacity.vcpus, cfg.rack.capacity.memory_mib, cfg.rack.capacity.disk_gib
            ),
            address=cfg.network.bind_address,
            api_port=cfg.network.api_port,
            raft_port=cfg.network.raft_port,
        )
        return cls(
            rack=rack,
            state_dir=cfg.state_dir,
            secret=secret,
            peers=peers,
            found=found,
            cluster_id=cluster_id,
            founding_voter=founding_voter,
            founding_voters=founding_voters,
            max_voters=cfg.cluster.max_voters,
            raft_min_timeout_s=t.raft_min_timeout_s,
            raft_max_timeout_s=t.raft_max_timeout_s,
            append_period_s=t.raft_append_period_s,
            connection_timeout_s=t.raft_connection_timeout_s,
        )


def make_conf(settings: RaftSettings, dump_path: Path) -> SyncObjConf:
    """The pysyncobj configuration meshcloud runs with (checked by hardening.check_conf)."""
    return SyncObjConf(
        password=raft_password(settings.secret),
        autoTick=False,
        commandsWaitLeader=False,
        raftMinTimeout=settings.raft_min_timeout_s,
        raftMaxTimeout=settings.raft_max_timeout_s,
        appendEntriesPeriod=settings.append_period_s,
        connectionTimeout=settings.connection_timeout_s,
        connectionRetryTime=settings.connection_retry_s,
        leaderFallbackTimeout=settings.leader_fallback_s,
        logCompactionMinEntries=settings.compaction_min_entries,
        logCompactionMinTime=settings.compaction_min_time_s,
        fullDumpFile=str(dump_path),
        journalFile=None,
        dynamicMembershipChange=True,
        bindAddress=settings.address,
        useFork=False,
        maxBindRetries=1,
        tcp_keepalive=(5, 1, 3),
    )


def _check_bindable(address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            raise Unavailable(
                f"cannot bind the Raft port {address}:{port}: {exc.strerror}; check"
                " network.bind_address and that no other daemon runs on this rack"
            ) from None


class SyncObjStore(PlacementStore):
    """The placement map on hardened pysyncobj; see the module docstring."""

    def __init__(self, settings: RaftSettings) -> None:
        check_secret(settings.secret)
        if not settings.rack.address or settings.rack.raft_port == 0:
            raise ConfigError("the Raft store needs the rack's mesh address and raft_port")
        if settings.rack.address in ("0.0.0.0", "::"):  # noqa: S104 - refusing it is the point
            raise ConfigError("the Raft port must be bound to the mesh address, not a wildcard")
        self.settings = settings
        self.directory = settings.state_dir / "raft"
        self._node: HardenedSyncObj | None = None
        self._machine: PlacementMachine | None = None
        self._role = "stopped"
        self._published: PlacementState = EMPTY
        self._view: dict[str, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._membership_busy = False
        self._membership_changed = False
        self._converting = False  # restarting the node in another role (see _convert)
        self._node_back = asyncio.Event()
        self._saved_peers: list[str] = []

    # -- files ---------------------------------------------------------------------------------
    @property
    def _role_file(self) -> Path:
        return self.directory / "role.json"

    def _read_role(self) -> tuple[str, list[str]] | None:
        try:
            data = json.loads(self._role_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self._role_file}: unreadable ({exc}); restore or remove it"
            ) from exc
        role, peers = data.get("role"), data.get("peers", [])
        if role not in ("voter", "follower") or not isinstance(peers, list):
            raise ConfigError(f"{self._role_file}: malformed; restore or remove it")
        return role, [str(p) for p in peers]

    def _write_role(self, role: str, peers: list[str]) -> None:
        tmp = self._role_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"role": role, "peers": sorted(set(peers))}))
        os.replace(tmp, self._role_file)
        self._saved_peers = sorted(set(peers))

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        await asyncio.to_thread(self.directory.mkdir, mode=0o700, parents=True, exist_ok=True)
        saved = await asyncio.to_thread(self._read_role)
        me = self.settings.address
        if saved is not None:
            role, peers = saved
            peers = sorted((set(peers) | set(self.settings.peers)) - {me})
        elif self.settings.founding_voter:
            # one of the founding voters (the founder too): the static group ``peers`` + me
            role, peers = "voter", sorted(set(self.settings.peers) - {me})
        elif self.settings.found:
            role, peers = "voter", []  # founding alone: ``peers`` are not asked
        else:
            role, peers = "follower", sorted(set(self.settings.peers) - {me})
            if not peers:
                raise ConfigError(
                    f"rack {self.settings.rack.name} has no Raft state and no peers: found a"
                    " cluster or give the members to join"
                )
        await self._start_node(role, peers, founding=saved is None and self.settings.found)
        self._reconciler = asyncio.create_task(self._reconcile_loop(), name="raft-reconcile")

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
            self._reconciler = None
        await self._stop_node()
        self._role = "stopped"

    async def _start_node(self, role: str, peers: list[str], founding: bool = False) -> None:
        building = asyncio.ensure_future(asyncio.to_thread(self._build_node, role, peers))
        try:
            self._node = await asyncio.shield(building)
        except asyncio.CancelledError:
            # the thread builds the node anyway: keep it, so that stop() stops it
            self._node = await building
            raise
        if founding and not peers:
            # The founder of a new cluster is its only voter: nobody else can lead, so it
            # stands now instead of after an election timeout (0.6-1.4 s that every
            # rack waiting to join would wait too).
            self._node.stand_at_once()
        elif founding:
            # A founder with founding voters: stand as soon as a majority is connected.
            self._node.stand_when_quorum_connected()
        self._role = role
        await asyncio.to_thread(
            self._write_role, role, peers + ([self.settings.address] if role == "voter" else [])
        )
        self._node.start()
        log.info(
            "raft: rack %s runs as a %s (peers %s)",
            self.settings.rack.name,
            role,
            ", ".join(peers) or "none",
        )

    async def _stop_node(self) -> None:
        node, self._node = self._node, None
        if node is not None:
            await asyncio.to_thread(node.stop)

    def _build_node(self, role: str, peers: list[str]) -> HardenedSyncObj:
        s = self.settings
        if role == "voter":
            _check_bindable(s.rack.address, s.rack.raft_port)
        machine = PlacementMachine(on_apply=self._on_apply)
        node = HardenedSyncObj(
            s.address if role == "voter" else None,
            [p for p in peers if p != s.address],
            make_conf(s, self.directory / "dump"),
            [machine],
            journal_path=str(self.directory / "journal"),
            hardening=s.hardening,
            source_address=s.rack.address,
            on_tick=self._on_tick,
            command_filter=self._stamp,
        )
        self._machine = machine
        return node

    # -- the tick thread side ------------------------------------------------------------------
    def _on_tick(self, node: HardenedSyncObj) -> None:
        """Runs in the Raft thread after every tick: publish the view and the map."""
        view = node.raft_view()
        before, self._view = self._view, view
        if before is None or any(before[k] != view[k] for k in ("leader", "is_leader", "voters")):
            # the reconciler acts on the leader and the voters: wake it (see _reconcile_loop)
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._notify)
        machine = self._machine
        if machine is None or node is not self._node:
            return
        self._publish(machine.state)

    def _on_apply(self, state: PlacementState, result: dict[str, Any]) -> None:
        """Runs in the Raft thread after each command, before its proposer hears back."""
        self._publish(state)

    def _publish(self, current: PlacementState) -> None:
        published = self._published
        if current is published or current.revision < published.revision:
            return
        if current.revision == published.revision and current == published:
            return
        self._published = current
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _changed(self) -> asyncio.Event:
        return self._event

    def _stamp(self, text: str) -> str:
        """Leader side: a lease renewal's receipt time, leader and term are the leader's."""
        if '"lease_renew"' not in text:
            return text
        command = json.loads(text)
        if command.get("op") != "lease_renew":
            return text
        node = self._node
        command["received_at"] = clock.now()
        command["leader"] = self.settings.rack.name
        command["term"] = int(node.raftCurrentTerm) if node is not None else 0
        return json.dumps(command, sort_keys=True, separators=(",", ":"), allow_nan=False)

    # -- reading ---------------------------------------------------------------------------------
    def state(self) -> PlacementState:
        return self._published

    def status(self) -> StoreStatus:
        view = self._view or {}
        state = self._published
        by_address = {
            f"{r.address}:{r.raft_port}": r.name for r in state.racks.values() if r.address
        }
        me = self.settings.address
        connected = set(view.get("connected", ()))
        voters = set(view.get("voters", ()))
        members = []
        for address in sorted(voters | set(by_address)):
            members.append(
                MemberStatus(
                    name=by_address.get(address, address),
                    address=address,
                    voter=address in voters,
                    connected=address == me or address in connected,
                )
            )
        leader = view.get("leader")
        return StoreStatus(
            rack=self.settings.rack.name,
            role=self._role if self._node is not None else "stopped",
            leader=by_address.get(leader, leader) if leader else None,
            term=int(view.get("term", 0)),
            commit_index=int(view.get("commit_index", 0)),
            last_applied=int(view.get("last_applied", 0)),
            revision=state.revision,
            members=tuple(members),
            recovering=bool(view.get("recovering", False)),
        )

    # -- writing ---------------------------------------------------------------------------------
    async def propose(
        self, command: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        text = encode_command(command)
        result = await self._submit(lambda m, cb: m.apply_json(text, callback=cb), timeout_s)
        return dict(raise_for_result(result))

    async def _submit(self, send: Any, timeout_s: float | None) -> Any:
        limit = self.settings.propose_timeout_s if timeout_s is None else timeout_s
        if self._node is None and self._converting:
            # restarting as a voter or a follower takes a moment: wait for it, not fail
            await wait_event(self._node_back, limit)
        node, machine = self._node, self._machine
        if node is None or machine is None:
            raise Unavailable(f"the Raft store of rack {self.settings.rack.name} is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def settle(result: Any, error: int) -> None:
            if not future.done():
                future.set_result((result, error))

        def callback(result: Any, error: int) -> None:  # runs in the Raft thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, error)

        send(machine, callback)
        node.wake()
        try:
            result, error = await within(future, limit)
        except TimeoutError:
            raise Unavailable(
                f"not committed within {limit} s: rack {self.settings.rack.name} cannot reach a"
                " Raft leader with a quorum; retry later (the command may still commit: re-read"
                " the map before retrying)"
            ) from None
        if error != FAIL_REASON.SUCCESS:
            reason = _FAILURES.get(error, f"outcome unknown: pysyncobj error {error}")
            raise Unavailable(f"{reason}; retry later")
        return result

    async def _membership(self, action: str, address: str) -> bool:
        node = self._node
        if node is None:
            return False

        def send(_machine: Any, cb: Any) -> None:
            if action == "add":
                node.addNodeToCluster(address, callback=cb)
            else:
                node.removeNodeFromCluster(address, callback=cb)

        try:
            await self._submit(send, self.settings.propose_timeout_s)
        except Unavailable as exc:
            log.info("raft: could not %s voter %s: %s", action, address, exc)
            return False
        log.info("raft: %s voter %s: done", "added" if action == "add" else "removed", address)
        return True

    # -- reconciling Raft membership with the map ------------------------------------------
    async def _reconcile_loop(self) -> None:
        """Reconcile every period, and at once when the map, the leader or the voters change.

        Waking on changes lets a joining rack propose its ``rack_join`` as soon as
        ``cluster_init`` lands, instead of one period later. Role changes and Raft
        membership changes keep the period's pace (only on the periodic rounds): a
        rack restarting its node cannot take writes for a moment, and pysyncobj
        needs one membership change to settle before the next (docs/raft.md).
        """
        loop = asyncio.get_running_loop()
        last_round = -1e9
        while True:
            changed = self._changed()
            self._membership_changed = False
            periodic = loop.time() - last_round >= self.settings.reconcile_period_s
            if periodic:
                last_round = loop.time()
            try:
                await self._reconcile_once(periodic)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("raft: reconcile failed; retrying")
            if self._membership_changed:
                await asyncio.sleep(self.settings.reconcile_period_s)
                continue
            await wait_event(changed, self.settings.reconcile_period_s)

    async def _try(self, command: Mapping[str, Any]) -> None:
        try:
            await self.propose(command)
        except Exception as exc:  # retried on the next round
            log.debug("raft: %s not done yet: %s", command.get("op"), exc)

    async def _reconcile_once(self, periodic: bool = True) -> None:
        view, state, s = self._view, self._published, self.settings
        if view is None or self._node is None:
            return
        name = s.rack.name
        if not state.cluster_id:
            # The founder names the first voters; with founding voters, whoever of them
            # leads commits it (the founder's command goes to the leader).
            if s.found and self._role == "voter" and (view["is_leader"] or s.founding_voters):
                await self._try(
                    {"op": "cluster_init", "cluster_id": s.cluster_id or name,
                     "max_voters": s.max_voters, "voters": list(s.founding_voters or (name,))}
                )  # fmt: skip
            return
        current = state.racks.get(name)
        # drained is the operators' to set (API drain/undrain): a rejoin keeps it
        wanted = s.rack if current is None else replace(s.rack, drained=current.drained)
        if current != wanted:
            await self._try({"op": "rack_join", "rack": wanted.to_dict()})
            return
        if not periodic:
            return  # role and membership changes: on the periodic rounds only
        wanted_voter = name in state.voters
        if self._role == "follower" and wanted_voter:
            log.info("raft: the map names rack %s a voter: restarting as a voter", name)
            await self._convert("voter", view)
            return
        if self._role == "voter" and not wanted_voter:
            log.info(
                "raft: the map no longer names rack %s a voter: restarting as a follower", name
            )
            await self._convert("follower", view)
            return
        if sorted(view["voters"]) != self._saved_peers:
            await asyncio.to_thread(self._remember_peers, view)
        if self._role == "voter" and view["is_leader"] and not self._membership_busy:
            await self._reconcile_voters(view, state)

    def _remember_peers(self, view: Mapping[str, Any]) -> None:
        peers = sorted(view["voters"])
        if peers != self._saved_peers:
            self._write_role(self._role, peers)
            self._saved_peers = peers

    async def _reconcile_voters(self, view: Mapping[str, Any], state: PlacementState) -> None:
        me = self.settings.address
        desired = {
            f"{r.address}:{r.raft_port}"
            for v in state.voters
            if (r := state.racks.get(v)) is not None and r.address and r.raft_port
        }
        actual = set(view["voters"])
        to_add = sorted(desired - actual)
        to_remove = sorted(actual - desired - {me})
        if any(
            (r := state.racks.get(v)) is None or not r.address or not r.raft_port
            for v in state.voters
        ):
            # A voter the map names has not joined yet (a founding voter still starting):
            # its address is not in the map, so it cannot be told from a stale one.
            to_remove = []
        if not to_add and not to_remove:
            return
        self._membership_busy = True
        self._membership_changed = True
        try:
            if to_add:
                await self._membership("add", to_add[0])
            else:
                await self._membership("remove", to_remove[0])
        finally:
            self._membership_busy = False

    async def _convert(self, role: str, view: Mapping[str, Any]) -> None:
        peers = sorted(set(view["voters"]) - {self.settings.address})
        self._membership_changed = True
        self._converting = True
        self._node_back.clear()
        try:
            await self._stop_node()
            await self._start_node(role, peers)
        finally:
            self._converting = False
            self._node_back.set()


def read_dump_state(dump_path: Path) -> PlacementState:
    """The map stored in a full-dump file (for offline inspection and tests)."""
    import gzip

    with gzip.open(dump_path, "rb") as handle:
        data = pickle.load(handle)  # noqa: S301 - our own file, written by this rack
    payload = data[0]
    return PlacementState.from_dict(payload[1]["state"])
