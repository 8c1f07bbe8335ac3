"""The replica manifest: what a volume set holds, as plain, validated data (pure).

One manifest per appliance, on every rack that holds its disks, at
``<volumes>/<appliance>/manifest.json``. It names the generation the rack
holds, the highest epoch it has seen (the fencing token), the lineage of
epochs (which epoch created which generations, like PostgreSQL timelines),
each disk's qcow2 chain (bottom first) and the recent generations with
their checksums and the time span of their writes.

Generations are numbered per appliance from 1; generation 0 is the empty
or seeded starting point. All disks of an appliance are frozen together
(one atomic libvirt snapshot), so a generation is consistent across disks.

File names inside a disk directory are ``g<generation:012d>.qcow2``: an
overlay is named after the generation whose writes it holds; the bottom of
a chain is named after the last generation merged into it. Nothing here
does I/O; :mod:`meshcloud.replication.durable` reads and writes the file.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from meshcloud.core.errors import Conflict, InvalidInput
from meshcloud.core.names import validate_name

FORMAT_VERSION = 1
MAX_GENERATION = (1 << 62) - 1
HISTORY_KEEP = 64  # generation records always kept (time spans of writes)
HISTORY_MAX = 256  # and at most this many, for replicas that lag (then they are reseeded)
_GEN_FILE_RE = re.compile(r"^g([0-9]{12})\.qcow2$")
_CHECKSUM_RE = re.compile(r"^(xxh128:[0-9a-f]{32}|sha1:[0-9a-f]{40})$")


class StaleEpoch(Conflict):
    """A request named an epoch older than one this rack has seen: the sender was fenced."""


class Role(StrEnum):
    PRIMARY = "primary"  # runs the appliance, freezes and ships generations
    REPLICA = "replica"  # receives and stacks generations


def generation_file(generation: int) -> str:
    """The file name of the overlay holding ``generation`` (or a bottom merged up to it)."""
    _check_generation("generation", generation)
    return f"g{generation:012d}.qcow2"


def parse_generation_file(name: str) -> int | None:
    """The generation a chain file name stands for, or None if it is not one."""
    match = _GEN_FILE_RE.match(name)
    return int(match.group(1)) if match else None


def _check_generation(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{key} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_GENERATION:
        raise InvalidInput(f"{key} ({value}) must be between 0 and {MAX_GENERATION}")
    return value


def _check_time(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{key} must be a finite number of seconds")
    if value < 0:
        raise InvalidInput(f"{key} ({value}) must not be negative")
    return float(value)


def _check_file(key: str, value: object) -> str:
    if not isinstance(value, str) or parse_generation_file(value) is None:
        raise InvalidInput(f"{key} {value!r} is not a chain file name (g<12 digits>.qcow2)")
    return value


def _keys(owner: str, data: object, allowed: set[str], required: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{owner} must be an object, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise InvalidInput(f"{owner}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(required - set(data))
    if missing:
        raise InvalidInput(f"{owner}: missing field(s) {', '.join(missing)}")
    return data


@dataclass(frozen=True)
class DiskDelta:
    """One disk's frozen overlay for one generation, as shipped."""

    disk: str
    file: str
    size_bytes: int
    checksum: str  # "xxh128:<hex>" (or "sha1:<hex>"), the full-file checksum rsync reports

    def __post_init__(self) -> None:
        validate_name("disk", self.disk)
        _check_file(f"delta of disk {self.disk}: file", self.file)
        _check_generation(f"delta of disk {self.disk}: size_bytes", self.size_bytes)
        if not isinstance(self.checksum, str) or not _CHECKSUM_RE.match(self.checksum):
            raise InvalidInput(
                f"delta of disk {self.disk}: checksum {self.checksum!r} must be"
                " xxh128:<32 hex> or sha1:<40 hex>"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "file": self.file,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
        }

    @classmethod
    def from_dict(cls, data: object) -> DiskDelta:
        fields = {"disk", "file", "size_bytes", "checksum"}
        d = _keys("delta", data, fields, fields)
        return cls(d["disk"], d["file"], d["size_bytes"], d["checksum"])


