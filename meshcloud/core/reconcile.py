"""One cycle of a rack's agent: a snapshot in, one reason and a list of actions out.

:func:`reconcile` compares what the placement map assigns to this rack with
what the local hypervisor reports, and decides what to do about it:

- start what is assigned here and not running, under the map's epoch, most
  important first; after a power cut that is all that starts: never a copy of
  an appliance the map has moved elsewhere;
- stop what runs here and is no longer assigned (destroy at once if the map
  gave it to another rack: the other rack may start it any moment);
- restart a crashed appliance in place, with exponential back-off, at most
  ``max_restarts`` times in ``window_s``; then report it as failed, once;
- never name an epoch older than the map's, and leave alone an appliance
  running under an epoch newer than the map's (this rack's copy of the map is
  behind; the next cycle sees the newer map);
- without a lease, start nothing: pause everything at once, destroy it after
  ``fence_grace_s``. With the lease back and the appliance still assigned
  here under the same epoch, resume it (a short blip costs no reboot);
- a planned move under way (the assignment's ``move`` record, see
  meshcloud/core/moves.py): while it is in ``handover``, hand the appliance
  over (:class:`HandOver`: pause, final sync, report) and never start or
  resume it; once ``synced``, keep it paused until the map switches it.

The lease itself is reduced here to :class:`LeaseView` (held, or lost since
a time); how a rack gains and loses its lease is the failover work's
business and lives apart from this module.

Nothing here does I/O or reads a clock: ``now`` is an argument, like every
other input, so each cycle's decision is a plain function of its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import ApplianceState, Assignment, ClusterSnapshot, MovePhase

# -- inputs ------------------------------------------------------------------------------


class DomainState(StrEnum):
    """What the local hypervisor says about an appliance's VM (same values as the adapter's)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


# States in which the guest may still execute, and so write to its disks.
ACTIVE = frozenset({DomainState.RUNNING, DomainState.SHUTTING_DOWN, DomainState.OTHER})
# States in which a VM exists in memory (active or frozen): it must be destroyed before a start.
LIVE = ACTIVE | {DomainState.PAUSED}


@dataclass(frozen=True)
class LocalDomain:
    """An appliance's VM on this rack and the epoch it was started under."""

    appliance: str
    state: DomainState
    epoch: int


@dataclass(frozen=True)
class CrashHistory:
    """Crashes the agent saw for an appliance under one epoch (a new epoch starts afresh).

    ``crash_times`` are the agent's clock readings when it saw the VM die without
    being asked to stop, oldest first. ``reported`` is set once the failure was
    reported, so that it is reported once.
    """

    epoch: int
    crash_times: tuple[float, ...] = ()
    reported: bool = False


@dataclass(frozen=True)
class RestartPolicy:
    """Bounds on restarting crashed appliances, and the fencing grace period."""

    max_restarts: int = 5
    window_s: float = 600.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 120.0
    fence_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise InvalidInput(f"max_restarts ({self.max_restarts}) must be 0 or more")
        for key in ("window_s", "backoff_initial_s", "backoff_max_s", "fence_grace_s"):
            if not getattr(self, key) > 0:
                raise InvalidInput(f"{key} ({getattr(self, key)}) must be positive")
        if self.backoff_max_s < self.backoff_initial_s:
            raise InvalidInput(
                f"backoff_max_s ({self.backoff_max_s}) must be at least"
                f" backoff_initial_s ({self.backoff_initial_s})"
            )

    def backoff_s(self, crashes: int) -> float:
        """How long to wait after the ``crashes``-th recent crash before restarting."""
        if crashes <= 0:
            return 0.0
        return float(min(self.backoff_initial_s * 2 ** min(crashes - 1, 62), self.backoff_max_s))


# -- the lease, minimal on purpose --------------------------------------------------------


@dataclass(frozen=True)
class LeaseView:
    """Whether this rack holds its lease now, and if not since when it has been without.

    ``lost_at`` is when the lease ran out, or when the daemon started without one;
    None counts as "just now" (pause, but do not destroy yet).
    """

    held: bool
    lost_at: float | None = None

    @classmethod
    def holding(cls) -> LeaseView:
        return cls(True)

    @classmethod
    def lost(cls, at: float | None) -> LeaseView:
        return cls(False, at)

    def without_lease_s(self, now: float) -> float:
        """Seconds spent without the lease (0.0 while it is held)."""
        if self.held or self.lost_at is None:
            return 0.0
        return max(0.0, now - self.lost_at)


