"""Appliance disks for the agent, in the replication engine's layout.

Every disk is a qcow2 chain under ``<state_dir>/volumes/<appliance>/<disk>/``
managed by :mod:`meshcloud.replication` (docs/replication.md): a bottom
image (a private copy of the image's disk template, or blank) and an active
qcow2 overlay with 4 KiB clusters that the VM writes, so that replication
ships what changed. The agent only ever asks two things:

- :meth:`ApplianceVolumes.prepare`: the disk paths to start an appliance on
  under an epoch. An existing copy is promoted to primary under that epoch
  (the volume layer refuses an epoch older than one it has seen: a fenced
  rack cannot start a stale copy); with no copy here, new volumes are made.
- :meth:`ApplianceVolumes.retire`: an appliance was deleted from the map;
  its volumes are moved to ``.deleted/`` (never removed by the agent).

Both block (qemu-img, fsync): call them from a thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from meshcloud.core.errors import Conflict, InvalidInput
from meshcloud.core.models import ApplianceSpec
from meshcloud.core.names import validate_name
from meshcloud.replication.engine import ReplicationEngine
from meshcloud.replication.volume import fsync_dir

GIB = 1 << 30
DELETED = ".deleted"


class ApplianceVolumes:
    """The agent's view of the volume layer (one per rack)."""

    def __init__(self, engine: ReplicationEngine) -> None:
        self.engine = engine

    @property
    def root(self) -> Path:
        return self.engine.volumes

    def exists(self, appliance: str) -> bool:
        return self.engine.store.volume(appliance).exists()

    def prepare(
        self, spec: ApplianceSpec, epoch: int, templates: Mapping[str, Path] | None = None
    ) -> dict[str, Path]:
        """``{disk: path}`` to start ``spec`` on under ``epoch`` (promote or create; blocking)."""
        if not spec.disks:
            return {}
        store = self.engine.store
        wanted = {d.name for d in spec.disks}
        if store.volume(spec.name).exists():
            paths = store.promote(spec.name, epoch)
            if set(paths) != wanted:
                raise Conflict(
                    f"appliance {spec.name}: the volumes here hold disks {sorted(paths)} but the"
                    f" spec names {sorted(wanted)}: disks cannot be added or removed in place;"
                    " deploy it under a new name"
                )
            return paths
        sizes = {d.name: d.size_gib * GIB for d in spec.disks}
        chosen = {d: p for d, p in (templates or {}).items() if d in sizes}
        return self.engine.create_volumes(spec.name, sizes, epoch, templates=chosen)

    def retire(self, appliance: str) -> Path | None:
        """Move a deleted appliance's volumes to ``.deleted/<name>.<n>``; None if there were none."""
        validate_name("appliance", appliance)
        vs = self.engine.store.volume(appliance)
        if not vs.dir.exists():
            return None
        target_root = self.root / DELETED
        target_root.mkdir(parents=True, exist_ok=True)
        n = 0
        while (target := target_root / f"{appliance}.{n}").exists():
            n += 1
            if n > 10_000:
                raise InvalidInput(f"{target_root} holds too many copies of {appliance}: clean up")
        with vs.locked():
            os.rename(vs.dir, target)
        fsync_dir(target_root)
        fsync_dir(self.root)
        return target
