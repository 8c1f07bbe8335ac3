"""The receiving side: stack shipped generations, durably, and say what is held.

:class:`ReplicaStore` works on a rack's volumes root. It is used by the
SSH forced command (:mod:`meshcloud.replication.serve`, one short process
per request) and by the rack's daemon (background merges, promotion on
failover, publishing held generations through the placement map).

A commit is acknowledged only after the new manifest is on disk (written,
fsynced, renamed, directory fsynced). Until then the previous generation is
what the manifest names, and its chain is untouched: new files only ever
go on top.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcloud.core.errors import Conflict, InvalidInput, NotFound, ReplicationError
from meshcloud.core.names import validate_name
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import GenerationRecord, Manifest, Role, generation_file
from meshcloud.replication.qemu import create_overlay_named_argv, rebase_unsafe_argv
from meshcloud.replication.volume import (
    INCOMING,
    QemuRunner,
    VolumeSet,
    checksum_like,
    default_qemu_runner,
    fsync_dir,
    fsync_file,
    list_appliances,
    read_qcow2_header,
    rewrite_backing_name,
    write_durably,
)

SEED_NAME = "seed.qcow2"  # one name per disk, so an interrupted seed resumes from its partial
GenerationCallback = Callable[[str, int, int], None]  # (appliance, generation, epoch)


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{key} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class CommitRequest:
    """Stack generation ``record.generation`` (its deltas already shipped to incoming)."""

    appliance: str
    epoch: int
    parent: tuple[int, int]
    record: GenerationRecord

    def to_dict(self) -> dict[str, Any]:
        return {
            "appliance": self.appliance,
            "epoch": self.epoch,
            "parent": list(self.parent),
            "record": self.record.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CommitRequest:
        if not isinstance(data, Mapping) or set(data) != {"appliance", "epoch", "parent", "record"}:
            raise InvalidInput("commit request needs exactly appliance, epoch, parent, record")
        parent = data["parent"]
        if not isinstance(parent, list) or len(parent) != 2:
            raise InvalidInput("commit request: parent is [generation, epoch]")
        return cls(
            validate_name("appliance", data["appliance"]),
            _int(data, "epoch"),
            (_int({"g": parent[0]}, "g"), _int({"e": parent[1]}, "e")),
            GenerationRecord.from_dict(data["record"]),
        )


@dataclass(frozen=True)
class SeedRequest:
    """Install a full copy of generation ``generation`` (one flattened file per disk)."""

    appliance: str
    epoch: int
    generation: int
    lineage: tuple[tuple[int, int], ...]
    disks: Mapping[str, tuple[int, str]]  # disk -> (virtual size, checksum)
    record: GenerationRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "appliance": self.appliance,
            "epoch": self.epoch,
            "generation": self.generation,
            "lineage": [list(e) for e in self.lineage],
            "disks": {k: [v[0], v[1]] for k, v in sorted(self.disks.items())},
            "record": self.record.to_dict() if self.record else None,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SeedRequest:
        keys = {"appliance", "epoch", "generation", "lineage", "disks", "record"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise InvalidInput(f"seed request needs exactly {', '.join(sorted(keys))}")
        disks_raw = data["disks"]
        if not isinstance(disks_raw, Mapping) or not disks_raw:
            raise InvalidInput("seed request: disks must be a non-empty object")
        disks = {}
        for name, value in disks_raw.items():
            if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], str):
                raise InvalidInput("seed request: each disk is [virtual_size, checksum]")
            disks[validate_name("disk", name)] = (_int({"s": value[0]}, "s"), value[1])
        lineage_raw = data["lineage"]
        if not isinstance(lineage_raw, list):
            raise InvalidInput("seed request: lineage must be a list")
        lineage = tuple((e[0], e[1]) for e in lineage_raw if isinstance(e, list) and len(e) == 2)
        if len(lineage) != len(lineage_raw):
            raise InvalidInput("seed request: lineage entries are [epoch, first_generation]")
        record = data["record"]
        return cls(
            validate_name("appliance", data["appliance"]),
            _int(data, "epoch"),
            _int(data, "generation"),
            lineage,
            disks,
            GenerationRecord.from_dict(record) if record is not None else None,
        )


def status_of(m: Manifest) -> dict[str, Any]:
    """What a rack tells others about its copy of an appliance."""
    return {
        "appliance": m.appliance,
        "role": str(m.role),
        "epoch": m.epoch,
        "generation": m.generation,
        "head": list(m.head),
        "lineage": [list(e) for e in m.lineage],
        "disks": {d.disk: d.virtual_size for d in m.disks},
        "chain_lengths": {d.disk: len(d.files) for d in m.disks},
    }


class ReplicaStore:
    """Every appliance copy on this rack's volumes root, seen from the receiving side."""

    def __init__(
        self,
        root: Path,
        *,
        qemu: QemuRunner = default_qemu_runner,
        on_generation: GenerationCallback | None = None,
    ) -> None:
        self.root = root
        self.qemu = qemu
        self.on_generation = on_generation

    def volume(self, appliance: str) -> VolumeSet:
        return VolumeSet(self.root, appliance, qemu=self.qemu)

    @property
    def incoming_root(self) -> Path:
        return self.root / INCOMING

    # -- queries ---------------------------------------------------------

    def status(self, appliance: str) -> dict[str, Any]:
        vs = self.volume(appliance)
        with vs.locked():
            return status_of(vs.recover(vs.load()))

    def held(self) -> dict[str, tuple[int, int]]:
        """``{appliance: (generation, epoch that made it)}`` for every copy on this rack.

        This is what the daemon publishes through the placement map; a
        failover picks the live holder with the highest generation.
        """
        out = {}
        for name in list_appliances(self.root):
            try:
                out[name] = self.volume(name).load().head
            except (NotFound, InvalidInput, ReplicationError):
                continue
        return out

    # -- fencing ---------------------------------------------------------

    def fence(self, appliance: str, epoch: int) -> dict[str, Any]:
        """Record ``epoch``: from now on, requests naming an older one are refused."""
        vs = self.volume(appliance)
        with vs.locked():
            m = vs.recover(vs.load())
            if epoch > m.epoch:
                m = mf.raise_epoch(m, epoch)
                vs.save(m)
            else:
                mf.check_epoch(m, epoch, "a fence")
            return status_of(m)

    # -- commit ----------------------------------------------------------

    def commit(self, req: CommitRequest) -> dict[str, Any]:
        """Stack a shipped generation; return the new status once it is durable.

        Idempotent: committing a generation already held (same checksums)
        just returns the status, so a sender that lost the acknowledgement
        can ask again.
        """
        vs = self.volume(req.appliance)
        gen = req.record.generation
        with vs.locked():
            m = vs.recover(vs.load())
            mf.check_epoch(m, req.epoch, "a delta")
            known = m.record(gen)
            if gen <= m.generation:
                if known is not None and known.deltas == req.record.deltas:
                    return status_of(m)
                if m.epoch_of(gen) == req.record.epoch and gen < m.generation:
                    return status_of(m)  # older than what we hold, same history
                raise Conflict(
                    f"{req.appliance}: this replica already holds generation {m.generation}"
                    f" and generation {gen} differs: histories diverged"
                )
            new_m = mf.accept_delta(m, req.record, req.parent, req.epoch)
            staged: list[tuple[Path, Path]] = []
            try:
                for chain in m.disks:
                    delta = req.record.delta(chain.disk)
                    assert delta is not None  # accept_delta checked every disk is there
                    inc = vs.incoming_dir(chain.disk) / generation_file(gen)
                    if not inc.exists():
                        raise Conflict(
                            f"{req.appliance}/{chain.disk}: delta of generation {gen} was not"
                            f" received ({inc.name} missing): ship it first"
                        )
                    got = checksum_like(inc, delta.checksum)
                    if got != delta.checksum:
                        inc.unlink()
                        raise ReplicationError(
                            f"{req.appliance}/{chain.disk}: generation {gen} arrived with"
                            f" checksum {got}, expected {delta.checksum}: it was discarded;"
                            " ship it again"
                        )
                    header = read_qcow2_header(inc)
                    if header.virtual_size != chain.virtual_size:
                        inc.unlink()
                        raise ReplicationError(
                            f"{req.appliance}/{chain.disk}: delta is {header.virtual_size} bytes"
                            f" of disk, the replica {chain.virtual_size}: refused"
                        )
                    ddir = vs.disk_dir(chain.disk)
                    stage = ddir / f".recv-{generation_file(gen)}"
                    os.rename(inc, stage)
                    staged.append((stage, ddir / generation_file(gen)))
                    if not rewrite_backing_name(stage, chain.top):
                        self.qemu(rebase_unsafe_argv(stage, chain.top))
                    fsync_file(stage)
                for stage, final in staged:
                    os.rename(stage, final)
                    fsync_dir(final.parent)
            except BaseException:
                for stage, _ in staged:
                    if stage.exists():
                        stage.unlink()
                raise
            vs.save(new_m)
        if self.on_generation is not None:
            self.on_generation(req.appliance, new_m.generation, new_m.epoch_of(new_m.generation))
        return status_of(new_m)

    # -- seeding -----------------------------------------------------------

    def seed(self, req: SeedRequest) -> dict[str, Any]:
        """Install full copies shipped to incoming as the new bottom of every disk.

        An existing copy is replaced only if it holds nothing the seed lacks
        (its head is in the seed's history); otherwise keep it aside first.
        """
        vs = self.volume(req.appliance)
        staging = self.root / f".seed-{req.appliance}"
        with vs.locked():
            existing: Manifest | None = None
            if vs.exists():
                existing = vs.recover(vs.load())
                mf.check_epoch(existing, req.epoch, "a seed")
                if existing.role == Role.PRIMARY:
                    raise Conflict(
                        f"{req.appliance} is the primary on this rack: it cannot be seeded"
                    )
                common = mf.last_common_generation(
                    existing.lineage, existing.generation, req.lineage, req.generation
                )
                if common < existing.generation:
                    raise Conflict(
                        f"{req.appliance}: this rack holds generation {existing.generation}"
                        f" which the seed (generation {req.generation}) does not contain:"
                        " keep it aside first"
                    )
            if staging.exists():
                shutil.rmtree(staging)
            for disk, (vsize, checksum) in sorted(req.disks.items()):
                inc = vs.incoming_dir(disk) / SEED_NAME
                if not inc.exists():
                    raise Conflict(f"{req.appliance}/{disk}: seed file was not received: ship it")
                got = checksum_like(inc, checksum)
                if got != checksum:
                    inc.unlink()
                    raise ReplicationError(
                        f"{req.appliance}/{disk}: seed arrived with checksum {got}, expected"
                        f" {checksum}: discarded; ship it again"
                    )
                header = read_qcow2_header(inc)
                if header.virtual_size != vsize or header.backing_name:
                    inc.unlink()
                    raise ReplicationError(
                        f"{req.appliance}/{disk}: the seed must be a standalone image of"
                        f" {vsize} bytes: refused"
                    )
                (staging / disk).mkdir(parents=True)
                target = staging / disk / generation_file(req.generation)
                os.rename(inc, target)
                fsync_file(target)
                fsync_dir(target.parent)
            m = Manifest(
                appliance=req.appliance,
                role=Role.REPLICA,
                epoch=max(req.epoch, existing.epoch if existing else 0),
                generation=req.generation,
                disks=tuple(
                    mf.DiskChain(d, req.disks[d][0], (generation_file(req.generation),))
                    for d in sorted(req.disks)
                ),
                lineage=req.lineage,
                history=(req.record,) if req.record else (),
            )
            write_durably(staging / "manifest.json", m.to_json())
            fsync_dir(staging)
            self._swap_in(req.appliance, staging)
        if self.on_generation is not None:
            self.on_generation(req.appliance, m.generation, m.epoch_of(m.generation))
        return status_of(m)

    def _swap_in(self, appliance: str, staging: Path) -> None:
        live = self.root / appliance
        trash = self.root / f".trash-{appliance}"
        if trash.exists():
            shutil.rmtree(trash)
        if live.exists():
            # keep the lock file's directory usable: move the old copy out first
            os.rename(live, trash)
        os.rename(staging, live)
        fsync_dir(self.root)
        if trash.exists():
            shutil.rmtree(trash)

    def recover_all(self) -> None:
        """At start-up: finish seeds and merges a crash interrupted."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(".seed-") and (entry / "manifest.json").exists():
                name = entry.name.removeprefix(".seed-")
                if not (self.root / name).exists():
                    os.rename(entry, self.root / name)
                    fsync_dir(self.root)
                else:
                    shutil.rmtree(entry)
            elif entry.name.startswith(".trash-"):
                name = entry.name.removeprefix(".trash-")
                if (self.root / name).exists():
                    shutil.rmtree(entry)
                else:  # the swap stopped between its two renames: the old copy comes back
                    os.rename(entry, self.root / name)
        for name in list_appliances(self.root):
            vs = self.volume(name)
            with vs.locked():
                m = vs.recover(vs.load())
                vs.remove_strays(m)

    # -- background work -------------------------------------------------

    def merge_pending(self) -> int:
        """Merge stacked generations down on every replica copy; return merges done."""
        done = 0
        for name in list_appliances(self.root):
            vs = self.volume(name)
            try:
                if vs.load().role == Role.REPLICA:
                    done += vs.merge_all()
            except (NotFound, Conflict):
                continue
        return done

    def clean_incoming(self, appliance: str, older_than_s: float, now: float | None = None) -> int:
        """Remove delta files (and partials) left in incoming for longer than ``older_than_s``."""
        base = self.incoming_root / validate_name("appliance", appliance)
        if not base.is_dir():
            return 0
        limit = (time.time() if now is None else now) - older_than_s
        removed = 0
        for path in base.rglob("*"):
            if path.is_file() and path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
        return removed

    # -- failover --------------------------------------------------------

    def promote(self, appliance: str, epoch: int, now: float | None = None) -> dict[str, Path]:
        """Make this copy the primary under ``epoch``; return each disk's active overlay.

        The hypervisor starts the appliance on these files. Stacked overlays
        stay (merges continue later as live block commits on the primary).
        """
        vs = self.volume(appliance)
        with vs.locked():
            m = vs.recover(vs.load())
            if m.role == Role.PRIMARY:
                mf.check_epoch(m, epoch, "a promotion")
                if epoch > m.epoch:
                    m = mf.raise_epoch(m, epoch)
                    vs.save(m)
                return {d.disk: vs.top_path(m, d.disk) for d in m.disks}
            new_m = mf.promote(m, epoch, time.time() if now is None else now)
            for chain in new_m.disks:
                active = vs.file(chain.disk, chain.top)
                if active.exists():
                    active.unlink()
                self.qemu(create_overlay_named_argv(active, chain.files[-2]))
                fsync_file(active)
                fsync_dir(active.parent)
            vs.save(new_m)
            return {d.disk: vs.top_path(new_m, d.disk) for d in new_m.disks}
