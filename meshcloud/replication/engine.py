"""The rack's replication engine: what the daemon starts once and feeds every cycle.

On the **primary** side it runs one cycle per appliance every
``interval_s`` (freeze, ship to every replica, merge), most important
appliances first when workers are scarce (a slow link makes cycles long, so
the queue decides who waits). On the **receiving** side it merges stacked
generations down in the background. It publishes, for the API and
``/metrics``: the lag of each replica, the generation each replica
acknowledged, and the generations this rack holds (for the placement map).

Threads, not asyncio: every step blocks (qemu-img, rsync, libvirt). The
``async_`` methods wrap the blocking ones for the daemon's event loop.

Contract with the daemon:

- every control-loop cycle: :meth:`set_duties` with the appliances this
  rack is primary of (epoch, priority, replica racks);
- :meth:`create_volumes` before defining a new appliance, and
  :meth:`active_paths` for the disk paths to start it on (they change at
  every freeze: always ask right before starting);
- on a lost lease: :meth:`fence` (stops shipping at once); :meth:`resume`
  when the lease is held again;
- planned move: pause the guest, :meth:`final_sync`, then hand over;
- failover onto this rack: ``engine.store.promote(appliance, epoch)``;
- publish ``engine.store.held()`` through the placement map; show
  :meth:`lags` in the API and :meth:`metrics_text` at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from meshcloud.core.errors import MeshcloudError
from meshcloud.core.names import validate_name
from meshcloud.replication.manifest import StaleEpoch
from meshcloud.replication.runner import ProcessRunner
from meshcloud.replication.schedule import TransferItem, order_transfers
from meshcloud.replication.source import (
    ApplianceSource,
    CycleReport,
    LiveOps,
    ReplicaLink,
    Transport,
)
from meshcloud.replication.store import GenerationCallback, ReplicaStore
from meshcloud.replication.volume import lowered_qemu_runner

EventCallback = Callable[[str], None]


@dataclass(frozen=True)
class ReplicationDuty:
    """What the placement map asks of this rack, as primary, for one appliance."""

    appliance: str
    epoch: int
    priority: int = 500
    replicas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_name("appliance", self.appliance)
        for rack in self.replicas:
            validate_name("rack", rack)


@dataclass(frozen=True)
class EngineSettings:
    """How often cycles run.

    ``max_interval_s`` above ``interval_s`` lets an appliance's interval
    stretch on a slow link (see :func:`next_interval`): each rsync run pays a
    few round trips of handshake, so bigger, rarer deltas fill the link
    better, at the cost of lag (at most about ``max_interval_s`` more).
    """

    interval_s: float = 2.0
    merge_interval_s: float = 5.0
    workers: int = 2
    tick_s: float = 0.1
    max_interval_s: float = 0.0  # 0 or <= interval_s: a fixed interval
    nice: int = 0  # CPU priority of rsync, ssh and qemu-img (the daemon's default: 10)


BUSY_HIGH = 0.5  # shipping took more than this share of the interval: double it
BUSY_LOW = 0.25  # less than this share: halve it back towards interval_s


def next_interval(settings: EngineSettings, current: float, push_s: float) -> float:
    """An appliance's next interval, from the longest rsync time of its last cycle.

    When shipping to a replica keeps its link busy more than half the
    interval, the link, not the cycle, sets the pace: the interval doubles
    (up to ``max_interval_s``), so each run carries more data for the same
    handshake; below a quarter it halves back. The link then stays busy
    between a quarter and a half of the time, with few handshakes.
    """
    low = settings.interval_s
    high = max(low, settings.max_interval_s)
    current = min(max(current, low), high)
    if push_s > BUSY_HIGH * current:
        return min(high, 2 * current)
    if push_s < BUSY_LOW * current:
        return max(low, current / 2)
    return current


@dataclass
class _State:
    last_start: float = 0.0
    running: bool = False
    fenced_epoch: int | None = None
    last_report: CycleReport | None = None
    bytes_sent: dict[str, int] = field(default_factory=dict)
    push_s: dict[str, float] = field(default_factory=dict)
    cycles: int = 0
    failures: int = 0
    frozen_bytes: int = 0  # data_bytes of every generation frozen
    interval_s: float = 0.0  # this appliance's interval now (0: the settings' interval_s)
    seconds: dict[str, float] = field(default_factory=dict)  # freeze, ship, merge, push, commit


class ReplicationEngine:
    """Schedules every local appliance's cycles and the local replicas' merges."""

    def __init__(
        self,
        volumes: Path,
        *,
        link_for: Callable[[str], ReplicaLink],
        live_for: Callable[[str], LiveOps | None] = lambda _name: None,
        settings: EngineSettings | None = None,
        on_event: EventCallback | None = None,
        on_generation: GenerationCallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.volumes = volumes
        self.link_for = link_for
        self.live_for = live_for
        self.settings = settings or EngineSettings()
        self.on_event = on_event
        self.clock = clock
        self.transport = Transport(ProcessRunner(self.settings.nice))
        self.qemu = lowered_qemu_runner(self.settings.nice)
        self.store = ReplicaStore(volumes, on_generation=on_generation, qemu=self.qemu)
        self._duties: dict[str, ReplicationDuty] = {}
        self._states: dict[str, _State] = {}
        self._sources: dict[str, ApplianceSource] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fenced = threading.Event()
        self._pool = ThreadPoolExecutor(self.settings.workers, "mc-repl")
        self._threads: list[threading.Thread] = []

    # -- wiring ------------------------------------------------------------

    def source(self, appliance: str) -> ApplianceSource:
        with self._lock:
            src = self._sources.get(appliance)
            fresh = src is None
            if src is None:
                src = ApplianceSource(
                    self.volumes, appliance, transport=self.transport, clock=self.clock,
                    qemu=self.qemu,
                )  # fmt: skip
                self._sources[appliance] = src
            src.live = self.live_for(appliance)
            duty = self._duties.get(appliance)
        if fresh and duty is not None and src.reconcile(duty.epoch):
            self._emit(f"{appliance}: completed a freeze a crash had interrupted")
        return src

    def create_volumes(
        self,
        appliance: str,
        disks: Mapping[str, int],
        epoch: int,
        templates: Mapping[str, Path] | None = None,
    ) -> dict[str, Path]:
        """Make a new appliance's volume set here; return the paths to start it on."""
        src = ApplianceSource.create(
            self.volumes, appliance, disks, epoch, templates=templates,
            transport=self.transport, clock=self.clock, qemu=self.qemu,
        )  # fmt: skip
        with self._lock:
            self._sources[appliance] = src
        return src.active_paths()

    def active_paths(self, appliance: str) -> dict[str, Path]:
        return self.source(appliance).active_paths()

    def set_duties(self, duties: Mapping[str, ReplicationDuty]) -> None:
        """The appliances this rack is primary of, read from the placement map."""
        with self._lock:
            self._duties = dict(duties)
            for name, duty in duties.items():
                state = self._states.setdefault(name, _State())
                if state.fenced_epoch is not None and duty.epoch > state.fenced_epoch:
                    state.fenced_epoch = None

    # -- running -----------------------------------------------------------

    def start(self) -> None:
        self.store.recover_all()
        for target, name in (
            (self._schedule_loop, "mc-repl-sched"),
            (self._merge_loop, "mc-repl-merge"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.transport.close()
        for t in self._threads:
            t.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fence(self) -> None:
        """The lease is lost: stop shipping at once (running transfers are killed)."""
        self._fenced.set()
        self.transport.close()
        self._emit("replication fenced: lease lost, every transfer stopped")

    def resume(self) -> None:
        """The lease is held again: cycles may run (each still names its epoch)."""
        self._fenced.clear()

    @property
    def fenced(self) -> bool:
        return self._fenced.is_set()

    def _emit(self, sentence: str) -> None:
        if self.on_event is not None:
            self.on_event(sentence)

    def _due(self, now: float) -> list[ReplicationDuty]:
        items = []
        with self._lock:
            for name, duty in self._duties.items():
                st = self._states.setdefault(name, _State())
                if st.running or st.fenced_epoch is not None:
                    continue
                if now - st.last_start < (st.interval_s or self.settings.interval_s):
                    continue
                lag = max(self._lag_of(name, r, now) for r in duty.replicas) if duty.replicas else 0
                items.append(TransferItem(name, ",".join(duty.replicas), duty.priority, lag))
        ordered = order_transfers(items)
        return [self._duties[i.appliance] for i in ordered]

    def _schedule_loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            if self._fenced.is_set():
                continue
            busy = sum(1 for s in self._states.values() if s.running)
            for duty in self._due(self.clock())[: max(0, self.settings.workers - busy)]:
                with self._lock:
                    st = self._states[duty.appliance]
                    st.running, st.last_start = True, self.clock()
                future = self._pool.submit(self._run_cycle, duty)
                future.add_done_callback(self._cycle_done(duty.appliance))

    def _cycle_done(self, appliance: str) -> Callable[[Future[None]], None]:
        def done(_f: Future[None]) -> None:
            with self._lock:
                self._states[appliance].running = False

        return done

    def _run_cycle(self, duty: ReplicationDuty) -> None:
        try:
            self.cycle_now(duty.appliance, duty)
        except StaleEpoch as exc:
            with self._lock:
                self._states[duty.appliance].fenced_epoch = duty.epoch
            self._emit(f"{duty.appliance}: replication stopped under epoch {duty.epoch}: {exc}")
        except MeshcloudError as exc:
            with self._lock:
                self._states[duty.appliance].failures += 1
            self._emit(f"{duty.appliance}: replication cycle failed: {exc}")

    def cycle_now(self, appliance: str, duty: ReplicationDuty | None = None) -> CycleReport:
        """Run one cycle of ``appliance`` now (blocking); for moves and tests."""
        duty = duty or self._duties[appliance]
        links = [self.link_for(rack) for rack in duty.replicas]
        report = self.source(appliance).cycle(duty.epoch, links)
        with self._lock:
            st = self._states.setdefault(appliance, _State())
            st.last_report = report
            st.cycles += 1
            st.frozen_bytes += report.data_bytes
            spent = {"freeze": report.freeze_s, "ship": report.ship_s, "merge": report.merge_s}
            for rack, ship in report.shipped.items():
                st.bytes_sent[rack] = st.bytes_sent.get(rack, 0) + ship.bytes_sent
                st.push_s[rack] = st.push_s.get(rack, 0.0) + ship.push_s
                spent["push"] = spent.get("push", 0.0) + ship.push_s
                spent["commit"] = spent.get("commit", 0.0) + ship.commit_s
            for step, seconds in spent.items():
                st.seconds[step] = st.seconds.get(step, 0.0) + seconds
            pushes = [s.push_s for s in report.shipped.values() if not s.seeded]
            if pushes:
                st.interval_s = next_interval(
                    self.settings, st.interval_s or self.settings.interval_s, max(pushes)
                )
        if report.errors or report.merge_error or any(s.seeded for s in report.shipped.values()):
            self._emit(report.reason)
        return report

    def final_sync(self, appliance: str, epoch: int, replicas: tuple[str, ...]) -> CycleReport:
        """Planned move: with the guest paused, ship its last writes to ``replicas``."""
        report = self.source(appliance).final_sync(epoch, [self.link_for(r) for r in replicas])
        self._emit(f"{appliance}: final sync done, {report.reason}")
        return report

    async def async_final_sync(
        self, appliance: str, epoch: int, replicas: tuple[str, ...]
    ) -> CycleReport:
        return await asyncio.to_thread(self.final_sync, appliance, epoch, replicas)

    async def async_cycle_now(self, appliance: str) -> CycleReport:
        return await asyncio.to_thread(self.cycle_now, appliance)

    def _merge_loop(self) -> None:
        while not self._stop.wait(self.settings.merge_interval_s):
            try:
                self.store.merge_pending()
            except MeshcloudError as exc:
                self._emit(f"background merge failed, will retry: {exc}")

    # -- what the API and /metrics show ------------------------------------

    def _lag_of(self, appliance: str, rack: str, now: float) -> float:
        src = self._sources.get(appliance)
        if src is None:
            return 0.0
        try:
            return src.lag_s(rack, now)
        except MeshcloudError:
            return float("inf")

    def lags(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """``{appliance: {replica rack: seconds of writes it would lose now}}``."""
        at = self.clock() if now is None else now
        with self._lock:
            duties = dict(self._duties)
        return {
            name: {rack: self._lag_of(name, rack, at) for rack in duty.replicas}
            for name, duty in duties.items()
        }

    def replica_generations(self) -> dict[str, dict[str, int]]:
        """``{appliance: {replica rack: generation it acknowledged}}`` (this primary's view)."""
        out = {}
        with self._lock:
            names = list(self._duties)
        for name in names:
            try:
                out[name] = dict(self.source(name).manifest().acked)
            except MeshcloudError:
                continue
        return out

    def transfer_stats(self) -> dict[str, dict[str, tuple[int, float]]]:
        """``{appliance: {rack: (bytes sent, seconds spent in rsync)}}`` since start."""
        with self._lock:
            return {
                name: {r: (st.bytes_sent[r], st.push_s.get(r, 0.0)) for r in st.bytes_sent}
                for name, st in self._states.items()
            }

    def cycle_stats(self) -> dict[str, dict[str, float]]:
        """``{appliance: {cycles, frozen_bytes, <step>_s...}}`` summed since start.

        Steps: ``freeze``, ``ship`` (every replica, with seeds), ``merge``
        and, summed over replicas, ``push`` (rsync) and ``commit`` (the
        replica's commit round trip). For benchmarks and diagnosis.
        """
        with self._lock:
            return {
                name: {
                    "cycles": float(st.cycles),
                    "frozen_bytes": float(st.frozen_bytes),
                    "interval_s": st.interval_s or self.settings.interval_s,
                    **{f"{step}_s": round(v, 3) for step, v in st.seconds.items()},
                }
                for name, st in self._states.items()
            }

    def metrics_text(self, now: float | None = None) -> str:
        """Prometheus text lines for ``/metrics``."""
        lines = [
            "# HELP meshcloud_replication_lag_seconds Age of the oldest write a replica lacks.",
            "# TYPE meshcloud_replication_lag_seconds gauge",
        ]
        for app, per_rack in sorted(self.lags(now).items()):
            for rack, lag in sorted(per_rack.items()):
                lines.append(
                    f'meshcloud_replication_lag_seconds{{appliance="{app}",replica="{rack}"}} {lag:.3f}'
                )
        lines += [
            "# HELP meshcloud_replication_acked_generation Generation a replica acknowledged.",
            "# TYPE meshcloud_replication_acked_generation gauge",
        ]
        for app, acked in sorted(self.replica_generations().items()):
            for rack, gen in sorted(acked.items()):
                lines.append(
                    f'meshcloud_replication_acked_generation{{appliance="{app}",replica="{rack}"}} {gen}'
                )
        lines += [
            "# HELP meshcloud_replication_held_generation Generation this rack holds.",
            "# TYPE meshcloud_replication_held_generation gauge",
        ]
        for app, (gen, _epoch) in sorted(self.store.held().items()):
            lines.append(f'meshcloud_replication_held_generation{{appliance="{app}"}} {gen}')
        lines += [
            "# HELP meshcloud_replication_sent_bytes_total Bytes shipped to a replica.",
            "# TYPE meshcloud_replication_sent_bytes_total counter",
        ]
        with self._lock:
            states = {k: (dict(v.bytes_sent), v.failures) for k, v in self._states.items()}
        for app, (sent, _failures) in sorted(states.items()):
            for rack, total in sorted(sent.items()):
                lines.append(
                    f'meshcloud_replication_sent_bytes_total{{appliance="{app}",replica="{rack}"}} {total}'
                )
        lines += [
            "# HELP meshcloud_replication_failed_cycles_total Cycles that failed.",
            "# TYPE meshcloud_replication_failed_cycles_total counter",
        ]
        for app, (_sent, failures) in sorted(states.items()):
            lines.append(
                f'meshcloud_replication_failed_cycles_total{{appliance="{app}"}} {failures}'
            )
        return "\n".join(lines) + "\n"