@dataclass(frozen=True)
class GenerationRecord:
    """A frozen generation: who made it, when its writes happened, what it weighs.

    ``opened_at`` is when its overlays started taking writes and ``frozen_at``
    when they were frozen (wall-clock seconds of the primary): every write of
    the generation happened in between. ``deltas`` is empty until the
    checksums are known (the primary learns them while shipping).
    """

    generation: int
    epoch: int
    opened_at: float
    frozen_at: float
    data_bytes: int = 0
    deltas: tuple[DiskDelta, ...] = ()

    def __post_init__(self) -> None:
        _check_generation("generation", self.generation)
        if self.generation == 0:
            raise InvalidInput("a generation record must have a generation of at least 1")
        _check_generation(f"generation {self.generation}: epoch", self.epoch)
        _check_time(f"generation {self.generation}: opened_at", self.opened_at)
        _check_time(f"generation {self.generation}: frozen_at", self.frozen_at)
        if self.frozen_at < self.opened_at:
            raise InvalidInput(
                f"generation {self.generation}: frozen_at ({self.frozen_at}) is before"
                f" opened_at ({self.opened_at})"
            )
        _check_generation(f"generation {self.generation}: data_bytes", self.data_bytes)
        disks = [d.disk for d in self.deltas]
        if len(set(disks)) != len(disks):
            raise InvalidInput(f"generation {self.generation}: one delta per disk")

    def delta(self, disk: str) -> DiskDelta | None:
        for d in self.deltas:
            if d.disk == disk:
                return d
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "epoch": self.epoch,
            "opened_at": self.opened_at,
            "frozen_at": self.frozen_at,
            "data_bytes": self.data_bytes,
            "deltas": [d.to_dict() for d in self.deltas],
        }

    @classmethod
    def from_dict(cls, data: object) -> GenerationRecord:
        fields = {"generation", "epoch", "opened_at", "frozen_at", "data_bytes", "deltas"}
        d = _keys("generation record", data, fields, fields - {"data_bytes", "deltas"})
        deltas = d.get("deltas", [])
        if not isinstance(deltas, list):
            raise InvalidInput("generation record: deltas must be a list")
        return cls(
            d["generation"],
            d["epoch"],
            d["opened_at"],
            d["frozen_at"],
            d.get("data_bytes", 0),
            tuple(DiskDelta.from_dict(x) for x in deltas),
        )


@dataclass(frozen=True)
class DiskChain:
    """One disk's qcow2 chain on this rack: file names, bottom first.

    On a primary the last file is the active overlay the guest writes to.
    """

    disk: str
    virtual_size: int
    files: tuple[str, ...]

    def __post_init__(self) -> None:
        validate_name("disk", self.disk)
        _check_generation(f"disk {self.disk}: virtual_size", self.virtual_size)
        if not self.files:
            raise InvalidInput(f"disk {self.disk}: a chain has at least one file")
        gens = [
            parse_generation_file(_check_file(f"disk {self.disk}: file", f)) for f in self.files
        ]
        if any(b is None or a is None or b <= a for a, b in itertools.pairwise(gens)):
            raise InvalidInput(f"disk {self.disk}: chain files must have rising generations")

    @property
    def top(self) -> str:
        return self.files[-1]

    @property
    def bottom(self) -> str:
        return self.files[0]

    def to_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "virtual_size": self.virtual_size, "files": list(self.files)}

    @classmethod
    def from_dict(cls, data: object) -> DiskChain:
        fields = {"disk", "virtual_size", "files"}
        d = _keys("disk chain", data, fields, fields)
        if not isinstance(d["files"], list):
            raise InvalidInput("disk chain: files must be a list")
        return cls(d["disk"], d["virtual_size"], tuple(d["files"]))


@dataclass(frozen=True)
class PendingRename:
    """A merge on a replica that has written its data and still has to rename the bottom.

    After ``qemu-img commit`` of overlay ``target`` into the bottom ``source``,
    the merged bottom is renamed to ``target`` (replacing the overlay), so the
    next overlay's backing name points at it without rewriting any header.
    """

    disk: str
    source: str
    target: str

    def __post_init__(self) -> None:
        validate_name("disk", self.disk)
        _check_file("pending rename source", self.source)
        _check_file("pending rename target", self.target)

    def to_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "source": self.source, "target": self.target}

    @classmethod
    def from_dict(cls, data: object) -> PendingRename:
        fields = {"disk", "source", "target"}
        d = _keys("pending rename", data, fields, fields)
        return cls(d["disk"], d["source"], d["target"])


