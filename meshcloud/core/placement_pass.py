"""The placement pass: the algorithm behind :func:`meshcloud.core.placement.place`.

One pass reserves the copies that already exist, keeps every appliance that
can stay, places the others in priority order (replica holder, roomiest rack,
or by stopping less important appliances), then places replicas site by
site. ``place`` runs another pass on the output when this one freed disk
part-way and something could use it. docs/placement.md walks through it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import TYPE_CHECKING

from meshcloud.core.models import ApplianceSpec, ApplianceState, Assignment

if TYPE_CHECKING:
    from meshcloud.core.placement import PlacementInput

NEUTRAL_PREFERENCE = 0.0
NO_GENERATION = -1


def _needs(spec: ApplianceSpec) -> str:
    return f"{spec.vcpus} vCPU, {spec.memory_mib} MiB and {spec.disk_gib} GiB"


class PlacementPass:
    """One placement pass. Mutable scratch state; the public API stays pure."""

    def __init__(
        self,
        state: PlacementInput,
        original: Mapping[str, Assignment],
        notes: dict[str, str],
        causes: dict[str, str],
    ) -> None:
        racks = state.racks
        self.racks = racks
        self.specs = state.appliances
        self.stopped = state.stopped
        self.current = state.assignments  # what this pass starts from
        self.original = original  # what the caller passed in: epochs and sentences compare to it
        self.gens = state.replica_generations
        self.alive = frozenset(n for n in state.alive if n in racks)
        self.eligible = sorted(n for n in self.alive if not racks[n].drained)
        eligible_set = frozenset(self.eligible)
        self.eligible_set = eligible_set
        self.site = {n: r.site for n, r in racks.items()}
        self.pref = {n: float(state.rack_preference.get(n, NEUTRAL_PREFERENCE)) for n in racks}
        # rack -> why it must lose its primaries (power); it keeps its copies while it lasts
        self.evacuating = {
            n: str(why) for n, why in sorted(state.evacuating.items()) if n in eligible_set
        }
        self.cap_cpu = {n: racks[n].capacity.vcpus for n in self.eligible}
        self.cap_mem = {n: racks[n].capacity.memory_mib for n in self.eligible}
        self.free_cpu = dict(self.cap_cpu)
        self.free_mem = dict(self.cap_mem)
        self.free_disk = {n: racks[n].capacity.disk_gib for n in self.eligible}
        self.version = dict.fromkeys(self.eligible, 0)
        self.order = sorted(self.specs.values(), key=lambda s: (-s.priority, s.name))
        self.disk = {s.name: s.disk_gib for s in self.order}
        self.events: list[str] = []  # copies dropped, appliances stopped for room
        self.reasons: list[str] = []  # events, then one sentence per changed appliance
        # appliance -> eligible racks holding a copy whose disk is reserved in this pass
        self.copies: dict[str, set[str]] = {s.name: set() for s in self.order}
        # appliance -> rack of a primary placed on a rack that held no copy before
        self.fresh_copy: dict[str, str] = {}
        self.primary: dict[str, str] = {}
        self.on_rack: dict[str, set[str]] = {n: set() for n in self.eligible}
        self.primary_note = notes  # sentence for a new primary or a wait; kept across passes
        self.causes = causes  # why an appliance had to be placed; kept across passes
        self.trimmed: dict[str, set[str]] = {}
        self.replicas: dict[str, tuple[str, ...]] = {}
        self.released = False
        self.waiting = 0
        self.short = 0
        self._reserve_existing_copies(eligible_set)

    # -- bookkeeping -------------------------------------------------------------------

    def _reserve_existing_copies(self, eligible_set: frozenset[str]) -> None:
        """Charge the disk of every copy already on an eligible rack, most important first."""
        for spec in self.order:
            asg = self.current.get(spec.name)
            if asg is None:
                continue
            for rack in asg.holders():
                if rack not in eligible_set:
                    continue
                if self.free_disk[rack] >= self.disk[spec.name]:
                    self.free_disk[rack] -= self.disk[spec.name]
                    self.copies[spec.name].add(rack)
                else:
                    self.trimmed.setdefault(spec.name, set()).add(rack)
                    self.events.append(
                        f"{rack} has too little disk for every copy it holds;"
                        f" dropping the copy of {spec.name} ({self.disk[spec.name]} GiB)"
                    )

    def _touch(self, rack: str) -> None:
        self.version[rack] += 1

    def _gen(self, name: str, rack: str) -> int:
        return self.gens.get(name, {}).get(rack, NO_GENERATION)

    def may_improve(self) -> bool:
        """True when disk was freed part-way and something could still use it."""
        return self.released and (self.waiting > 0 or self.short > 0)

    # -- phase 1: primaries ----------------------------------------------------------

    def _cause(self, spec: ApplianceSpec, asg: Assignment | None) -> str | None:
        """Why ``spec`` cannot stay where it is, or None when it can stay."""
        if asg is None:
            return f"{spec.name} added"
        rack = asg.primary
        if asg.state is ApplianceState.WAITING or rack is None:
            return ""  # a stopped appliance that is started again may stay on its rack
        if rack not in self.racks:
            return f"{rack} left the cluster"
        if rack not in self.alive:
            return f"{rack} lost"
        if self.racks[rack].drained:
            return f"{rack} drained"
        if rack in self.evacuating:
            return self.evacuating[rack]
        if rack not in self.copies[spec.name]:
            return f"{rack} has too little disk for {spec.name}"
        if self.free_cpu[rack] < spec.vcpus or self.free_mem[rack] < spec.memory_mib:
            return f"{rack} has too little CPU or memory for {spec.name}"
        return None

    def _assign(self, spec: ApplianceSpec, rack: str) -> None:
        self.primary[spec.name] = rack
        self.on_rack[rack].add(spec.name)
        self.free_cpu[rack] -= spec.vcpus
        self.free_mem[rack] -= spec.memory_mib
        if rack not in self.copies[spec.name]:
            self.free_disk[rack] -= self.disk[spec.name]
            self.copies[spec.name].add(rack)
            self.fresh_copy[spec.name] = rack
        self._touch(rack)

    def _evict(self, spec: ApplianceSpec) -> str:
        rack = self.primary.pop(spec.name)
        self.on_rack[rack].discard(spec.name)
        self.free_cpu[rack] += spec.vcpus
        self.free_mem[rack] += spec.memory_mib
        if self.fresh_copy.get(spec.name) == rack:
            del self.fresh_copy[spec.name]
            self.copies[spec.name].discard(rack)
            self.free_disk[rack] += self.disk[spec.name]
            self.released = True
        self._touch(rack)
        return rack

    def _headroom_entry(self, rack: str) -> tuple[float, float, str, int]:
        cpu, mem = self.cap_cpu[rack], self.cap_mem[rack]
        cpu_left = self.free_cpu[rack] / cpu if cpu > 0 else 0.0
        mem_left = self.free_mem[rack] / mem if mem > 0 else 0.0
        headroom = cpu_left if cpu_left < mem_left else mem_left
        return (-self.pref[rack], -headroom, rack, self.version[rack])

    def _place_primaries(self) -> None:
        movers: list[tuple[int, str]] = []
        causes = self.causes
        for spec in self.order:
            asg = self.current.get(spec.name)
            if spec.name in self.stopped:
                continue  # stays stopped on its rack (see _assignment)
            cause = self._cause(spec, asg)
            if cause is None:
                assert asg is not None and asg.primary is not None
                self._assign(spec, asg.primary)
                if asg.state is ApplianceState.STOPPED:
                    self.primary_note[spec.name] = (
                        f"{spec.name} started by an operator; starting it on {asg.primary}"
                    )
            else:
                if cause or spec.name not in causes:  # a later pass keeps the first cause
                    causes[spec.name] = cause
                movers.append((-spec.priority, spec.name))
        heap = [self._headroom_entry(r) for r in self.eligible if r not in self.evacuating]
        heapq.heapify(heap)
        heapq.heapify(movers)
        while movers:
            _, name = heapq.heappop(movers)
            spec = self.specs[name]
            self._place_mover(spec, causes.get(name, ""), heap, movers, causes)

    def _place_mover(
        self,
        spec: ApplianceSpec,
        cause: str,
        heap: list[tuple[float, float, str, int]],
        movers: list[tuple[int, str]],
        causes: dict[str, str],
    ) -> None:
        name = spec.name
        copies = self.copies[name]
        had_copies = sorted(copies)
        evacuating = self.evacuating
        before = self.current.get(name)
        if before is not None and before.primary in self.alive:
            # A planned move (drain, power, room): the source is up and can seed any target,
            # so racks short of power are no target.
            copies = {r for r in copies if r not in evacuating}
        # After a loss the data lives only in the copies: the freshest wins, power or not.
        holders = (
            sorted(copies, key=lambda r: (-self._gen(name, r), r in evacuating, -self.pref[r], r))
            if copies
            else []
        )
        skipped: list[str] = []
        for rack in holders:
            if self.free_cpu[rack] >= spec.vcpus and self.free_mem[rack] >= spec.memory_mib:
                self._assign(spec, rack)
                self._push(heap, rack)
                gen = self._gen(name, rack)
                detail = f"replica gen {gen}" if gen != NO_GENERATION else "it holds a replica"
                if skipped:
                    detail += f"; {', '.join(skipped)} had no room"
                self._note_primary(spec, cause, rack, detail)
                return
            skipped.append(rack)
        rack_or_none = self._pop_roomiest(spec, heap)
        if rack_or_none is not None:
            self._assign(spec, rack_or_none)
            self._push(heap, rack_or_none)
            if holders:
                detail = f"no replica holder had room; seed its disks from {holders[0]}"
            elif had_copies:
                source = before.primary if before is not None else None
                detail = f"seed its disks from {source if source in had_copies else had_copies[0]}"
            elif not cause or cause.endswith(" added"):
                detail = ""
            else:
                detail = "no replica to promote; it starts from its image"
            self._note_primary(spec, cause, rack_or_none, detail)
            return
        if self._preempt(spec, heap, movers, causes):
            return
        if self._last_resort(spec, cause):
            return
        waits = (
            f"{name} waits: no live rack has room for {_needs(spec)}"
            f" even after stopping lower-priority appliances (priority {spec.priority})"
        )
        before = self.current.get(name)
        if not cause and before is not None and before.reason.endswith(waits):
            self.primary_note[name] = before.reason  # still waiting for the same reason
        else:
            self.primary_note[name] = f"{cause}; {waits}" if cause else waits

    def _note_primary(self, spec: ApplianceSpec, cause: str, rack: str, detail: str) -> None:
        suffix = f" ({detail})" if detail else ""
        if cause.endswith(" added"):
            note = f"{cause}; placing it on {rack}{suffix}"
        elif cause:
            note = f"{cause}; moving {spec.name} to {rack}{suffix}"
        else:
            note = f"room found; starting {spec.name} on {rack}{suffix}"
        self.primary_note[spec.name] = note

    def _push(self, heap: list[tuple[float, float, str, int]], rack: str) -> None:
        if rack not in self.evacuating:
            heapq.heappush(heap, self._headroom_entry(rack))

    def _last_resort(self, spec: ApplianceSpec, cause: str) -> bool:
        """Run ``spec`` on a rack short of power when no other rack has room.

        Its current rack first (no move from one failing rack to another), then the
        freshest copy, then the most runtime.
        """
        name = spec.name
        before = self.current.get(name)
        here = before.primary if before is not None else None
        best: tuple[bool, bool, int, float, str] | None = None
        for rack in self.evacuating:
            holds = rack in self.copies[name]
            if self.free_cpu[rack] < spec.vcpus or self.free_mem[rack] < spec.memory_mib:
                continue
            if not holds and self.free_disk[rack] < self.disk[name]:
                continue
            key = (rack != here, not holds, -self._gen(name, rack), -self.pref[rack], rack)
            if best is None or key < best:
                best = key
        if best is None:
            return False
        rack = best[4]
        self._assign(spec, rack)
        if rack == here:
            self.primary_note[name] = (
                f"no rack with steady power has room for {name}; it stays on {rack}"
                " while its power lasts"
            )
        else:
            self._note_primary(spec, cause, rack, "every rack with room is short of power")
        return True

    def _pop_roomiest(
        self, spec: ApplianceSpec, heap: list[tuple[float, float, str, int]]
    ) -> str | None:
        """The preferred rack with the most headroom that fits ``spec`` with a new copy."""
        aside: list[tuple[float, float, str, int]] = []
        found: str | None = None
        while heap:
            entry = heapq.heappop(heap)
            rack = entry[2]
            if entry[3] != self.version[rack]:
                continue  # stale entry: a newer one is in the heap
            if (
                self.free_cpu[rack] >= spec.vcpus
                and self.free_mem[rack] >= spec.memory_mib
                and self.free_disk[rack] >= self.disk[spec.name]
                and rack not in self.copies[spec.name]
            ):
                found = rack
                break
            aside.append(entry)
        for entry in aside:
            heapq.heappush(heap, entry)
        return found

    def _preempt(
        self,
        spec: ApplianceSpec,
        heap: list[tuple[float, float, str, int]],
        movers: list[tuple[int, str]],
        causes: dict[str, str],
    ) -> bool:
        """Stop the least important appliances on one rack to make room for ``spec``."""
        best: tuple[tuple[int, int, bool, float, str], list[ApplianceSpec]] | None = None
        for rack in self.eligible:
            if rack in self.evacuating:
                continue  # no appliance is stopped to run another on a rack short of power
            if self.cap_cpu[rack] < spec.vcpus or self.cap_mem[rack] < spec.memory_mib:
                continue
            holds = rack in self.copies[spec.name]
            if self.free_disk[rack] < (0 if holds else self.disk[spec.name]):
                continue
            lower = sorted(
                (
                    self.specs[n]
                    for n in self.on_rack[rack]
                    if self.specs[n].priority < spec.priority
                ),
                key=lambda s: (s.priority, s.name),
            )
            cpu, mem = self.free_cpu[rack], self.free_mem[rack]
            victims: list[ApplianceSpec] = []
            for victim in lower:
                if cpu >= spec.vcpus and mem >= spec.memory_mib:
                    break
                victims.append(victim)
                cpu += victim.vcpus
                mem += victim.memory_mib
            if cpu < spec.vcpus or mem < spec.memory_mib:
                continue
            # Spare the most important victims that turn out not to be needed.
            for victim in sorted(victims, key=lambda s: (-s.priority, s.name)):
                if cpu - victim.vcpus >= spec.vcpus and mem - victim.memory_mib >= spec.memory_mib:
                    victims.remove(victim)
                    cpu -= victim.vcpus
                    mem -= victim.memory_mib
            top = max((v.priority for v in victims), default=-1)
            key = (top, len(victims), not holds, -self.pref[rack], rack)
            if best is None or key < best[0]:
                best = (key, victims)
        if best is None:
            return False
        rack = best[0][4]
        for victim in sorted(best[1], key=lambda s: (s.priority, s.name)):
            self._evict(victim)
            self.events.append(
                f"stopping {victim.name} (priority {victim.priority}) on {rack}"
                f" to make room for {spec.name} (priority {spec.priority})"
            )
            causes[victim.name] = f"{spec.name} needed room on {rack}"
            heapq.heappush(movers, (-victim.priority, victim.name))
        name = spec.name
        self._assign(spec, rack)
        self._push(heap, rack)
        gen = self._gen(name, rack)
        detail = "after stopping lower-priority appliances"
        if gen != NO_GENERATION:
            detail = f"replica gen {gen}; {detail}"
        self._note_primary(spec, causes.get(name, ""), rack, detail)
        return True

    # -- phase 2: replicas -------------------------------------------------------------

    def _place_replicas(self) -> None:
        sites: dict[str, list[tuple[int, str, int]]] = {}
        for r in self.eligible:
            if r in self.evacuating:
                continue  # no new copies on racks short of power
            sites.setdefault(self.site[r], []).append((-self.free_disk[r], r, self.version[r]))
        for heap in sites.values():
            heapq.heapify(heap)
        spare_racks = max(len(self.eligible) - 1, 0)
        for spec in self.order:
            name = spec.name
            rack = self.primary.get(name)
            if rack is None:
                self.replicas[name] = self._kept_holders(spec, sites)
                continue
            want = min(spec.replicas, spare_racks)
            copies = self.copies[name]
            chosen: list[str] = []
            used_sites = {self.site[rack]}
            duplicates: list[str] = []
            if len(copies) == 1 and want == 0:
                self.replicas[name] = ()
                continue
            existing = (
                sorted(copies - {rack}, key=lambda r: (-self._gen(name, r), r))
                if len(copies) > 1
                else []
            )
            # A rack short of power keeps its copy while it lasts, on top of the replicas.
            dying = [r for r in existing if r in self.evacuating]
            existing = [r for r in existing if r not in self.evacuating]
            for holder in existing:
                if len(chosen) < want and self.site[holder] not in used_sites:
                    chosen.append(holder)
                    used_sites.add(self.site[holder])
                else:
                    duplicates.append(holder)
            while len(chosen) < want:
                new = self._roomiest_new_site(spec, sites, used_sites)
                if new is None:
                    break
                self._add_copy(spec, new, sites)
                chosen.append(new)
                used_sites.add(self.site[new])
            for holder in duplicates:
                if len(chosen) < want:
                    chosen.append(holder)
                else:
                    self._release_copy(spec, holder, sites)
            holders = set(chosen) | {rack}
            while len(chosen) < want:
                new = self._roomiest_any_site(spec, sites, holders)
                if new is None:
                    break
                self._add_copy(spec, new, sites)
                chosen.append(new)
                holders.add(new)
            if len(chosen) < want or len(used_sites) < len(chosen) + 1:
                self.short += 1
            self.replicas[name] = tuple(sorted(chosen + dying))

    def _kept_holders(
        self, spec: ApplianceSpec, sites: dict[str, list[tuple[int, str, int]]]
    ) -> tuple[str, ...]:
        """A waiting or stopped appliance keeps the copies it had: its data lives there.

        Only copies the caller's map lists count (an earlier pass may have made a copy
        that never held data); copies dropped for lack of disk are gone.
        """
        asg = self.original.get(spec.name)
        had = set(asg.holders()) if asg is not None else set()
        copies = self.copies[spec.name]
        for rack in sorted(copies - had):
            self._release_copy(spec, rack, sites)
        kept = {r for r in had if r in self.racks and (r not in self.eligible_set or r in copies)}
        return tuple(sorted(kept))

    def _add_copy(
        self, spec: ApplianceSpec, rack: str, sites: dict[str, list[tuple[int, str, int]]]
    ) -> None:
        self.free_disk[rack] -= self.disk[spec.name]
        self.copies[spec.name].add(rack)
        self._touch(rack)
        if rack not in self.evacuating:
            heapq.heappush(
                sites[self.site[rack]], (-self.free_disk[rack], rack, self.version[rack])
            )

    def _release_copy(
        self, spec: ApplianceSpec, rack: str, sites: dict[str, list[tuple[int, str, int]]]
    ) -> None:
        self.free_disk[rack] += self.disk[spec.name]
        self.copies[spec.name].discard(rack)
        self.released = True
        self._touch(rack)
        if rack not in self.evacuating:
            heapq.heappush(
                sites[self.site[rack]], (-self.free_disk[rack], rack, self.version[rack])
            )

    def _site_top(self, heap: list[tuple[int, str, int]]) -> tuple[int, str, int] | None:
        version = self.version
        while heap and heap[0][2] != version[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _roomiest_new_site(
        self,
        spec: ApplianceSpec,
        sites: dict[str, list[tuple[int, str, int]]],
        used_sites: set[str],
    ) -> str | None:
        """The rack with the most free disk on a site holding no copy of ``spec`` yet."""
        best: tuple[int, str, int] | None = None
        need = -self.disk[spec.name]
        version = self.version
        for site, heap in sites.items():
            if site in used_sites:
                continue
            while heap and heap[0][2] != version[heap[0][1]]:
                heapq.heappop(heap)  # stale entry: the rack changed since it was pushed
            if heap and heap[0][0] <= need and (best is None or heap[0] < best):
                best = heap[0]
        return best[1] if best else None

    def _roomiest_any_site(
        self,
        spec: ApplianceSpec,
        sites: dict[str, list[tuple[int, str, int]]],
        holders: set[str],
    ) -> str | None:
        """The rack with the most free disk, on any site, that holds no copy yet."""
        best: tuple[int, str] | None = None
        for heap in sites.values():
            self._site_top(heap)
            aside: list[tuple[int, str, int]] = []
            while heap:
                entry = heapq.heappop(heap)
                if entry[2] != self.version[entry[1]]:
                    continue
                aside.append(entry)
                if entry[1] in holders:
                    continue
                if -entry[0] >= self.disk[spec.name] and (
                    best is None or (entry[0], entry[1]) < best
                ):
                    best = (entry[0], entry[1])
                break
            for entry in aside:
                heapq.heappush(heap, entry)
        return best[1] if best else None

    # -- assembly --------------------------------------------------------------------

    def run(self) -> dict[str, Assignment]:
        self._place_primaries()
        self._place_replicas()
        self.reasons = list(self.events)
        built = {spec.name: self._assignment(spec) for spec in self.order}  # reasons by priority
        out = {name: built[name] for name in sorted(built)}
        for name in sorted(set(self.original) - set(self.specs)):
            old = self.original[name]
            where = f"stopping it on {old.primary}" if old.primary else "it was not running"
            self.reasons.append(f"{name} removed; {where} and releasing its copies")
        return out

    def _assignment(self, spec: ApplianceSpec) -> Assignment:
        name = spec.name
        old = self.original.get(name)
        old_primary = old.primary if old else None
        old_epoch = old.epoch if old else 0
        rack = self.primary.get(name)
        replicas = self.replicas.get(name, ())
        if name in self.stopped:
            # Stopped on the rack that ran it: its latest writes live there, and it starts
            # there again (reconcile stops it: the map no longer says "running").
            state = ApplianceState.STOPPED
            rack = old.primary if old is not None and old.primary in self.racks else None
            replicas = tuple(r for r in replicas if r != rack)
            if old is not None and old.state is ApplianceState.STOPPED:
                reason = old.reason
            else:
                where = f" on {rack}" if rack else ""
                reason = f"{name} stopped by an operator{where}"
                self.primary_note[name] = reason
        elif rack is None:
            state = ApplianceState.WAITING
            self.waiting += 1
            reason = self.primary_note.get(name, old.reason if old else "")
        else:
            state = ApplianceState.RUNNING
            reason = self.primary_note.get(name, old.reason if old else "")
        epoch = old_epoch if rack == old_primary and old is not None else old_epoch + 1
        if old is not None and (
            old.primary == rack
            and old.replicas == replicas
            and old.epoch == epoch
            and old.state is state
            and old.reason == reason
        ):
            return old
        note = self.primary_note.get(name)
        replica_part = self._replica_sentence(spec, old, rack, replicas)
        if note is not None and (old is None or old.state is not state or old_primary != rack):
            self.reasons.append(f"{note}; {replica_part}" if replica_part else note)
        elif replica_part:
            self.reasons.append(f"{name}: {replica_part}")
        move = old.move if old is not None and old.epoch == epoch else None  # the map keeps it
        return Assignment(name, rack, replicas, epoch, state, reason, move)

    def _rack_status(self, rack: str) -> str:
        if rack not in self.racks:
            return " (left the cluster)"
        if rack not in self.alive:
            return " (lost)"
        if self.racks[rack].drained:
            return " (drained)"
        return ""

    def _replica_sentence(
        self, spec: ApplianceSpec, old: Assignment | None, rack: str | None, new: tuple[str, ...]
    ) -> str:
        """Which copies were added and dropped, or "" when the set of holders is unchanged."""
        before = set(old.holders()) if old else set()
        added = [r for r in new if r not in before]
        dropped = sorted(before - set(new) - {rack})
        if old is not None and old.primary is not None and old.primary != rack:
            dropped = [r for r in dropped if r != old.primary]  # the move sentence covers it
        parts = []
        if added:
            parts.append("adding replica on " + ", ".join(added))
        if dropped:
            parts.append(
                "dropping the copy on " + ", ".join(r + self._rack_status(r) for r in dropped)
            )
        if parts and rack is not None and len(new) < spec.replicas:
            parts.append(f"{len(new)} of {spec.replicas} replicas placed: no other rack has room")
        return "; ".join(parts)