# -- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Define (or redefine) the appliance's VM for ``epoch`` and start it.

    The executor refuses when ``epoch`` is older than the epoch its volumes last saw.
    """

    appliance: str
    epoch: int


@dataclass(frozen=True)
class Stop:
    """Shut the VM down gracefully (the executor escalates to destroy after its timeout)."""

    appliance: str


@dataclass(frozen=True)
class Pause:
    """Freeze the VM's vCPUs now: it stops writing at once and can be resumed."""

    appliance: str


@dataclass(frozen=True)
class Resume:
    """Resume a paused VM, which must have been started under ``epoch``."""

    appliance: str
    epoch: int


@dataclass(frozen=True)
class Destroy:
    """Stop the VM at once (power off), without waiting for the guest."""

    appliance: str


@dataclass(frozen=True)
class HandOver:
    """Planned move: pause the guest, ship its last writes to ``to``, report it in the map.

    The executor runs it beside the loop; on failure it abandons the move (with
    the reason) so that the appliance resumes here.
    """

    appliance: str
    epoch: int
    to: str


@dataclass(frozen=True)
class ReportFailed:
    """Tell the cluster the appliance keeps crashing here and will not be restarted."""

    appliance: str
    epoch: int
    crashes: int


Action = Start | Stop | Pause | Resume | Destroy | ReportFailed | HandOver


class Decision(NamedTuple):
    """One cycle's outcome: one sentence saying why, and the actions in execution order."""

    reason: str
    actions: tuple[Action, ...]


# Executed in this order: make room and fence first, start last.
_ORDER: dict[type, int] = {
    Destroy: 0, Stop: 1, Pause: 2, Resume: 3, ReportFailed: 4, HandOver: 5, Start: 6,
}  # fmt: skip


def _names(items: list[str]) -> str:
    return ", ".join(items)


def _fence(
    domains: Mapping[str, LocalDomain], lease: LeaseView, now: float, policy: RestartPolicy
) -> Decision:
    """Without a lease: pause every running VM at once, destroy after the grace period."""
    without_s = lease.without_lease_s(now)
    expired = without_s >= policy.fence_grace_s
    actions: list[Action] = []
    paused: list[str] = []
    destroyed: list[str] = []
    for name in sorted(domains):
        state = domains[name].state
        if state in ACTIVE and not expired:
            actions.append(Pause(name))
            paused.append(name)
        elif state in LIVE and expired:
            actions.append(Destroy(name))
            destroyed.append(name)
    head = f"no lease for {without_s:.1f} s"
    if destroyed:
        reason = (
            f"{head}; destroying {_names(destroyed)}: the {policy.fence_grace_s:g} s"
            " grace period is over and the cluster may restart them elsewhere"
        )
    elif paused:
        reason = (
            f"{head}; pausing {_names(paused)} to fence this rack"
            f" (destroyed after {policy.fence_grace_s:g} s without a lease)"
        )
    else:
        still = sum(1 for d in domains.values() if d.state is DomainState.PAUSED)
        reason = f"{head}; starting nothing until the lease is back" + (
            f" ({still} paused)" if still else ""
        )
    return Decision(reason, tuple(sorted(actions, key=lambda a: _ORDER[type(a)])))


# -- the cycle ---------------------------------------------------------------------------


def reconcile(
    rack: str,
    snapshot: ClusterSnapshot,
    domains: Mapping[str, LocalDomain],
    lease: LeaseView,
    crashes: Mapping[str, CrashHistory],
    now: float,
    policy: RestartPolicy | None = None,
) -> Decision:
    """Decide this cycle for ``rack``: see the module docstring for the rules."""
    policy = policy or RestartPolicy()
    for key, dom in domains.items():
        if key != dom.appliance:
            raise InvalidInput(f"domain key {key!r} does not match appliance {dom.appliance!r}")
    if not lease.held:
        return _fence(domains, lease, now, policy)
    return _Cycle(rack, snapshot, domains, crashes, now, policy).decide()