@dataclass(frozen=True)
class Manifest:
    """Everything one rack durably knows about one appliance's disks.

    ``generation`` is the last complete generation held (on a primary: the
    last frozen one). ``epoch`` is the highest epoch this rack has seen for
    the appliance: requests naming an older one are refused. ``lineage``
    lists ``(epoch, first generation made under it)`` in rising order.
    ``history`` keeps recent generation records, oldest first. On a primary,
    ``active_opened_at`` is when the active overlays started taking writes
    and ``acked`` maps replica racks to the generation each acknowledged.
    """

    appliance: str
    role: Role
    epoch: int
    generation: int
    disks: tuple[DiskChain, ...]
    lineage: tuple[tuple[int, int], ...] = ()
    history: tuple[GenerationRecord, ...] = ()
    active_opened_at: float | None = None
    acked: Mapping[str, int] = field(default_factory=dict)
    pending_renames: tuple[PendingRename, ...] = ()

    def __post_init__(self) -> None:
        validate_name("appliance", self.appliance)
        owner = f"manifest of {self.appliance}"
        if not isinstance(self.role, Role):
            raise InvalidInput(f"{owner}: role must be primary or replica")
        _check_generation(f"{owner}: epoch", self.epoch)
        _check_generation(f"{owner}: generation", self.generation)
        names = [d.disk for d in self.disks]
        if not names or len(set(names)) != len(names) or names != sorted(names):
            raise InvalidInput(f"{owner}: disks must be a non-empty list sorted by unique name")
        last_epoch, last_first = -1, -1
        for entry in self.lineage:
            if len(entry) != 2:
                raise InvalidInput(f"{owner}: lineage entries are [epoch, first_generation]")
            epoch, first = (_check_generation(f"{owner}: lineage", v) for v in entry)
            if epoch <= last_epoch or first < last_first:
                raise InvalidInput(f"{owner}: lineage epochs and generations must rise")
            last_epoch, last_first = epoch, first
        if self.lineage and last_epoch > self.epoch:
            raise InvalidInput(f"{owner}: lineage names epoch {last_epoch} above {self.epoch}")
        gens = [r.generation for r in self.history]
        if gens != sorted(set(gens)) or (gens and gens[-1] > self.generation):
            raise InvalidInput(f"{owner}: history must rise and end at most at the generation")
        if self.active_opened_at is not None:
            _check_time(f"{owner}: active_opened_at", self.active_opened_at)
        for rack, gen in self.acked.items():
            validate_name("rack", rack)
            _check_generation(f"{owner}: acked[{rack}]", gen)

    # -- queries ---------------------------------------------------------

    def chain(self, disk: str) -> DiskChain:
        for d in self.disks:
            if d.disk == disk:
                return d
        raise InvalidInput(f"appliance {self.appliance} has no disk {disk!r}")

    def record(self, generation: int) -> GenerationRecord | None:
        for r in self.history:
            if r.generation == generation:
                return r
        return None

    @property
    def disk_names(self) -> tuple[str, ...]:
        return tuple(d.disk for d in self.disks)

    def epoch_of(self, generation: int) -> int:
        """The epoch under which ``generation`` was made (0 before any lineage entry)."""
        return epoch_of_generation(self.lineage, generation)

    @property
    def head(self) -> tuple[int, int]:
        """``(generation, epoch that made it)``: what a delta must build on."""
        return (self.generation, self.epoch_of(self.generation))

    # -- serialisation ---------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "appliance": self.appliance,
            "role": str(self.role),
            "epoch": self.epoch,
            "generation": self.generation,
            "disks": [d.to_dict() for d in self.disks],
            "lineage": [list(e) for e in self.lineage],
            "history": [r.to_dict() for r in self.history],
            "active_opened_at": self.active_opened_at,
            "acked": dict(sorted(self.acked.items())),
            "pending_renames": [p.to_dict() for p in self.pending_renames],
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        fields = {
            "format", "appliance", "role", "epoch", "generation", "disks", "lineage",
            "history", "active_opened_at", "acked", "pending_renames",
        }  # fmt: skip
        d = _keys("manifest", data, fields, {"format", "appliance", "role", "epoch", "generation"})
        if d["format"] != FORMAT_VERSION:
            raise InvalidInput(
                f"manifest format {d['format']!r} is not {FORMAT_VERSION}: upgrade meshcloud"
            )
        if d["role"] not in ("primary", "replica"):
            raise InvalidInput(f"manifest: role {d['role']!r} must be primary or replica")
        lists = {k: d.get(k, []) for k in ("disks", "lineage", "history", "pending_renames")}
        for key, value in lists.items():
            if not isinstance(value, list):
                raise InvalidInput(f"manifest: {key} must be a list")
        acked = d.get("acked", {})
        if not isinstance(acked, Mapping):
            raise InvalidInput("manifest: acked must be an object")
        lineage = []
        for e in lists["lineage"]:
            if not isinstance(e, list) or len(e) != 2:
                raise InvalidInput("manifest: lineage entries are [epoch, first_generation]")
            lineage.append((e[0], e[1]))
        return cls(
            appliance=d["appliance"],
            role=Role(d["role"]),
            epoch=d["epoch"],
            generation=d["generation"],
            disks=tuple(DiskChain.from_dict(x) for x in lists["disks"]),
            lineage=tuple(lineage),
            history=tuple(GenerationRecord.from_dict(x) for x in lists["history"]),
            active_opened_at=d.get("active_opened_at"),
            acked=dict(acked),
            pending_renames=tuple(PendingRename.from_dict(x) for x in lists["pending_renames"]),
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# -- lineage ---------------------------------------------------------------


def epoch_of_generation(lineage: Sequence[tuple[int, int]], generation: int) -> int:
    """The epoch that made ``generation``: the last lineage entry starting at or below it."""
    epoch = 0
    for entry_epoch, first in lineage:
        if first <= generation:
            epoch = entry_epoch
        else:
            break
    return epoch


def extend_lineage(
    lineage: Sequence[tuple[int, int]], epoch: int, first_generation: int
) -> tuple[tuple[int, int], ...]:
    """``lineage`` with generations from ``first_generation`` on made under ``epoch``."""
    if lineage and lineage[-1][0] == epoch:
        return tuple(lineage)
    if lineage and epoch < lineage[-1][0]:
        raise Conflict(
            f"epoch {epoch} is older than the lineage's last epoch {lineage[-1][0]}:"
            " this rack was fenced; ask the placement map for the current epoch"
        )
    kept = tuple(e for e in lineage if e[1] < first_generation)
    return (*kept, (epoch, first_generation))


def last_common_generation(
    lineage_a: Sequence[tuple[int, int]],
    generation_a: int,
    lineage_b: Sequence[tuple[int, int]],
    generation_b: int,
) -> int:
    """The highest generation both histories share (same number, made under the same epoch).

    Two racks whose heads were made under different epochs diverged at the
    first generation where the epochs differ, like PostgreSQL timelines.
    """
    upper = min(generation_a, generation_b)
    boundaries = sorted({0, *(f for _, f in lineage_a), *(f for _, f in lineage_b)})
    common = upper
    for start in boundaries:
        if start > upper:
            break
        if epoch_of_generation(lineage_a, start) != epoch_of_generation(lineage_b, start):
            common = min(common, start - 1)
            break
    return max(common, 0)


# -- transitions (pure: each returns a new manifest) ------------------------


def new_manifest(
    appliance: str,
    role: Role,
    epoch: int,
    disks: Mapping[str, int],
    *,
    generation: int = 0,
    lineage: Sequence[tuple[int, int]] = (),
    active_opened_at: float | None = None,
) -> Manifest:
    """A manifest whose disks are each a single file named after ``generation``.

    On a primary the chain is ``[bottom, active]`` where the active overlay
    is named after ``generation + 1``.
    """
    files: tuple[str, ...] = (generation_file(generation),)
    if role == Role.PRIMARY:
        files += (generation_file(generation + 1),)
    chains = tuple(DiskChain(name, disks[name], files) for name in sorted(disks))
    return Manifest(
        appliance=appliance,
        role=role,
        epoch=epoch,
        generation=generation,
        disks=chains,
        lineage=tuple(lineage) or ((epoch, generation + 1),),
        active_opened_at=active_opened_at,
    )


def _trim(history: Sequence[GenerationRecord], keep_from: int) -> tuple[GenerationRecord, ...]:
    """The last HISTORY_KEEP records, plus every one from ``keep_from`` on (at most HISTORY_MAX).

    Records from the slowest replica's generation on are what the primary
    ships; a replica further behind than HISTORY_MAX generations is reseeded.
    """
    by_gen = {r.generation: r for r in history[-HISTORY_KEEP:]}
    by_gen.update((r.generation, r) for r in history if r.generation >= keep_from)
    return tuple(by_gen[g] for g in sorted(by_gen))[-HISTORY_MAX:]


def check_epoch(manifest: Manifest, epoch: int, what: str) -> None:
    """Raise Conflict if ``epoch`` is older than the highest this rack has seen."""
    if epoch < manifest.epoch:
        raise StaleEpoch(
            f"{what} for {manifest.appliance} names epoch {epoch}, but this rack has seen"
            f" epoch {manifest.epoch}: the sender was fenced; it must stop and re-read the"
            " placement map"
        )


def freeze_primary(manifest: Manifest, epoch: int, now: float, data_bytes: int) -> Manifest:
    """After the snapshot: the active overlays became generation N+1, new ones are active."""
    if manifest.role != Role.PRIMARY:
        raise Conflict(f"{manifest.appliance}: only the primary freezes generations")
    check_epoch(manifest, epoch, "a freeze")
    gen = manifest.generation + 1
    opened = manifest.active_opened_at if manifest.active_opened_at is not None else now
    record = GenerationRecord(gen, epoch, min(opened, now), now, data_bytes)
    disks = tuple(replace(d, files=(*d.files, generation_file(gen + 1))) for d in manifest.disks)
    keep_from = min([gen, *manifest.acked.values()]) if manifest.acked else gen
    return replace(
        manifest,
        epoch=epoch,
        generation=gen,
        disks=disks,
        lineage=extend_lineage(manifest.lineage, epoch, gen),
        history=_trim((*manifest.history, record), keep_from),
        active_opened_at=now,
    )


def record_checksums(manifest: Manifest, generation: int, deltas: Sequence[DiskDelta]) -> Manifest:
    """The primary learned the checksums of a generation's deltas while shipping it."""
    history = tuple(
        replace(r, deltas=tuple(sorted(deltas, key=lambda d: d.disk)))
        if r.generation == generation
        else r
        for r in manifest.history
    )
    return replace(manifest, history=history)


def merged_on_primary(manifest: Manifest, disk: str, merged_file: str) -> Manifest:
    """A frozen overlay was merged into the bottom by a live block commit (names unchanged)."""
    disks = tuple(
        replace(d, files=tuple(f for f in d.files if f != merged_file)) if d.disk == disk else d
        for d in manifest.disks
    )
    return replace(manifest, disks=disks)


def acknowledge(manifest: Manifest, rack: str, generation: int) -> Manifest:
    """The primary records that ``rack`` holds ``generation``."""
    acked = dict(manifest.acked)
    acked[validate_name("rack", rack)] = max(generation, acked.get(rack, 0))
    return replace(manifest, acked=acked)


def forget_replica(manifest: Manifest, rack: str) -> Manifest:
    acked = {k: v for k, v in manifest.acked.items() if k != rack}
    return replace(manifest, acked=acked)


def accept_delta(
    manifest: Manifest,
    record: GenerationRecord,
    parent: tuple[int, int],
    epoch: int,
) -> Manifest:
    """A replica stacks generation ``record.generation`` on its chain.

    ``parent`` is ``(generation, epoch that made it)`` the delta was taken
    on top of; it must be exactly this replica's head, or the histories
    diverged. Raises Conflict for an old epoch, a gap or a divergence.
    """
    if manifest.role != Role.REPLICA:
        raise Conflict(
            f"{manifest.appliance} is the primary on this rack: it does not accept deltas"
        )
    check_epoch(manifest, epoch, "a delta")
    if record.generation != parent[0] + 1:
        raise InvalidInput(
            f"delta generation {record.generation} does not follow its parent {parent[0]}"
        )
    if parent != manifest.head:
        if parent[0] != manifest.generation:
            raise Conflict(
                f"{manifest.appliance}: this replica holds generation {manifest.generation},"
                f" the delta builds on {parent[0]}: ship the generations in between"
                " (or reseed)"
            )
        raise Conflict(
            f"{manifest.appliance}: generation {parent[0]} here was made under epoch"
            f" {manifest.head[1]}, the sender's under epoch {parent[1]}: the histories"
            " diverged; keep this copy aside and reseed"
        )
    if {d.disk for d in record.deltas} != set(manifest.disk_names):
        raise InvalidInput(
            f"delta for generation {record.generation} must carry every disk"
            f" ({', '.join(manifest.disk_names)})"
        )
    gen = record.generation
    disks = tuple(replace(d, files=(*d.files, generation_file(gen))) for d in manifest.disks)
    return replace(
        manifest,
        epoch=max(epoch, manifest.epoch),
        generation=gen,
        disks=disks,
        lineage=extend_lineage(manifest.lineage, record.epoch, gen),
        history=_trim((*manifest.history, record), 0),
    )


def raise_epoch(manifest: Manifest, epoch: int) -> Manifest:
    """Record a newer epoch (a fence): older senders are refused from now on."""
    check_epoch(manifest, epoch, "a fence")
    return replace(manifest, epoch=epoch)


def begin_merge(manifest: Manifest, disk: str) -> tuple[str, str] | None:
    """The (bottom, overlay) pair to merge next on ``disk``, or None if the chain is flat."""
    files = manifest.chain(disk).files
    limit = len(files) - (1 if manifest.role == Role.PRIMARY else 0)
    if limit < 2:
        return None
    return files[0], files[1]


def merged_on_replica(manifest: Manifest, disk: str, bottom: str, overlay: str) -> Manifest:
    """The overlay's data is in the bottom; the bottom is about to be renamed to the overlay."""
    chain = manifest.chain(disk)
    if chain.files[:2] != (bottom, overlay):
        raise Conflict(f"{manifest.appliance}/{disk}: chain changed under the merge")
    disks = tuple(replace(d, files=d.files[1:]) if d.disk == disk else d for d in manifest.disks)
    pending = (*manifest.pending_renames, PendingRename(disk, bottom, overlay))
    return replace(manifest, disks=disks, pending_renames=pending)


def rename_done(manifest: Manifest, disk: str) -> Manifest:
    return replace(
        manifest, pending_renames=tuple(p for p in manifest.pending_renames if p.disk != disk)
    )


def promote(manifest: Manifest, epoch: int, now: float) -> Manifest:
    """This replica becomes the primary under ``epoch``: an active overlay goes on top."""
    check_epoch(manifest, epoch, "a promotion")
    if manifest.pending_renames:
        raise Conflict(f"{manifest.appliance}: finish the pending merge before promoting")
    gen = manifest.generation
    disks = manifest.disks
    if manifest.role == Role.REPLICA:
        disks = tuple(replace(d, files=(*d.files, generation_file(gen + 1))) for d in disks)
    return replace(
        manifest,
        role=Role.PRIMARY,
        epoch=epoch,
        disks=disks,
        active_opened_at=now,
        acked={},
    )


def demote(manifest: Manifest, epoch: int) -> Manifest:
    """The primary hands over (after a final sync): its active overlays are dropped.

    Only valid when nothing was written since the last freeze (the guest is
    stopped); the caller deletes the active files.
    """
    check_epoch(manifest, epoch, "a demotion")
    if manifest.role != Role.PRIMARY:
        return replace(manifest, epoch=epoch)
    disks = tuple(replace(d, files=d.files[:-1]) for d in manifest.disks)
    return replace(
        manifest, role=Role.REPLICA, epoch=epoch, disks=disks, active_opened_at=None, acked={}
    )


def replace_deltas(record: GenerationRecord, deltas: Sequence[DiskDelta]) -> GenerationRecord:
    """``record`` with ``deltas`` (sorted by disk)."""
    return replace(record, deltas=tuple(sorted(deltas, key=lambda d: d.disk)))
