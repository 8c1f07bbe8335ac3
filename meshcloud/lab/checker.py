"""The failover invariant checker: never running twice, never going back behind a replica.

Used by the failover lab tests, the chaos test and ``bench/failover.py``.
It watches a lab from the outside, without ever opening a rack's libvirt
root (only the rack's daemon may):

- **every ``period_s`` (0.1 s)**: one pass over ``/proc`` finds every QEMU
  process, the rack whose network namespace it lives in, and the appliance
  it runs (``-name guest=mc-<appliance>``); libvirt's status file under the
  rack's root (``run/qemu/mc-<appliance>.xml``: ``<domstatus state=...
  pid=...>`` and the epoch in the domain's metadata) says whether it runs or
  is paused. A QEMU whose status file is missing, names another pid or says
  anything but ``paused`` counts as **running** (the doubt goes against the
  system). An appliance running on two racks at once is a violation.
- **every ``counter_period_s`` (1 s)**: the placement map (from any rack's
  API), and the demo appliance's counter on disk (``qemu-img dd -U``, what
  the guest had flushed: every value it acknowledged): on every replica copy
  (the value *recorded as replicated*: a fact ``(epoch, generation, value)``),
  and on every primary that started under a new epoch. When an appliance
  starts under epoch E' after epoch E, its counter must be at least the value
  of the highest generation the map recorded for a replica of E that was
  still available (``available(rack, t)``; by default: powered on). Below
  it is a violation: a failover lost replicated writes.

``timeline[appliance]`` keeps every change of where it runs (time, racks,
epochs), for the chaos test's recovery bounds and the benchmark's RTO.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcloud.core.errors import MeshcloudError
from meshcloud.hypervisor.domain_xml import DOMAIN_PREFIX, METADATA_NS

log = logging.getLogger("meshcloud.checker")

QEMU_COMM_PREFIX = "qemu-system"
_STATE_RE = re.compile(r"<domstatus state='([a-z]+)'[^>]*?pid='(\d+)'")
_EPOCH_RE = re.compile(r"<(?:\w+:)?appliance\b[^>]*\bepoch=['\"](\d+)['\"]")
_META_NS = METADATA_NS  # the epoch lives in this namespace's <appliance> element


# -- pure parts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Guest:
    """One QEMU process seen in a rack."""

    rack: str
    appliance: str
    pid: int
    state: str  # libvirt's word (running, paused, ...), or "unknown"
    epoch: int | None

    @property
    def runs(self) -> bool:
        """Whether it may execute guest code (paused does not; doubt counts as running)."""
        return self.state != "paused"


def parse_domstatus(text: str) -> tuple[str, int, int | None] | None:
    """``(state, pid, epoch)`` from a libvirt status file, or None if it is not one."""
    match = _STATE_RE.search(text[:4096])
    if match is None:
        return None
    epoch = _EPOCH_RE.search(text)
    return match.group(1), int(match.group(2)), int(epoch.group(1)) if epoch else None


def guest_name(cmdline: bytes) -> str | None:
    """The appliance a QEMU command line runs (``-name guest=mc-<appliance>,...``)."""
    argv = cmdline.split(b"\0")
    for i, arg in enumerate(argv[:-1]):
        if arg == b"-name":
            guest = argv[i + 1].decode(errors="replace").split(",")[0].removeprefix("guest=")
            if guest.startswith(DOMAIN_PREFIX):
                return guest[len(DOMAIN_PREFIX) :]
    return None


def double_runs(guests: Iterable[Guest]) -> dict[str, list[Guest]]:
    """Appliances running (not paused) on more than one rack."""
    where: dict[str, list[Guest]] = {}
    for g in guests:
        if g.runs:
            where.setdefault(g.appliance, []).append(g)
    return {a: gs for a, gs in where.items() if len({g.rack for g in gs}) > 1}


@dataclass
class Fact:
    """A replica copy seen on disk: ``value`` is its counter at ``generation`` under ``epoch``."""

    appliance: str
    rack: str
    epoch: int
    generation: int
    value: int
    at: float


def value_at(facts: Iterable[Fact], appliance: str, epoch: int, generation: int) -> int:
    """The highest counter known for a copy of ``epoch`` at or below ``generation`` (a floor)."""
    best = 0
    for f in facts:
        if f.appliance == appliance and f.epoch == epoch and f.generation <= generation:
            best = max(best, f.value)
    return best


# -- reading a rack from the outside ---------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def scan(racks: Mapping[int, tuple[str, Path]]) -> list[Guest]:
    """Every QEMU in the given namespaces (``{netns inode: (rack, state_dir)}``)."""
    guests = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        comm = _read(f"/proc/{entry}/comm")
        if comm is None or not comm.startswith(QEMU_COMM_PREFIX.encode()):
            continue
        try:
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        where = racks.get(inode)
        if where is None:
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        appliance = guest_name(cmdline) if cmdline else None
        if appliance is None:
            continue
        rack, state_dir = where
        pid = int(entry)
        status = _read(
            str(state_dir / "libvirt" / "run" / "qemu" / f"{DOMAIN_PREFIX}{appliance}.xml")
        )
        parsed = parse_domstatus(status.decode(errors="replace")) if status else None
        if parsed is None or parsed[1] != pid:
            guests.append(Guest(rack, appliance, pid, "unknown", None))
        else:
            guests.append(Guest(rack, appliance, pid, parsed[0], parsed[2]))
    return guests


def disk_counter(volumes: Path, appliance: str, disk: str = "data") -> tuple[str, int, int, int]:
    """``(role, epoch, generation, counter)`` of a rack's copy (raises on any doubt).

    The manifest is read before and after the counter: a freeze or merge in
    between makes the reading ambiguous, and it raises.
    """
    from meshcloud.images.appliance_disk import read_counter_from_image

    path = volumes / appliance / "manifest.json"
    before = json.loads(path.read_bytes())
    files = next(d["files"] for d in before["disks"] if d["disk"] == disk)
    top = volumes / appliance / disk / files[-1]
    value = read_counter_from_image(top).seq
    after = json.loads(path.read_bytes())
    if after["generation"] != before["generation"] or after["disks"] != before["disks"]:
        raise MeshcloudError(f"{appliance}: copy changed while reading its counter")
    return before["role"], int(before["epoch"]), int(before["generation"]), value


# -- the checker ------------------------------------------------------------------------------


@dataclass
class Violation:
    at: float  # time.monotonic()
    kind: str  # "double-run" | "counter"
    message: str


@dataclass
class Change:
    at: float
    running: dict[str, int | None]  # rack -> epoch, where the appliance runs (not paused)
    paused: frozenset[str] = frozenset()


@dataclass
class _MapSeen:
    at: float
    epoch: int
    primary: str | None
    replicas: tuple[str, ...]
    reports: dict[str, int]


@dataclass
class _Started:
    rack: str
    epoch: int
    previous: _MapSeen | None
    at: float
    checked: bool = False
    value: int | None = None


class InvariantChecker:
    """Watches a lab until stopped; see the module docstring.

    ``racks()`` gives ``{rack: (netns, state_dir)}`` for the racks to watch
    (called every pass, so restarts and new namespaces are followed);
    ``cluster()`` returns the map document (``GET /api/v1/cluster``) from any
    rack that answers, or None; ``available(rack, t)`` says whether a rack's
    copy could have been promoted at ``t`` (default: always).
    """

    def __init__(
        self,
        racks: Callable[[], Mapping[str, tuple[str, Path]]],
        cluster: Callable[[], Mapping[str, Any] | None] | None = None,
        *,
        period_s: float = 0.1,
        counter_period_s: float = 1.0,
        available: Callable[[str, float], bool] | None = None,
        counters: bool = True,
    ) -> None:
        self.racks = racks
        self.cluster = cluster
        self.period_s = period_s
        self.counter_period_s = counter_period_s
        self.available = available or (lambda _rack, _t: True)
        self.counters = counters and cluster is not None
        self.violations: list[Violation] = []
        self.timeline: dict[str, list[Change]] = {}
        self.facts: list[Fact] = []
        self.passes = 0
        self.max_pass_s = 0.0
        self._maps: dict[str, list[_MapSeen]] = {}
        self._started: dict[tuple[str, int], _Started] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inodes: dict[str, tuple[str, int | None]] = {}

    # -- running --------------------------------------------------------------------

    def start(self) -> InvariantChecker:
        targets: list[tuple[Callable[[], None], str]] = [(self._fast_loop, "checker-fast")]
        if self.counters:
            targets.append((self._slow_loop, "checker-counters"))
        for target, name in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> InvariantChecker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def assert_ok(self) -> None:
        """Raise AssertionError listing every violation seen so far."""
        with self._lock:
            found = list(self.violations)
        if found:
            lines = "\n".join(f"  [{v.kind}] {v.message}" for v in found[:20])
            raise AssertionError(f"{len(found)} invariant violation(s):\n{lines}")

    # -- the fast loop: who runs where -------------------------------------------------

    def _rack_map(self) -> dict[int, tuple[str, Path]]:
        out = {}
        for rack, (netns, state_dir) in self.racks().items():
            inode = netns_inode(netns)
            if inode is not None:
                out[inode] = (rack, state_dir)
        return out

    def poll_once(self) -> list[Guest]:
        """One pass: scan, record changes, flag double runs. Returns what it saw."""
        t0 = time.monotonic()
        guests = scan(self._rack_map())
        now = time.monotonic()
        self.max_pass_s = max(self.max_pass_s, now - t0)
        self.passes += 1
        with self._lock:
            for appliance, gs in double_runs(guests).items():
                where = ", ".join(f"{g.rack} (pid {g.pid}, epoch {g.epoch}, {g.state})" for g in gs)
                self.violations.append(
                    Violation(now, "double-run", f"{appliance} runs on {where} at once")
                )
            seen = {g.appliance for g in guests} | set(self.timeline)
            for appliance in seen:
                running = {g.rack: g.epoch for g in guests if g.appliance == appliance and g.runs}
                paused = frozenset(
                    g.rack for g in guests if g.appliance == appliance and not g.runs
                )
                history = self.timeline.setdefault(appliance, [])
                if not history or history[-1].running != running or history[-1].paused != paused:
                    history.append(Change(now, running, paused))
                for rack, epoch in running.items():
                    if epoch is not None and (appliance, epoch) not in self._started:
                        self._started[(appliance, epoch)] = _Started(
                            rack, epoch, self._previous_map(appliance, epoch), now
                        )
        return guests

    def _fast_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception as exc:  # a bad pass must not end the watch
                log.warning("checker pass failed: %s", exc)
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    # -- the slow loop: counters ---------------------------------------------------------

    def _previous_map(self, appliance: str, epoch: int) -> _MapSeen | None:
        """The last map view of ``appliance`` under an epoch older than ``epoch``."""
        for seen in reversed(self._maps.get(appliance, [])):
            if seen.epoch < epoch:
                return seen
        return None

    def _record_map(self, doc: Mapping[str, Any], now: float) -> None:
        reports = doc.get("replica_generations", {})
        with self._lock:
            for name, asg in doc.get("assignments", {}).items():
                seen = _MapSeen(
                    now,
                    int(asg["epoch"]),
                    asg.get("primary"),
                    tuple(asg.get("replicas", ())),
                    {r: int(g) for r, g in reports.get(name, {}).items()},
                )
                history = self._maps.setdefault(name, [])
                if (
                    history
                    and history[-1].epoch == seen.epoch
                    and history[-1].reports == seen.reports
                ):
                    history[-1] = seen
                else:
                    history.append(seen)
                    del history[:-50]

    def counters_once(self) -> None:
        """Read the map, every replica's counter, and the counter of new primaries."""
        assert self.cluster is not None
        now = time.monotonic()
        doc = self.cluster()
        if doc is not None:
            self._record_map(doc, now)
        racks = self.racks()
        names = set(self._maps)
        for rack, (_netns, state_dir) in racks.items():
            volumes = state_dir / "volumes"
            for appliance in names:
                if not (volumes / appliance / "manifest.json").exists():
                    continue
                with contextlib.suppress(Exception):
                    role, epoch, gen, value = disk_counter(volumes, appliance)
                    if role == "replica":
                        with self._lock:
                            self.facts.append(Fact(appliance, rack, epoch, gen, value, now))
                            del self.facts[:-5000]
        self._check_starts(racks)

    def _check_starts(self, racks: Mapping[str, tuple[str, Path]]) -> None:
        with self._lock:
            pending = [s for (_a, _e), s in self._started.items() if not s.checked]
            keys = {id(s): k for k, s in self._started.items()}
        for start in pending:
            appliance, _epoch = keys[id(start)]
            where = racks.get(start.rack)
            if where is None:
                continue
            try:
                role, epoch, _gen, value = disk_counter(where[1] / "volumes", appliance)
            except Exception as exc:  # a freeze or merge raced the read: next pass
                log.debug("reading %s on %s: %s", appliance, start.rack, exc)
                continue
            if role != "primary" or epoch != start.epoch:
                continue
            start.value = value
            start.checked = True
            floor, detail = self.floor(appliance, start)
            if value < floor:
                with self._lock:
                    self.violations.append(
                        Violation(
                            time.monotonic(),
                            "counter",
                            f"{appliance} started on {start.rack} under epoch {start.epoch} with"
                            f" counter {value}, below {floor} ({detail})",
                        )
                    )

    def floor(self, appliance: str, start: _Started) -> tuple[int, str]:
        """The counter a start must reach: the best replicated value of an available replica."""
        prev = start.previous
        if prev is None:
            return 0, "no earlier epoch seen"
        best, why = 0, "no replica report"
        with self._lock:
            facts = list(self.facts)
        for rack in prev.replicas:
            gen = prev.reports.get(rack)
            if gen is None or not self.available(rack, start.at):
                continue
            value = value_at(facts, appliance, prev.epoch, gen)
            if value > best:
                best, why = value, f"{rack} held generation {gen} of epoch {prev.epoch}"
        return best, why

    def _slow_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.counters_once()
            except Exception as exc:
                log.warning("checker counter pass failed: %s", exc)
            self._stop.wait(max(0.0, self.counter_period_s - (time.monotonic() - started)))

    # -- queries (tests, chaos, benchmark) ---------------------------------------------------

    def running_on(self, appliance: str) -> dict[str, int | None]:
        with self._lock:
            history = self.timeline.get(appliance, [])
            return dict(history[-1].running) if history else {}

    def first_running_after(
        self, appliance: str, after: float, exclude: Iterable[str] = ()
    ) -> tuple[float, str] | None:
        """The first time after ``after`` the appliance ran on a rack not in ``exclude``."""
        skip = set(exclude)
        with self._lock:
            for change in self.timeline.get(appliance, []):
                if change.at < after:
                    continue
                racks = [r for r in change.running if r not in skip]
                if racks:
                    return change.at, racks[0]
        return None

    def outages(self, appliance: str, until: float | None = None) -> list[tuple[float, float]]:
        """Spans during which the appliance ran nowhere (after it first ran)."""
        end = time.monotonic() if until is None else until
        spans: list[tuple[float, float]] = []
        down_since: float | None = None
        ran = False
        with self._lock:
            history = list(self.timeline.get(appliance, []))
        for change in history:
            if change.running:
                ran = True
                if down_since is not None:
                    spans.append((down_since, change.at))
                    down_since = None
            elif ran and down_since is None:
                down_since = change.at
        if down_since is not None:
            spans.append((down_since, end))
        return spans

    def map_before(self, appliance: str, epoch: int) -> _MapSeen | None:
        """The last map view of ``appliance`` under an epoch older than ``epoch``."""
        with self._lock:
            return self._previous_map(appliance, epoch)

    def floor_for(self, appliance: str, epoch: int) -> tuple[int, str]:
        """The floor the start under ``epoch`` was checked against (0 if not seen)."""
        with self._lock:
            start = self._started.get((appliance, epoch))
        return self.floor(appliance, start) if start is not None else (0, "not started")

    def replicated_now(self, appliance: str) -> int:
        """The value of the freshest replica report of the map's current epoch (0 if none)."""
        with self._lock:
            history = self._maps.get(appliance, [])
            seen = history[-1] if history else None
            facts = list(self.facts)
        if seen is None:
            return 0
        gens = [seen.reports[r] for r in seen.replicas if r in seen.reports]
        return value_at(facts, appliance, seen.epoch, max(gens)) if gens else 0

    def started(self) -> list[dict[str, Any]]:
        """Every start under a new epoch seen, with the counter it started from."""
        with self._lock:
            return [
                {"appliance": a, "epoch": e, "rack": s.rack, "value": s.value, "checked": s.checked}
                for (a, e), s in sorted(self._started.items())
            ]


@dataclass
class LabWatch:
    """An InvariantChecker on a :class:`meshcloud.lab.lab.Lab` (probes from the observer)."""

    lab: Any
    api: Any = None
    checker: InvariantChecker = field(init=False)

    def __post_init__(self) -> None:
        from meshcloud.lab.api import LabApi

        api = self.api or LabApi(self.lab, timeout_s=3.0)
        self.api = api
        names = self.lab.racks()
        infos = {r: self.lab.rack(r) for r in names}

        def racks() -> dict[str, tuple[str, Path]]:
            return {r: (i.netns, i.state_dir) for r, i in infos.items()}

        def cluster() -> dict[str, Any] | None:
            for rack in names:
                with contextlib.suppress(Exception):
                    doc: dict[str, Any] = api.cluster(rack)
                    return doc
            return None

        self.checker = InvariantChecker(racks, cluster)