class _Cycle:
    """Scratch state for one decision with the lease held."""

    def __init__(
        self,
        rack: str,
        snapshot: ClusterSnapshot,
        domains: Mapping[str, LocalDomain],
        crashes: Mapping[str, CrashHistory],
        now: float,
        policy: RestartPolicy,
    ) -> None:
        self.rack = rack
        self.snapshot = snapshot
        self.domains = domains
        self.crashes = crashes
        self.now = now
        self.policy = policy
        self.actions: list[Action] = []
        self.clauses: dict[str, list[str]] = {}
        self.running_ok = 0
        self.explained: set[str] = set()  # starts already told by a restart clause

    def _say(self, kind: str, text: str) -> None:
        self.clauses.setdefault(kind, []).append(text)

    def _assigned_here(self, asg: Assignment | None) -> bool:
        return asg is not None and asg.state is ApplianceState.RUNNING and asg.primary == self.rack

    def decide(self) -> Decision:
        assignments = self.snapshot.assignments
        names = sorted(set(self.domains) | set(self.snapshot.assigned_to(self.rack)))
        starts: list[Start] = []
        for name in names:
            asg = assignments.get(name)
            dom = self.domains.get(name)
            if dom is not None and asg is not None and dom.epoch > asg.epoch:
                if dom.state in LIVE:
                    self._say(
                        "behind",
                        f"{name} (local epoch {dom.epoch}, map epoch {asg.epoch})",
                    )
                continue
            if self._assigned_here(asg):
                assert asg is not None
                start = self._keep_running(name, asg, dom)
                if start is not None:
                    starts.append(start)
            elif dom is not None:
                self._remove(name, asg, dom)
        priority = {n: s.priority for n, s in self.snapshot.appliances.items()}
        starts.sort(key=lambda s: (-priority.get(s.appliance, 0), s.appliance))
        for start in starts:
            if start.appliance not in self.explained:
                self._say("start", f"{start.appliance} (epoch {start.epoch})")
        actions = sorted(self.actions, key=lambda a: _ORDER[type(a)]) + starts
        return Decision(self._reason(), tuple(actions))

    def _keep_running(self, name: str, asg: Assignment, dom: LocalDomain | None) -> Start | None:
        """The appliance is assigned here: make it run under the map's epoch."""
        epoch = asg.epoch
        if asg.moving:
            self._hand_over(name, asg, dom)
            return None
        if dom is not None and dom.state is DomainState.RUNNING:
            if dom.epoch == epoch:
                self.running_ok += 1
                return None
            self.actions.append(Destroy(name))
            self._say("stale", f"{name} (epoch {dom.epoch}, map epoch {epoch})")
            self.explained.add(name)
            return Start(name, epoch)
        if dom is not None and dom.state is DomainState.PAUSED:
            if dom.epoch == epoch:
                self.actions.append(Resume(name, epoch))
                self._say("resume", name)
                return None
            self.actions.append(Destroy(name))
            self._say("stale", f"{name} (epoch {dom.epoch}, map epoch {epoch})")
            self.explained.add(name)
            return Start(name, epoch)
        if dom is not None and dom.state in (DomainState.SHUTTING_DOWN, DomainState.OTHER):
            if dom.epoch == epoch:
                self._say("wait", f"{name} ({dom.state})")
                return None
            self.actions.append(Destroy(name))
            self._say("stale", f"{name} (epoch {dom.epoch}, map epoch {epoch})")
            self.explained.add(name)
            return Start(name, epoch)
        return self._restart(name, epoch)

    def _hand_over(self, name: str, asg: Assignment, dom: LocalDomain | None) -> None:
        """A planned move from this rack: hand over, or stay paused until the switch."""
        assert asg.move is not None
        move = asg.move
        if move.phase is MovePhase.HANDOVER:
            if dom is not None and dom.state in LIVE and dom.epoch < asg.epoch:
                self.actions.append(Destroy(name))  # a VM of an older history must not sync
            self.actions.append(HandOver(name, asg.epoch, move.to))
            self._say("handover", f"{name} over to {move.to}")
        elif dom is not None and dom.state in ACTIVE:
            self.actions.append(Pause(name))  # synced: it must not write again here
            self._say("hold", f"{name} (synced to {move.to})")
        else:
            self._say("switch", f"{name} to switch to {move.to}")

    def _restart(self, name: str, epoch: int) -> Start | None:
        """Not running: start it, unless it keeps crashing (back off, then report)."""
        history = self.crashes.get(name)
        recent: tuple[float, ...] = ()
        if history is not None and history.epoch == epoch:
            cutoff = self.now - self.policy.window_s
            recent = tuple(t for t in history.crash_times if t > cutoff)
        if not recent:
            return Start(name, epoch)
        count = len(recent)
        limit = self.policy.max_restarts
        if count > limit:
            assert history is not None
            if not history.reported:
                self.actions.append(ReportFailed(name, epoch, count))
                self._say(
                    "failed",
                    f"{name} crashed {count} times in {self.policy.window_s:g} s;"
                    " reporting it as failed and leaving it stopped",
                )
            else:
                self._say("failed-quiet", name)
            return None
        due = max(recent) + self.policy.backoff_s(count)
        if self.now >= due:
            self._say("restart", f"{name} (epoch {epoch}), restart {count} of at most {limit}")
            self.explained.add(name)
            return Start(name, epoch)
        self._say("backoff", f"{name} in {due - self.now:.1f} s (back-off after crash {count})")
        return None

    def _remove(self, name: str, asg: Assignment | None, dom: LocalDomain) -> None:
        """A VM here that the map does not assign here."""
        if dom.state not in LIVE:
            return  # already off; its disks are the replication layer's business
        if asg is not None and asg.primary is not None and asg.primary != self.rack:
            self.actions.append(Destroy(name))
            self._say("moved", f"{name} (moved to {asg.primary} under epoch {asg.epoch})")
        elif dom.state is DomainState.RUNNING:
            self.actions.append(Stop(name))
            self._say("unassigned", name)
        elif dom.state is DomainState.SHUTTING_DOWN:
            self._say("wait", f"{name} ({dom.state})")
        else:  # paused or in an unknown state: a graceful stop cannot work
            self.actions.append(Destroy(name))
            self._say("unassigned", name)

    def _reason(self) -> str:
        c = self.clauses
        parts: list[str] = []
        if "moved" in c:
            parts.append(f"destroying {_names(c['moved'])}: the map runs it elsewhere now")
        if "stale" in c:
            parts.append(f"restarting {_names(c['stale'])}: it ran under an older epoch")
        if "unassigned" in c:
            parts.append(f"stopping {_names(c['unassigned'])}: no longer assigned here")
        if "resume" in c:
            parts.append(f"resuming {_names(c['resume'])}: lease held and still assigned here")
        if "handover" in c:
            parts.append(f"handing {_names(c['handover'])} over (planned move: pause, final sync)")
        if "hold" in c:
            parts.append(f"pausing {_names(c['hold'])}: it must not write here again")
        if "switch" in c:
            parts.append(f"waiting for {_names(c['switch'])}")
        parts.extend(c.get("failed", []))
        if "restart" in c:
            parts.append(f"restarting {_names(c['restart'])}")
        if "start" in c:
            parts.append(f"starting {_names(c['start'])}")
        if "backoff" in c:
            parts.append(f"restarting {_names(c['backoff'])}")
        if "wait" in c:
            parts.append(f"waiting for {_names(c['wait'])} to settle")
        if not parts:
            assigned = len(self.snapshot.assigned_to(self.rack))
            if assigned == 0:
                parts.append("nothing is assigned here")
            elif self.running_ok == assigned:
                parts.append(f"all {assigned} appliances assigned here are running")
            else:
                parts.append(f"{self.running_ok} of {assigned} appliances assigned here run")
        if "behind" in c:
            parts.append(
                f"leaving {_names(c['behind'])} alone: this rack's copy of the map is behind"
            )
        if "failed-quiet" in c:
            parts.append(f"{_names(c['failed-quiet'])} failed here and waits for an operator")
        return "; ".join(parts)
