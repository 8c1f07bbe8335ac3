"""Copies left behind by a failover: kept aside when they hold writes nobody else has.

After a failover the map runs an appliance on a new primary under a new
epoch. A rack that comes back (a partition heals, power returns) may still
hold its own copy:

- the **old primary**'s copy, which may hold writes made after the last
  generation a replica received (they were never shipped), plus whatever the
  guest wrote into its active overlay before it was fenced;
- a **replica** whose history diverged: it received a generation the new
  primary never had (the new primary was promoted from a slightly older one).

Nothing is ever deleted silently. Each cycle (:meth:`DivergenceKeeper.once`)
compares every such copy with the current primary's (its ``status`` over the
replication link) and the last generation both histories share:

- writes after that generation: the copy is **kept aside** whole, in
  ``<volumes>/.diverged/<appliance>.e<E>.g<G>.<n>/``, recorded in the map
  (``diverged_report``: size, time span, generations) and announced as a
  ``diverged`` event; it stays until an operator discards it
  (``DELETE /api/v1/diverged/{rack}/{id}``), which this rack then carries out;
- nothing after it: an old primary's copy is demoted to a replica (its empty
  active overlay dropped); a copy the map still lists as a replica stays and
  the primary ships it what it lacks; one the map no longer lists holds
  nothing the cluster lacks and is retired to ``.deleted/``.

A returning rack that the map lists as a replica is then resynchronised by
the primary's engine: from the generation it holds when that is on the
primary's history, else (kept aside, or too old for the outbox) by a full
reseed. The decisions are pure functions (:func:`needs_check`,
:func:`decide`); the keeper only does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from meshcloud.core.errors import MeshcloudError
from meshcloud.core.models import Assignment, ClusterSnapshot
from meshcloud.core.names import validate_name
from meshcloud.core.reconcile import LIVE, DomainState
from meshcloud.core.state import DivergedCopy
from meshcloud.hypervisor.qemu_img import run_qemu_img
from meshcloud.raft.store import PlacementStore
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import Manifest, Role
from meshcloud.replication.volume import DIVERGED, VolumeSet, fsync_dir, list_appliances

log = logging.getLogger("meshcloud.divergence")

PERIOD_S = 2.0
RECORD_FILE = "diverged.json"
DELETED = ".deleted"
EventSink = Callable[[str, str, "str | None"], None]


class Verdict(StrEnum):
    LEAVE = "leave"  # nothing to do (yet)
    KEEP_ASIDE = "keep-aside"  # holds writes the current primary lacks
    DEMOTE = "demote"  # an old primary's copy with nothing unique: becomes a replica
    RETIRE = "retire"  # holds nothing unique and the map does not list it


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    common_generation: int
    reason: str


def needs_check(
    rack: str,
    assignment: Assignment | None,
    role: Role,
    epoch: int,
    live_here: bool,
) -> bool:
    """Whether this rack's copy must be compared with the current primary's (pure).

    Not when the map does not know the appliance (deletion is the agent's
    business), when a VM of it is live here, when this rack is (or is about to
    become) its primary, when it has no primary, or when the copy is a replica
    the map lists that already follows the current epoch.
    """
    if assignment is None or live_here or assignment.primary in (None, rack):
        return False
    return not (role is Role.REPLICA and epoch >= assignment.epoch and rack in assignment.replicas)


def decide(
    rack: str,
    assignment: Assignment,
    local: Manifest,
    primary_status: Mapping[str, Any],
    active_written: bool,
) -> Decision:
    """What to do with this rack's copy, given the current primary's ``status`` (pure)."""
    if primary_status.get("role") != "primary" or int(primary_status.get("epoch", 0)) < (
        assignment.epoch
    ):
        return Decision(Verdict.LEAVE, 0, f"{assignment.primary} has not taken over yet")
    their_lineage = [(int(e), int(f)) for e, f in primary_status.get("lineage", [])]
    their_gen = int(primary_status.get("generation", 0))
    common = mf.last_common_generation(local.lineage, local.generation, their_lineage, their_gen)
    listed = rack in assignment.replicas
    name = local.appliance
    if local.generation > common:
        return Decision(
            Verdict.KEEP_ASIDE,
            common,
            f"{name}: this rack holds generations {common + 1}-{local.generation} that"
            f" {assignment.primary} (epoch {assignment.epoch}) never received",
        )
    if local.role is Role.PRIMARY:
        if active_written:
            return Decision(
                Verdict.KEEP_ASIDE,
                common,
                f"{name}: the guest wrote here after generation {common} (epoch {local.epoch})"
                f" before this rack was fenced; {assignment.primary} runs it now",
            )
        return Decision(Verdict.DEMOTE, common, f"{name}: the old primary's copy holds nothing new")
    if listed:
        return Decision(Verdict.LEAVE, common, f"{name}: a replica behind the primary")
    return Decision(
        Verdict.RETIRE,
        common,
        f"{name}: this copy (generation {local.generation}) is no longer a replica and holds"
        f" nothing {assignment.primary} lacks",
    )


def diverged_span(
    local: Manifest, common: int, active_written_at: float | None, kept_at: float
) -> tuple[float, float]:
    """(first, last) wall-clock time of the writes after ``common`` (pure)."""
    first: float | None = None
    last: float | None = None
    for record in local.history:
        if record.generation > common:
            first = record.opened_at if first is None else min(first, record.opened_at)
            last = record.frozen_at if last is None else max(last, record.frozen_at)
    if active_written_at is not None:
        opened = local.active_opened_at if local.active_opened_at is not None else active_written_at
        first = opened if first is None else min(first, opened)
        last = active_written_at if last is None else max(last, active_written_at)
    if first is None or last is None:
        return kept_at, kept_at
    return first, max(first, last)


def top_has_writes(map_json: str) -> bool:
    """Whether ``qemu-img map --output=json`` shows data in the image itself (depth 0)."""
    try:
        extents = json.loads(map_json)
    except ValueError:
        return True  # cannot tell: assume the worst, keep it aside
    return any(e.get("depth") == 0 and e.get("present") for e in extents if isinstance(e, dict))


# -- blocking helpers (run in a thread) ---------------------------------------------------


def active_writes(vs: VolumeSet, m: Manifest) -> float | None:
    """The newest mtime of an active overlay holding writes; None if all are empty."""
    if m.role is not Role.PRIMARY:
        return None
    newest: float | None = None
    for chain in m.disks:
        top = vs.top_path(m, chain.disk)
        if not top.exists():
            continue
        out = run_qemu_img(
            ["qemu-img", "map", "-U", "-f", "qcow2", "--output=json", str(top)], timeout_s=60
        )
        if top_has_writes(out):
            mtime = top.stat().st_mtime
            newest = mtime if newest is None else max(newest, mtime)
    return newest


def used_bytes(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        if item.is_file():
            total += item.stat().st_blocks * 512
    return total


def keep_aside(
    volumes: Path, rack: str, appliance: str, decision: Decision, now: float
) -> DivergedCopy:
    """Move the copy to ``.diverged/`` and describe it (blocking)."""
    vs = VolumeSet(volumes, appliance)
    with vs.locked():
        m = vs.recover(vs.load())
    written_at = active_writes(vs, m)
    first, last = diverged_span(m, decision.common_generation, written_at, now)
    target = vs.keep_aside(decision.reason)
    copy = DivergedCopy(
        rack=rack,
        id=target.name,
        appliance=appliance,
        epoch=m.epoch,
        common_generation=decision.common_generation,
        last_generation=m.generation,
        bytes=used_bytes(target),
        first_write_at=first,
        last_write_at=last,
        kept_at=now,
        reason=decision.reason[:500],
    )
    (target / RECORD_FILE).write_text(json.dumps(copy.to_dict(), indent=1, sort_keys=True) + "\n")
    fsync_dir(target)
    return copy


def demote(volumes: Path, appliance: str) -> None:
    """Turn an old primary's copy, whose active overlays are empty, into a replica."""
    vs = VolumeSet(volumes, appliance)
    with vs.locked():
        m = vs.recover(vs.load())
        if m.role is not Role.PRIMARY:
            return
        actives = [vs.top_path(m, d.disk) for d in m.disks]
        vs.save(mf.demote(m, m.epoch))
        for path in actives:
            path.unlink(missing_ok=True)
        for chain in m.disks:
            for stray in vs.disk_dir(chain.disk).glob(".next-*"):
                stray.unlink(missing_ok=True)


