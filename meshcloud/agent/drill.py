"""The fire drill on a live cluster (docs/drill.md): every rack's part, and the drill's runner.

- :class:`DrillWatcher` runs on every rack. When the map's drill names this
  rack as the one cut, it holds its lease renewals (``LeaseKeeper.hold``)
  and fences its replication at once, as a cut-off rack would, and records
  each replica's lag at that moment; its lease then runs out and the agent
  pauses its appliances the usual way. On its own clock it ends the cut
  after ``MAX_CUT_S`` even if nobody ends the drill. On the rack that runs
  the drilled appliance again it records that, once the hypervisor shows it
  running.
- :class:`DrillRunner` runs one drill from the rack whose API was asked:
  check (no side effects), cut, wait for the leader's decision and the
  restart, restore, report. It times every step on this rack's monotonic
  clock by watching the map commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshcloud.core.drill import Drill, DrillPlan, Timeline, check_drill, choose_appliance, figures
from meshcloud.core.drill import step as drill_step
from meshcloud.core.errors import Conflict, MeshcloudError, NotFound, Unavailable
from meshcloud.core.leases import LeaseTimers
from meshcloud.core.names import validate_name
from meshcloud.core.state import PlacementState
from meshcloud.raft.store import PlacementStore

log = logging.getLogger("meshcloud.drill")

EventSink = Callable[[str, str, "str | None"], None]
MAX_CUT_S = 300.0  # a cut rack renews again after this, whatever the map says
RUNNING_POLL_S = 0.1
RESTART_TIMEOUT_S = 180.0
REJOIN_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
MOVE_BACK_TIMEOUT_S = 180.0


class DrillWatcher:
    """This rack's part in any drill (see the module docstring)."""

    def __init__(
        self,
        rack: str,
        store: PlacementStore,
        *,
        on_cut: Callable[[], None] | None = None,
        lags: Callable[[], dict[str, dict[str, float]]] | None = None,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rack = rack
        self.store = store
        self.on_cut = on_cut
        self.lags = lags
        self.on_event = on_event
        self.clock = clock
        self.hv: Any = None  # the hypervisor adapter, once the agent opened it
        self._cut: tuple[str, float] | None = None  # (drill id, when this rack saw it)
        self._timed_out: set[str] = set()
        self._reported_running: set[str] = set()

    def holding(self) -> bool:
        """Whether this rack plays cut off now (no renewals, no replication)."""
        if self._cut is None:
            return False
        if self.clock() - self._cut[1] > MAX_CUT_S:
            self._timed_out.add(self._cut[0])
            self._emit(f"drill {self._cut[0]}: cut for {MAX_CUT_S:.0f} s; renewing again")
            self._cut = None
            return False
        return True

    def _emit(self, message: str, appliance: str | None = None) -> None:
        log.info("%s", message)
        if self.on_event is not None:
            self.on_event("drill", message, appliance)

    async def run(self) -> None:
        revision = -1

        def changed(s: PlacementState) -> bool:
            return s.revision != revision

        while True:
            with contextlib.suppress(MeshcloudError):
                state = await self.store.wait_for(changed, timeout_s=RUNNING_POLL_S * 5)
                revision = state.revision
            try:
                await self.observe(self.store.state())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watcher must outlive a bad cycle
                log.warning("drill watcher: %s", exc)
            if self._pending_running():
                await asyncio.sleep(RUNNING_POLL_S)

    def _pending_running(self) -> bool:
        drill = self.store.state().drill
        if drill is None or drill.running_on or drill.id in self._reported_running:
            return False
        asg = self.store.state().assignments.get(drill.appliance)
        return asg is not None and asg.primary == self.rack and asg.epoch > drill.epoch

    async def observe(self, state: PlacementState) -> None:
        """React to the map's drill: begin or end this rack's cut, report a restart here."""
        drill = state.drill
        cut_now = (
            drill is not None
            and drill.rack == self.rack
            and drill.fenced
            and drill.id not in self._timed_out
        )
        if cut_now and self._cut is None:
            assert drill is not None
            self._cut = (drill.id, self.clock())
            if self.on_cut is not None:
                self.on_cut()  # stop shipping now, as a cut link would
            self._emit(
                f"drill {drill.id}: rack {self.rack} plays cut off: it stops renewing its lease"
                " and replicating; its appliances pause when the lease runs out",
                drill.appliance,
            )
            lags = (self.lags() if self.lags is not None else {}).get(drill.appliance, {})
            with contextlib.suppress(MeshcloudError):
                await self.store.propose(
                    {"op": "drill_update", "id": drill.id, "lag_at_cut_s": lags}
                )
        elif not cut_now and self._cut is not None:
            self._emit(f"drill {self._cut[0]}: the cut of {self.rack} ends: renewing again")
            self._cut = None
        if drill is not None and self._pending_running() and await self._runs_here(drill):
            epoch = state.assignments[drill.appliance].epoch
            self._reported_running.add(drill.id)
            self._emit(
                f"drill {drill.id}: {drill.appliance} runs again here on {self.rack}"
                f" (epoch {epoch})",
                drill.appliance,
            )
            with contextlib.suppress(MeshcloudError):
                await self.store.propose(
                    {
                        "op": "drill_update",
                        "id": drill.id,
                        "running_on": self.rack,
                        "running_epoch": epoch,
                    }
                )

    async def _runs_here(self, drill: Drill) -> bool:
        if self.hv is None:
            return False
        infos = await self.hv.async_list()
        info = infos.get(drill.appliance)
        return info is not None and str(info.state) == "running" and info.epoch > drill.epoch


# --- the runner --------------------------------------------------------------------------


@dataclass
class DrillRun:
    """One drill run from this rack: its report grows as it goes."""

    report: dict[str, Any]
    started_at: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.report.get("outcome") is not None


def new_drill_id() -> str:
    return f"drill-{secrets.token_hex(4)}"


class DrillRunner:
    """Runs drills asked through this rack's API (one at a time cluster-wide)."""

    def __init__(
        self,
        rack: str,
        store: PlacementStore,
        timers: LeaseTimers,
        *,
        leader_alive: Callable[[], frozenset[str] | None] = lambda: None,
        move: Callable[..., Any] | None = None,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rack = rack
        self.store = store
        self.timers = timers
        self.leader_alive = leader_alive
        self.move = move
        self.on_event = on_event
        self.clock = clock
        self.runs: dict[str, DrillRun] = {}

    # -- check ---------------------------------------------------------------------------

    async def live_racks(self) -> frozenset[str]:
        """Racks renewing their leases: the leader's view, or seen renewing in the map."""
        alive = self.leader_alive()
        if alive is not None:
            return alive
        before = {r: lease.issued_at for r, lease in self.store.state().leases.items()}

        def renewed(s: PlacementState) -> bool:
            return all(r in s.leases and s.leases[r].issued_at != before.get(r) for r in s.racks)

        with contextlib.suppress(Unavailable):
            await self.store.wait_for(renewed, timeout_s=self.timers.lease_s)
        state = self.store.state()
        return frozenset(
            r
            for r in state.racks
            if r in state.leases and state.leases[r].issued_at != before.get(r)
        )

    async def plan(self, appliance: str | None) -> DrillPlan:
        snap = self.store.snapshot()
        drill = self.store.state().drill
        if drill is not None:
            check_drill(snap, appliance or drill.appliance, frozenset(), drill_running=drill)
        live = await self.live_racks()
        snap = self.store.snapshot()
        if appliance is None:
            appliance = choose_appliance(snap, live, random.SystemRandom().randrange(1 << 30))
        return check_drill(
            snap,
            validate_name("appliance", appliance),
            live,
            leader=self.store.status().leader,
            drill_running=self.store.state().drill,
        )

    # -- run -----------------------------------------------------------------------------

    async def start(self, appliance: str | None, restore: bool = True) -> dict[str, Any]:
        """Check, then run a drill in the background; its report so far."""
        if any(not r.done for r in self.runs.values()):
            raise Conflict("a drill run from this rack is under way: wait for its report")
        plan = await self.plan(appliance)
        ident = new_drill_id()
        snap = self.store.snapshot()
        run = DrillRun(
            report={
                "id": ident,
                "cluster_id": snap.cluster_id,
                "by": self.rack,
                "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "appliance": plan.appliance,
                "priority": snap.appliances[plan.appliance].priority,
                "rack": plan.rack,
                "epoch": plan.epoch,
                "replicas": dict(plan.replicas),
                "also_affected": list(plan.also_affected),
                "notes": list(plan.notes),
                "restore": {"asked": restore},
                "timers": {
                    "renew_s": self.timers.renew_s,
                    "lease_s": self.timers.lease_s,
                    "margin_s": self.timers.margin_s,
                },
                "outcome": None,
            },
            started_at=self.clock(),
        )
        run.report["steps"] = run.steps
        self.runs = {k: v for k, v in self.runs.items() if not v.done or len(self.runs) < 20}
        self.runs[ident] = run
        run.task = asyncio.create_task(self._run(run, plan, restore), name=f"drill-{ident}")
        return run.report

    def status(self, ident: str | None = None) -> dict[str, Any]:
        """The map's drill, and this rack's run ``ident`` (or its latest) with its report."""
        drill = self.store.state().drill if self.store is not None else None
        run = self.runs.get(ident) if ident else None
        if ident is None and self.runs:
            run = list(self.runs.values())[-1]
        return {
            "current": None if drill is None else drill.to_dict(),
            "report": None if run is None else run.report,
        }

    async def end(self) -> dict[str, Any]:
        """End whatever drill the map holds (its cut rack renews again); the record ended."""
        drill = self.store.state().drill
        if drill is None:
            raise Conflict("no drill is under way")
        await self.store.propose({"op": "drill_end", "id": drill.id})
        self._say(None, f"drill {drill.id} ended by an operator; {drill.rack} renews again")
        return drill.to_dict()

    def _say(self, run: DrillRun | None, message: str, appliance: str | None = None) -> None:
        log.info("%s", message)
        if run is not None:
            run.steps.append(drill_step(self.clock() - run.started_at, message))
        if self.on_event is not None:
            self.on_event("drill", message, appliance)

    async def _wait(
        self, predicate: Callable[[PlacementState], bool], timeout_s: float, what: str
    ) -> PlacementState:
        try:
            return await self.store.wait_for(predicate, timeout_s=timeout_s)
        except Unavailable:
            raise Unavailable(f"{what} did not happen within {timeout_s:.0f} s") from None

    async def _run(self, run: DrillRun, plan: DrillPlan, restore: bool) -> None:
        ident, name, rack = run.report["id"], plan.appliance, plan.rack
        t = Timeline(cut_at=0.0)
        try:
            for note in plan.notes:
                self._say(run, f"drill {ident}: note: {note}", name)
            gens_at_cut = dict(self.store.state().generations.get(name, {}))
            drill = Drill(ident, name, rack, plan.epoch, self.rack)
            self._say(run, f"drill {ident}: cutting {rack} off (no lease renewals, no"
                      f" replication) to fail over {name}", name)  # fmt: skip
            await self.store.propose({"op": "drill_begin", "drill": drill.to_dict()})
            cut_at = self.clock()
            t = Timeline(cut_at=cut_at, generations_at_cut=gens_at_cut)
            self._say(run, f"drill {ident}: {rack} is cut; the leader should declare it lost"
                      f" after about {self.timers.lost_after_s:g} s", name)  # fmt: skip

            def moved(s: PlacementState) -> bool:
                a = s.assignments.get(name)
                return a is not None and a.primary not in (None, rack) and a.epoch > plan.epoch

            state = await self._wait(
                moved, self.timers.lost_after_s + RESTART_TIMEOUT_S, f"a failover of {name}"
            )
            asg = state.assignments[name]
            t = Timeline(
                cut_at=cut_at,
                decided_at=self.clock(),
                new_primary=asg.primary,
                new_epoch=asg.epoch,
                generations_at_cut=gens_at_cut,
                start_generation=state.generations.get(name, {}).get(asg.primary or ""),
            )
            self._say(run, f"drill {ident}: the leader declared {rack} lost and gave {name} to"
                      f" {asg.primary} (epoch {asg.epoch})", name)  # fmt: skip
            state = await self._wait(
                lambda s: s.drill is not None and s.drill.running_on != "",
                RESTART_TIMEOUT_S,
                f"{name} running on {asg.primary}",
            )
            assert state.drill is not None
            t = Timeline(
                cut_at=cut_at, decided_at=t.decided_at, running_at=self.clock(),
                new_primary=state.drill.running_on, new_epoch=state.drill.running_epoch,
                lag_at_cut_s=state.drill.lag_at_cut_s or {},
                generations_at_cut=gens_at_cut, start_generation=t.start_generation,
            )  # fmt: skip
            run.report["new_primary"] = t.new_primary
            # this rack's monotonic clock (comparable with other clocks on the same host only)
            run.report["clock"] = {
                "cut_at": cut_at, "decided_at": t.decided_at, "running_at": t.running_at
            }  # fmt: skip
            run.report["new_epoch"] = t.new_epoch
            run.report["figures"] = self._figures(t)
            f = run.report["figures"]
            self._say(run, f"drill {ident}: {name} runs on {t.new_primary}: RTO {f['rto_s']} s"
                      f" (detection {f['detect_s']} s, restart {f['restart_s']} s),"
                      f" RPO {f['rpo_s'] if f['rpo_s'] is not None else 'unknown'} s", name)  # fmt: skip
            await self._restore(run, plan, t, restore)
            run.report["outcome"] = "passed: the appliance ran again on another rack"
        except asyncio.CancelledError:
            run.report["outcome"] = "cancelled"
            raise
        except MeshcloudError as exc:
            run.report["outcome"] = f"failed: {exc}"
            self._say(run, f"drill {ident} failed: {exc}", name)
        finally:
            with contextlib.suppress(MeshcloudError):
                await self.store.propose({"op": "drill_end", "id": ident})
            if "figures" not in run.report:
                run.report["figures"] = self._figures(t) if t.cut_at else None
            run.report["duration_s"] = round(self.clock() - run.started_at, 3)
            self._say(run, f"drill {ident} over: {run.report['outcome']}", name)

    async def _next_revision(self, timeout_s: float = 2.0) -> None:
        revision = self.store.state().revision

        def changed(s: PlacementState) -> bool:
            return s.revision > revision

        with contextlib.suppress(Unavailable):
            await self.store.wait_for(changed, timeout_s=timeout_s)

    def _figures(self, t: Timeline) -> dict[str, Any]:
        tm = self.timers
        return figures(t, tm.lease_s, tm.margin_s, tm.renew_s)

    async def _restore(self, run: DrillRun, plan: DrillPlan, t: Timeline, move_back: bool) -> None:
        ident, name, rack = run.report["id"], plan.appliance, plan.rack
        restore = run.report["restore"]
        before = self.store.state().leases.get(rack)
        seen_diverged = set(self.store.state().diverged)
        await self.store.propose({"op": "drill_update", "id": ident, "fenced": False})
        self._say(run, f"drill {ident}: the cut ends; {rack} renews its lease again", name)

        def renewing(s: PlacementState) -> bool:
            lease = s.leases.get(rack)
            return lease is not None and (before is None or lease.issued_at != before.issued_at)

        await self._wait(renewing, REJOIN_TIMEOUT_S, f"{rack} renewing again")
        restore["rejoined"] = f"yes: {rack} renews its lease again"
        self._say(run, f"drill {ident}: {rack} rejoined: its lease is renewed again", name)

        def copy_settled(s: PlacementState) -> bool:
            if any(k not in seen_diverged and c.appliance == name and c.rack == rack
                   for k, c in s.diverged.items()):  # fmt: skip
                return True
            a = s.assignments.get(name)
            gens = s.generations.get(name, {})
            return (
                a is not None and rack in a.replicas
                and gens.get(rack, -1) >= (t.start_generation or 0) + 1
            )  # fmt: skip

        with contextlib.suppress(Unavailable):
            await self._wait(copy_settled, SETTLE_TIMEOUT_S, f"{rack}'s copy of {name} settling")
        state = self.store.state()
        kept = [c for k, c in state.diverged.items()
                if k not in seen_diverged and c.appliance == name and c.rack == rack]  # fmt: skip
        if kept:
            c = kept[0]
            run.report["kept_aside"] = {
                "id": c.id, "generations": max(0, c.last_generation - c.common_generation),
                "bytes": c.bytes, "span_s": round(max(0.0, c.last_write_at - c.first_write_at), 3),
            }  # fmt: skip
            self._say(run, f"drill {ident}: {rack} kept its diverged copy of {name} aside"
                      f" ({c.id}, {c.bytes} bytes): nothing is deleted", name)  # fmt: skip
        else:
            self._say(run, f"drill {ident}: {rack}'s copy of {name} did not diverge or is not"
                      " reported yet; it becomes a replica again", name)  # fmt: skip
        if not move_back or self.move is None:
            restore["moved_back"] = "not asked (--no-restore)" if not move_back else "not possible"
            return
        await self._move_back(run, name, rack)

    async def _move_back(self, run: DrillRun, name: str, rack: str) -> None:
        ident, restore = run.report["id"], run.report["restore"]
        assert self.move is not None

        def ready(s: PlacementState) -> bool:
            a = s.assignments.get(name)
            return (
                a is not None and rack in a.replicas and s.generations.get(name, {}).get(rack, 0) >= 1
                and (a.move is None or a.move.phase.value in ("done", "abandoned"))
            )  # fmt: skip

        try:
            deadline = self.clock() + MOVE_BACK_TIMEOUT_S
            while True:  # placement gives the rack a replica again, then it must report a copy
                await self._wait(ready, max(1.0, deadline - self.clock()), f"{rack} holding a copy")
                epoch = self.store.state().assignments[name].epoch
                try:
                    await self.move(name, rack, f"drill {ident}: back to where it ran")
                    break
                except (Conflict, NotFound) as exc:
                    if self.clock() > deadline:
                        raise
                    log.info("drill %s: not moving %s back yet: %s", ident, name, exc)
                    await self._next_revision()
            self._say(run, f"drill {ident}: moving {name} back to {rack} (planned move)", name)

            def finished(s: PlacementState) -> bool:
                a = s.assignments.get(name)
                m = None if a is None else a.move
                return (
                    m is not None
                    and m.phase.value in ("done", "abandoned")
                    and ((a is not None and a.epoch > epoch) or m.phase.value == "abandoned")
                )

            state = await self._wait(finished, MOVE_BACK_TIMEOUT_S, f"the move of {name} back")
            move = state.assignments[name].move
            assert move is not None
            if move.phase.value == "done":
                restore["moved_back"] = f"yes: down {move.downtime_s} s, no write lost"
            else:
                restore["moved_back"] = f"no: the move was abandoned ({move.reason})"
        except MeshcloudError as exc:
            restore["moved_back"] = f"no: {exc}"
        self._say(run, f"drill {ident}: moved back: {restore['moved_back']}", name)
