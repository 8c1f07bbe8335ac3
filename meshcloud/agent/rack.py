"""The rack's agent loop: one snapshot in, one reason out, the actions executed.

Each cycle reads the placement map ONCE (``store.snapshot()``) and the
hypervisor's domains once, asks the pure
:func:`meshcloud.core.reconcile.reconcile` for ``(reason, actions)``, logs
the reason (and publishes it as an event when it changes), then executes
the actions in order through :class:`meshcloud.agent.executor.ActionExecutor`.
A cycle runs when the map changes, when the hypervisor reports a lifecycle
event, and at least every ``period_s``.

Crashes: the agent remembers which appliances it started (and under which
epoch). One that is found stopped without the agent asking, or for which
the hypervisor reports a crash, is recorded in :class:`CrashBook`; the
reconcile rules then restart it in place with back-off, and after
``max_restarts`` report it once as failed. A start that fails (image
missing or corrupt, hypervisor error) is retried with its own back-off.

Planned moves (meshcloud/core/moves.py, docs/failover.md#planned-moves): on
the old primary, a ``HandOver`` action pauses the guest, runs the
replication engine's final sync to the target beside the loop and commits
``move_synced`` (or ``move_abandon`` with the reason, and the guest resumes);
on the target, once the guest runs, the agent commits ``move_done`` with the
downtime and says it in an event.

After a power cut the agent starts from nothing: it knows no crash, and
reconcile starts exactly what the map assigns here under the map's epoch.
Domains of appliances the map moved elsewhere stay stopped (their disks
refuse the old epoch anyway); domains of appliances deleted from the map
are undefined and their volumes moved aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from meshcloud.agent.executor import ActionExecutor
from meshcloud.agent.hooks import CycleHooks
from meshcloud.aio import wait_event
from meshcloud.clock import now as clock_now
from meshcloud.core.errors import MeshcloudError, ReplicationError
from meshcloud.core.models import ApplianceState, Assignment, ClusterSnapshot, MovePhase
from meshcloud.core.reconcile import (
    ACTIVE,
    LIVE,
    Action,
    CrashHistory,
    Decision,
    Destroy,
    DomainState,
    HandOver,
    LeaseView,
    LocalDomain,
    Pause,
    ReportFailed,
    RestartPolicy,
    Resume,
    Start,
    Stop,
    reconcile,
)
from meshcloud.core.state import PlacementState
from meshcloud.hypervisor.base import DomainInfo, EventKind, Hypervisor, LifecycleEvent
from meshcloud.raft.store import PlacementStore
from meshcloud.replication.engine import ReplicationDuty, ReplicationEngine

log = logging.getLogger("meshcloud.agent")

EventSink = Callable[[str, str, "str | None"], None]  # (kind, message, appliance)
SHORT_ROOTS = Path("/run/meshcloud/lv")
_NUMBER_RE = re.compile(r"\d+\.\d+")  # durations ("for 0.3 s"), not names or epochs
_STOPPED_BY_ITSELF = frozenset({"shutdown", "crashed", "failed"})


# -- the embedded libvirt root's path length ----------------------------------------


def short_embed_uri(uri: str, links: Path = SHORT_ROOTS, max_len: int = 48) -> str:
    """``uri`` with an embedded root short enough for QEMU's socket paths.

    QEMU's monitor socket lives under the root and a UNIX socket path holds
    at most 107 bytes, so the adapter refuses roots over 48 characters. A
    longer root (a lab's state directory) is reached through a symlink
    ``/run/meshcloud/lv/<hash of the root>`` instead; other URIs pass unchanged.
    """
    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.path != "/embed":
        return uri
    roots = parse_qs(parts.query).get("root", [])
    if len(roots) != 1 or len(roots[0]) <= max_len:
        return uri
    root = Path(roots[0])
    root.mkdir(parents=True, exist_ok=True)
    links.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in links.iterdir():  # roots of labs that are gone
        if stale.is_symlink() and not stale.exists():
            stale.unlink(missing_ok=True)
    link = links / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    if link.is_symlink() and Path(link.readlink()) != root:
        link.unlink()
    if not link.is_symlink():
        tmp = link.with_name(link.name + ".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(root)
        tmp.replace(link)
    return f"qemu:///embed?root={link}"


# -- crash bookkeeping (no I/O; time passed in) -----------------------------------------


@dataclass
class CrashBook:
    """Which appliances the agent believes run here, and the crashes it saw."""

    histories: dict[str, CrashHistory] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)  # appliance -> epoch it was started

    def started(self, appliance: str, epoch: int) -> None:
        self.running[appliance] = epoch

    def forget(self, appliance: str) -> None:
        """The agent itself stops it: whatever happens to it next is no crash."""
        self.running.pop(appliance, None)

    def crashed(self, appliance: str, now: float) -> bool:
        """Record a crash of an appliance the agent started; False if it was not running."""
        epoch = self.running.pop(appliance, None)
        if epoch is None:
            return False
        old = self.histories.get(appliance)
        if old is None or old.epoch != epoch:
            old = CrashHistory(epoch)
        self.histories[appliance] = replace(old, crash_times=(*old.crash_times[-63:], now))
        return True

    def observe(self, domains: Mapping[str, LocalDomain], now: float) -> list[str]:
        """Appliances the agent started that are found stopped: crashes. Returns them."""
        gone = []
        for appliance in sorted(self.running):
            dom = domains.get(appliance)
            if (dom is None or dom.state not in LIVE) and self.crashed(appliance, now):
                gone.append(appliance)
        return gone

    def on_event(self, event: LifecycleEvent, now: float) -> bool:
        """A lifecycle event; True if it was a crash of an appliance the agent started."""
        stopped = event.kind is EventKind.STOPPED and event.detail in _STOPPED_BY_ITSELF
        if stopped or event.kind is EventKind.CRASHED:
            return self.crashed(event.appliance, now)
        return False

    def reported(self, appliance: str) -> None:
        old = self.histories.get(appliance)
        if old is not None:
            self.histories[appliance] = replace(old, reported=True)

    def prune(self, appliances: Mapping[str, object]) -> None:
        """Forget histories of appliances that no longer exist."""
        for name in list(self.histories):
            if name not in appliances:
                del self.histories[name]


@dataclass
class _StartFailure:
    count: int
    last_at: float
    message: str


@dataclass(frozen=True)
class AgentSettings:
    period_s: float = 1.0
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    start_retry_initial_s: float = 2.0
    start_retry_max_s: float = 30.0


def local_domains(infos: Mapping[str, DomainInfo]) -> dict[str, LocalDomain]:
    """The hypervisor's DomainInfo records as reconcile's LocalDomain."""
    return {
        name: LocalDomain(name, DomainState(str(info.state)), info.epoch)
        for name, info in infos.items()
    }


def _gist(sentence: str) -> str:
    return _NUMBER_RE.sub("#", sentence)


def _revision_other_than(revision: int) -> Callable[[PlacementState], bool]:
    return lambda state: state.revision != revision


def replication_duties(
    rack: str, snapshot: ClusterSnapshot, domains: Mapping[str, LocalDomain] | None = None
) -> dict[str, ReplicationDuty]:
    """What the replication engine must do as primary here, from the map.

    With ``domains``, only appliances whose VM is live here under the map's
    epoch: the engine must not freeze an appliance between the moment the
    agent asked for its disk paths and the moment its VM starts on them.
    """
    duties = {}
    for name, asg in snapshot.assignments.items():
        spec = snapshot.appliances.get(name)
        if asg.primary != rack or asg.state is not ApplianceState.RUNNING or spec is None:
            continue
        if asg.moving:
            continue  # the handover runs its own final sync; no cycle may freeze after it
        if not spec.disks:
            continue
        if domains is not None:
            dom = domains.get(name)
            if dom is None or dom.state not in LIVE or dom.epoch != asg.epoch:
                continue
        duties[name] = ReplicationDuty(name, asg.epoch, spec.priority, asg.replicas)
    return duties


class RackAgent:
    """The control loop of one rack (see the module docstring)."""

    def __init__(
        self,
        rack: str,
        store: PlacementStore,
        hypervisor: Hypervisor,
        executor: ActionExecutor,
        *,
        settings: AgentSettings | None = None,
        lease_view: Callable[[], LeaseView] | None = None,
        engine: ReplicationEngine | None = None,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = clock_now,
        hooks: CycleHooks | None = None,
    ) -> None:
        self.rack = rack
        self.store = store
        self.hv = hypervisor
        self.executor = executor
        self.settings = settings or AgentSettings()
        # The daemon passes LeaseKeeper.view; without one (tests) the lease counts as held.
        self.lease_view = lease_view or LeaseView.holding
        self.engine = engine
        self.on_event = on_event
        self.clock = clock
        self.hooks = hooks or CycleHooks()
        self.book = CrashBook()
        self.start_failures: dict[str, _StartFailure] = {}
        self.last_reason = ""
        self.cycles = 0
        self._wake = asyncio.Event()
        self._known_appliances: set[str] = set()
        self._to_forget: set[str] = set()
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._handovers: dict[str, asyncio.Task[None]] = {}
        self._handed_over: set[tuple[str, int]] = set()  # (appliance, epoch) synced here
        self._runs: dict[str, int] = {}  # appliance -> starts and resumes done here (handovers)
        self.wall_clock: Callable[[], float] = time.time  # move downtimes (a hint across racks)

    # -- running -------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Cycle until cancelled."""
        watchers = [
            asyncio.create_task(self._watch_map(), name=f"agent-{self.rack}-map"),
            asyncio.create_task(self._watch_hypervisor(), name=f"agent-{self.rack}-events"),
        ]
        try:
            while True:
                self._wake.clear()
                try:
                    await self.cycle()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one bad cycle must not end the rack's agent
                    log.exception("agent cycle failed: %s", exc)
                    self._emit("agent", f"agent cycle failed: {exc}; retrying", None)
                timeout = self.settings.period_s
                due = self.hooks.wake_in()
                if due is not None:  # be awake when the lease runs out: pause at once
                    timeout = min(timeout, max(0.005, due + 0.005))
                await wait_event(self._wake, timeout)
        finally:
            tasks = [*watchers, *self._stops.values(), *self._handovers.values()]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _watch_map(self) -> None:
        seen = -1
        while True:
            with contextlib.suppress(MeshcloudError):
                state = await self.store.wait_for(_revision_other_than(seen), timeout_s=60.0)
                seen = state.revision
                self.wake()

    async def _watch_hypervisor(self) -> None:
        with self.hv.subscribe() as events:
            async for event in events:
                if self.book.on_event(event, self.clock()):
                    log.warning(
                        "appliance %s stopped by itself (%s)", event.appliance, event.detail
                    )
                self.wake()

    # -- one cycle -------------------------------------------------------------------

    async def cycle(self) -> Decision:
        """Read, decide, act: one cycle. Returns the decision (for tests and the API)."""
        domains = local_domains(await self.hv.async_list())
        # The lease first, then the map, with no await between: a lease held now rests on a
        # renewal this rack has applied, so the map read next holds every move committed
        # before it (a move away from this rack cannot commit while its lease runs).
        lease = self.lease_view()
        snapshot = self.store.snapshot()
        now = self.clock()
        for name in self.book.observe(domains, now):
            log.warning("appliance %s is no longer running and nobody stopped it", name)
        self.book.prune(snapshot.appliances)
        decision = reconcile(
            self.rack,
            snapshot,
            domains,
            lease,
            self.book.histories,
            now,
            self.settings.policy,
        )
        self.hooks.lease_seen(lease.held)
        if self.engine is not None:
            self.engine.set_duties(replication_duties(self.rack, snapshot, domains))
        outcomes = []
        for action in decision.actions:
            if isinstance(action, Start | Resume):
                self.hooks.may_run()
            outcome = await self._execute(action, snapshot)
            if outcome:
                outcomes.append(outcome)
        if not lease.held:
            after = await self.hv.async_list()
            if not any(DomainState(str(info.state)) in ACTIVE for info in after.values()):
                self.hooks.nothing_runs()
        elif any(d.state in ACTIVE for d in domains.values()):
            self.hooks.may_run()  # VMs run with the lease: keep them guarded (a daemon restart)
        forgotten = await self._forget_deleted(snapshot, domains)
        outcomes.extend(forgotten)
        sentence = "; ".join([decision.reason, *outcomes])
        self._report(sentence, bool(decision.actions or outcomes))
        self.cycles += 1
        return Decision(sentence, decision.actions)

    def _report(self, sentence: str, acted: bool) -> None:
        """Log the cycle's sentence; publish it as an event when its gist changed.

        "no lease for 0.3 s" and "no lease for 0.5 s" have the same gist: the durations
        are left out of the comparison so that a waiting rack does not
        flood the event log once per cycle.
        """
        gist = _gist(sentence)
        if gist == _gist(self.last_reason) and not acted:
            log.debug("%s", sentence)
            return
        log.info("%s", sentence)
        if gist != _gist(self.last_reason):
            self._emit("agent", sentence, None)
        self.last_reason = sentence

    def _emit(self, kind: str, message: str, appliance: str | None) -> None:
        if self.on_event is not None:
            self.on_event(kind, message, appliance)

    async def _execute(self, action: Action, snapshot: ClusterSnapshot) -> str:
        """Run one action; return a clause for the cycle's sentence when it did not go as planned."""
        name = action.appliance
        try:
            if isinstance(action, Start):
                return await self._start(action, snapshot)
            if isinstance(action, Stop):
                self.book.forget(name)
                self._stop_in_background(name)
            elif isinstance(action, Destroy):
                self.book.forget(name)
                await self.executor.async_destroy(name)
            elif isinstance(action, HandOver):
                self._hand_over_in_background(action)
            elif isinstance(action, Pause):
                await self.executor.async_pause(name)
            elif isinstance(action, Resume):
                self._runs[name] = self._runs.get(name, 0) + 1
                await self.executor.async_resume(name)
                self.book.started(name, action.epoch)
            elif isinstance(action, ReportFailed):
                self.book.reported(name)
                self._emit(
                    "appliance-failed",
                    f"{name} crashed {action.crashes} times on {self.rack} under epoch"
                    f" {action.epoch}; it stays stopped here until an operator acts"
                    " (redeploy it, or drain this rack)",
                    name,
                )
        except MeshcloudError as exc:
            return f"{type(action).__name__.lower()} of {name} failed: {exc}"
        return ""

    def _stop_in_background(self, name: str) -> None:
        """A graceful stop waits for the guest (up to its timeout): never block the cycle on it.

        Meanwhile the cycles go on, so that a lost lease still pauses everything at once.
        """
        running = self._stops.get(name)
        if running is not None and not running.done():
            return
        self._stops[name] = asyncio.create_task(self._stop(name), name=f"agent-stop-{name}")

    async def _stop(self, name: str) -> None:
        try:
            await self.executor.async_stop(name)
        except MeshcloudError as exc:
            log.warning("stopping %s failed: %s", name, exc)
            self._emit("stop-failed", f"stopping {name} on {self.rack} failed: {exc}", name)
        finally:
            self.wake()

    async def settle(self) -> None:
        """Wait for the stops and handovers in flight (tests; the loop itself never waits)."""
        await asyncio.gather(
            *self._stops.values(), *self._handovers.values(), return_exceptions=True
        )

    # -- planned moves ------------------------------------------------------------------

    def _hand_over_in_background(self, action: HandOver) -> None:
        """The final sync takes seconds: run it beside the loop (fencing must not wait)."""
        name = action.appliance
        running = self._handovers.get(name)
        if (running is not None and not running.done()) or (
            name,
            action.epoch,
        ) in self._handed_over:
            return
        self._handovers[name] = asyncio.create_task(
            self._hand_over(action), name=f"agent-handover-{name}"
        )

    async def _hand_over(self, action: HandOver) -> None:
        """Pause, final sync to the target, ``move_synced``; on failure abandon and resume."""
        name, epoch, to = action.appliance, action.epoch, action.to
        try:
            if self.engine is None:
                raise ReplicationError("this rack runs no replication engine")
            infos = await self.hv.async_list()
            info = infos.get(name)
            if info is not None and DomainState(str(info.state)) in ACTIVE:
                await self.executor.async_pause(name)
            paused_at = self.wall_clock()
            runs = self._runs.get(name, 0)
            t0 = self.clock()
            report = await self.engine.async_final_sync(name, epoch, (to,))
            sync_s = self.clock() - t0
            if self._runs.get(name, 0) != runs:
                # The move was abandoned meanwhile and the guest ran again here: this sync is
                # stale and must never be reported (a new handover pauses and syncs afresh).
                log.warning("%s ran again during its final sync to %s: not reporting it", name, to)
                return
            command = {
                "op": "move_synced", "appliance": name, "epoch": epoch, "rack": self.rack,
                "generation": report.generation, "paused_at": paused_at,
            }  # fmt: skip
            await self._propose_with_retries(command)
            self._handed_over.add((name, epoch))
            self._emit(
                "move",
                f"{name} paused on {self.rack} and its last writes shipped to {to} (generation"
                f" {report.generation}, {report.data_bytes} bytes, {sync_s:.2f} s); waiting for"
                " the switch",
                name,
            )
        except asyncio.CancelledError:
            raise
        except MeshcloudError as exc:
            why = f"final sync of {name} to {to} failed: {exc}"
            log.warning("%s", why)
            try:
                await self._propose_with_retries(
                    {"op": "move_abandon", "appliance": name, "epoch": epoch,
                     "reason": f"{why}"[:400] + f"; {name} resumes on {self.rack}"}
                )  # fmt: skip
            except MeshcloudError as again:
                log.warning("could not abandon the move of %s (%s): the leader will", name, again)
            self._emit(
                "move-abandoned",
                f"{why}; the move is abandoned and {name} resumes on {self.rack}",
                name,
            )
        finally:
            self.wake()

    async def _propose_with_retries(self, command: dict[str, object], attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                await self.store.propose(command, timeout_s=5.0)
                return
            except MeshcloudError:
                if attempt == attempts - 1:
                    raise

    async def _report_move_done(self, name: str, asg: Assignment) -> None:
        """The guest runs here after a planned move: record and say the downtime."""
        move = asg.move
        if move is None or move.phase is not MovePhase.SWITCHED or move.to != self.rack:
            return
        down = None if move.paused_at is None else max(0.0, self.wall_clock() - move.paused_at)
        if down is not None:
            command = {
                "op": "move_done", "appliance": name, "epoch": asg.epoch, "rack": self.rack,
                "downtime_s": round(down, 3),
            }  # fmt: skip
            try:
                await self._propose_with_retries(command)
            except MeshcloudError as exc:
                log.warning("could not record the downtime of %s's move: %s", name, exc)
        said = f"down {down:.2f} s" if down is not None else "downtime unknown"
        self._emit(
            "move",
            f"moved {name} from {move.source} to {self.rack} without losing a write: {said}"
            f" from the pause on {move.source} to running here (generation {move.generation})",
            name,
        )

    async def _start(self, action: Start, snapshot: ClusterSnapshot) -> str:
        name = action.appliance
        now = self.clock()
        failure = self.start_failures.get(name)
        if failure is not None:
            s = self.settings
            wait_s = min(s.start_retry_initial_s * 2 ** (failure.count - 1), s.start_retry_max_s)
            if now < failure.last_at + wait_s:
                left = failure.last_at + wait_s - now
                return f"start of {name} retried in {left:.0f} s (it failed: {failure.message})"
        # The map may have moved on since this cycle read it: never start under an old epoch.
        latest = self.store.snapshot().assignments.get(name)
        if latest is None or latest.primary != self.rack or latest.epoch != action.epoch:
            return f"not starting {name}: the map changed meanwhile"
        spec = snapshot.appliances.get(name)
        if spec is None:
            return f"not starting {name}: its spec is gone"
        self._runs[name] = self._runs.get(name, 0) + 1
        try:
            await self.executor.async_start(spec, action.epoch, snapshot.cluster_id)
        except MeshcloudError as exc:
            count = failure.count + 1 if failure is not None else 1
            self.start_failures[name] = _StartFailure(count, now, str(exc))
            self._emit("start-failed", f"starting {name} on {self.rack} failed: {exc}", name)
            return f"start of {name} failed: {exc}"
        self.start_failures.pop(name, None)
        self.book.started(name, action.epoch)
        await self._report_move_done(name, latest)
        return ""

    async def _forget_deleted(
        self, snapshot: ClusterSnapshot, domains: Mapping[str, LocalDomain]
    ) -> list[str]:
        """Undefine stopped VMs of deleted appliances and move their volumes aside.

        Candidates: appliances this agent saw in an earlier map and not in this one, and
        VMs of appliances the map does not know (a map only moves forward, so those were
        deleted). A VM still live at the start of the cycle waits for the next cycle.
        """
        known = set(snapshot.appliances)
        self._to_forget |= self._known_appliances - known
        self._to_forget |= {n for n in domains if n not in known}
        self._to_forget -= known  # deployed again meanwhile
        self._known_appliances = known
        clauses = []
        for name in sorted(self._to_forget):
            dom = domains.get(name)
            if dom is not None and dom.state in LIVE:
                continue
            self.start_failures.pop(name, None)
            try:
                where = await self.executor.async_forget(name)
            except MeshcloudError as exc:
                clauses.append(f"cleaning up deleted {name} failed: {exc}")
                continue
            self._to_forget.discard(name)
            if where is not None:
                clauses.append(f"{name} was deleted: its volumes were moved to {where}")
        return clauses