def retire(volumes: Path, appliance: str) -> Path:
    """Move a copy holding nothing unique to ``.deleted/<name>.<n>`` (never deleted here)."""
    vs = VolumeSet(volumes, appliance)
    target_root = volumes / DELETED
    target_root.mkdir(parents=True, exist_ok=True)
    n = 0
    while (target := target_root / f"{appliance}.{n}").exists():
        n += 1
    with vs.locked():
        os.rename(vs.dir, target)
    fsync_dir(target_root)
    fsync_dir(volumes)
    return target


def diverged_on_disk(volumes: Path) -> dict[str, DivergedCopy]:
    """``{id: DivergedCopy}`` recorded in ``.diverged/*/diverged.json``."""
    root = volumes / DIVERGED
    out: dict[str, DivergedCopy] = {}
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        try:
            copy = DivergedCopy.from_dict(json.loads((entry / RECORD_FILE).read_text()))
        except (OSError, ValueError, MeshcloudError):
            continue
        if copy.id == entry.name:
            out[copy.id] = copy
    return out


def discard(volumes: Path, ident: str) -> bool:
    """Delete ``.diverged/<ident>`` (an operator's decision); False if it was not there."""
    root = volumes / DIVERGED
    path = root / ident
    if "/" in ident or ident.startswith(".") or path.parent != root:
        raise ValueError(f"bad diverged copy id {ident!r}")
    if not path.is_dir():
        return False
    shutil.rmtree(path)
    fsync_dir(root)
    return True


def _live(domains: Mapping[str, Any]) -> set[str]:
    return {n for n, info in domains.items() if DomainState(str(info.state)) in LIVE}


# -- the keeper ---------------------------------------------------------------------------


class DivergenceKeeper:
    """Runs the decisions above on one rack (see the module docstring)."""

    def __init__(
        self,
        rack: str,
        volumes: Path,
        store: PlacementStore,
        *,
        status_of: Callable[[str, str], dict[str, Any]],
        list_domains: Callable[[], Any],
        lease_held: Callable[[], bool],
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rack = validate_name("rack", rack)
        self.volumes = volumes
        self.store = store
        self.status_of = status_of  # (primary rack, appliance) -> its status (blocking)
        self.list_domains = list_domains  # async () -> {name: DomainInfo}
        self.lease_held = lease_held
        self.on_event = on_event
        self.clock = clock
        self.last_problem: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad pass must not end the keeper
                log.exception("divergence check failed: %s", exc)
            await asyncio.sleep(PERIOD_S)

    async def once(self) -> list[str]:
        """One pass: settle copies left by failovers, then sync the map's records. Returns clauses."""
        clauses: list[str] = []
        if self.lease_held():
            clauses += await self._settle_copies()
        clauses += await self._sync_records()
        return clauses

    async def _settle_copies(self) -> list[str]:
        snapshot = self.store.snapshot()
        live = _live(await self.list_domains())
        copies = await asyncio.to_thread(self._manifests)
        clauses = []
        for name, m in sorted(copies.items()):
            if name not in snapshot.appliances:
                continue
            asg = snapshot.assignments.get(name)
            if not needs_check(self.rack, asg, m.role, m.epoch, name in live):
                continue
            assert asg is not None and asg.primary is not None
            try:
                status = await asyncio.to_thread(self.status_of, asg.primary, name)
                clause = await self._settle(name, asg, status, snapshot)
            except MeshcloudError as exc:
                self._problem(name, f"cannot compare {name} with {asg.primary} yet: {exc}")
                continue
            if clause:
                clauses.append(clause)
        return clauses

    def _manifests(self) -> dict[str, Manifest]:
        out = {}
        for name in list_appliances(self.volumes):
            with contextlib.suppress(MeshcloudError):
                out[name] = VolumeSet(self.volumes, name).load()
        return out

    async def _settle(
        self, name: str, asg: Assignment, status: Mapping[str, Any], snapshot: ClusterSnapshot
    ) -> str:
        vs = VolumeSet(self.volumes, name)
        m = await asyncio.to_thread(vs.load)
        written = await asyncio.to_thread(active_writes, vs, m)
        decision = decide(self.rack, asg, m, status, written is not None)
        # the map may have moved on while we asked: act only if it still says the same
        latest = self.store.snapshot().assignments.get(name)
        if latest is None or latest.primary != asg.primary or latest.epoch != asg.epoch:
            return ""
        if decision.verdict is Verdict.LEAVE:
            return ""
        if decision.verdict is Verdict.KEEP_ASIDE:
            copy = await asyncio.to_thread(
                keep_aside, self.volumes, self.rack, name, decision, self.clock()
            )
            await self._report(copy)
            sentence = describe(copy, asg.primary or "?")
            log.warning("%s", sentence)
            self._emit("diverged", sentence, name)
            return sentence
        if decision.verdict is Verdict.DEMOTE:
            await asyncio.to_thread(demote, self.volumes, name)
            if self.rack in asg.replicas:
                sentence = f"{decision.reason}: demoted to a replica of {asg.primary}"
                self._emit("replication", sentence, name)
                return sentence
        where = await asyncio.to_thread(retire, self.volumes, name)
        sentence = f"{decision.reason}: moved to {where}"
        self._emit("replication", sentence, name)
        return sentence

    async def _sync_records(self) -> list[str]:
        """Publish kept-aside copies the map lacks; carry out discards; drop stale records."""
        on_disk = await asyncio.to_thread(diverged_on_disk, self.volumes)
        mine = {c.id: c for c in self.store.state().diverged.values() if c.rack == self.rack}
        clauses = []
        for ident, copy in sorted(on_disk.items()):
            recorded = mine.get(ident)
            if recorded is not None and recorded.discard:
                await asyncio.to_thread(discard, self.volumes, ident)
                await self._propose({"op": "diverged_remove", "rack": self.rack, "id": ident})
                sentence = (
                    f"discarded the diverged copy {ident} of {copy.appliance}"
                    f" ({_size(copy.bytes)}) as an operator asked"
                )
                self._emit("diverged", sentence, copy.appliance)
                clauses.append(sentence)
            elif recorded is None:
                await self._report(copy)
        for ident in sorted(set(mine) - set(on_disk)):
            await self._propose({"op": "diverged_remove", "rack": self.rack, "id": ident})
        return clauses

    async def _report(self, copy: DivergedCopy) -> None:
        await self._propose({"op": "diverged_report", "record": copy.to_dict()})

    async def _propose(self, command: dict[str, Any]) -> None:
        try:
            await self.store.propose(command, timeout_s=3.0)
        except MeshcloudError as exc:
            log.debug("could not record %s: %s (retried next pass)", command["op"], exc)

    def _problem(self, name: str, message: str) -> None:
        if self.last_problem.get(name) != message:
            self.last_problem[name] = message
            log.info("%s", message)

    def _emit(self, kind: str, message: str, appliance: str | None) -> None:
        if self.on_event is not None:
            self.on_event(kind, message, appliance)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"


def describe(copy: DivergedCopy, primary: str) -> str:
    """The event sentence for a copy kept aside."""
    span = time.strftime("%H:%M:%S", time.gmtime(copy.first_write_at))
    end = time.strftime("%H:%M:%S", time.gmtime(copy.last_write_at))
    gens = (
        f"generations {copy.common_generation + 1}-{copy.last_generation}"
        if copy.last_generation > copy.common_generation
        else f"writes after generation {copy.common_generation}"
    )
    return (
        f"{copy.rack} kept aside {copy.appliance}'s {gens} ({_size(copy.bytes)}, written"
        f" {span}-{end} UTC) in {DIVERGED}/{copy.id}: the cluster continued from {primary}'s"
        f" copy; discard it with DELETE /api/v1/diverged/{copy.rack}/{copy.id}"
    )
