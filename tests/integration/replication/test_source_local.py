"""Source-side freezes with a stand-in for libvirt (qemu-img only, no ssh)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from meshcloud.core.errors import ReplicationError
from meshcloud.replication.manifest import generation_file
from meshcloud.replication.qemu import (
    commit_argv,
    create_overlay_named_argv,
    parse_qcow2_header,
    rebase_unsafe_argv,
)
from meshcloud.replication.source import ApplianceSource
from meshcloud.replication.volume import default_qemu_runner, read_qcow2_header


class FakeLive:
    """Switches the 'guest' to the new overlays like libvirt, optionally failing after."""

    def __init__(self, src_paths: dict[str, str], fail_after_switch: bool = False) -> None:
        self.current = src_paths
        self.fail_after_switch = fail_after_switch

    def running(self) -> bool:
        return True

    def freeze(self, new_overlays: Mapping[str, Path], description: str) -> None:
        self.current = {d: str(p) for d, p in new_overlays.items()}
        if self.fail_after_switch:
            raise ReplicationError("libvirt reported an error after switching")

    def commit(self, disk: str, top: Path, base: Path) -> None:
        raise AssertionError("not used here")

    def sources(self) -> dict[str, str]:
        return dict(self.current)


def test_a_snapshot_that_took_effect_is_kept_even_if_reported_failed(tmp_path: Path) -> None:
    src = ApplianceSource.create(tmp_path, "app", {"data": 8 << 20}, epoch=1)
    live = FakeLive({"data": str(src.active_paths()["data"])}, fail_after_switch=True)
    src.live = live
    record = src.freeze(1)
    assert record.generation == 1
    active = src.active_paths()["data"]
    assert str(active) == live.current["data"] and active.exists()


def test_a_failed_snapshot_leaves_everything_as_it_was(tmp_path: Path) -> None:
    src = ApplianceSource.create(tmp_path, "app", {"data": 8 << 20}, epoch=1)

    class Refusing(FakeLive):
        def freeze(self, new_overlays: Mapping[str, Path], description: str) -> None:
            raise ReplicationError("snapshot refused")

    before = src.active_paths()["data"]
    src.live = Refusing({"data": str(before)})
    with pytest.raises(ReplicationError):
        src.freeze(1)
    assert src.active_paths()["data"] == before and src.manifest().generation == 0
    assert not (before.parent / generation_file(2)).exists()


def test_reconcile_completes_a_freeze_cut_short_by_a_crash(tmp_path: Path) -> None:
    src = ApplianceSource.create(tmp_path, "app", {"data": 8 << 20}, epoch=1)
    m = src.manifest()
    # the crash: the guest was switched to generation 2's overlay, the manifest not saved
    new = src.volume.file("data", generation_file(2))
    default_qemu_runner(create_overlay_named_argv(new, m.chain("data").top))
    src.live = FakeLive({"data": str(new)})
    assert src.reconcile(1)
    assert src.manifest().generation == 1
    assert src.active_paths()["data"] == new
    assert src.volume.outbox_file("data", 1).exists()
    assert not src.reconcile(1)  # nothing left to do


def test_a_template_is_copied_and_grown_to_the_asked_size(tmp_path: Path) -> None:
    from meshcloud.core.errors import InvalidInput
    from meshcloud.replication.qemu import create_blank_argv
    from meshcloud.replication.volume import read_qcow2_header

    template = tmp_path / "template.qcow2"
    default_qemu_runner(create_blank_argv(template, 8 << 20))
    src = ApplianceSource.create(
        tmp_path / "v", "app", {"data": 16 << 20}, epoch=1, templates={"data": template}
    )
    m = src.manifest()
    assert (
        read_qcow2_header(src.volume.file("data", m.chain("data").bottom)).virtual_size == 16 << 20
    )
    with pytest.raises(InvalidInput, match="template"):
        ApplianceSource.create(
            tmp_path / "w", "app", {"data": 4 << 20}, epoch=1, templates={"data": template}
        )


def test_the_next_overlay_is_prepared_after_shipping_and_used_by_the_next_freeze(
    tmp_path: Path,
) -> None:
    src = ApplianceSource.create(tmp_path, "app", {"data": 8 << 20}, epoch=1)
    ddir = src.volume.disk_dir("data")
    (ddir / ".next-g000000000007.qcow2").write_bytes(b"stale")
    src.cycle(1, [])
    m = src.manifest()
    ready = ddir / f".next-{generation_file(m.generation + 2)}"
    assert ready.exists()
    assert [p.name for p in ddir.glob(".next-*")] == [ready.name]  # the stale one is gone
    assert read_qcow2_header(ready).backing_name == m.chain("data").top
    src.freeze(1)
    assert not ready.exists()  # the freeze switched to it
    assert src.active_paths()["data"].name == generation_file(m.generation + 2)
    # a freeze that finds none makes its own
    src.freeze(1)
    assert src.manifest().generation == m.generation + 2


def test_a_merge_that_fails_is_deferred_not_a_failed_cycle(tmp_path: Path) -> None:
    """A block commit refused (say, a reader holds a lock) leaves the chain and retries."""
    src = ApplianceSource.create(tmp_path, "app", {"data": 8 << 20}, epoch=1)

    class LockedOnce(FakeLive):
        refusals = 1

        def commit(self, disk: str, top: Path, base: Path) -> None:
            if self.refusals:
                self.refusals -= 1
                raise ReplicationError('Failed to get shared "consistent read" lock')
            # what a live commit leaves: the base holds the data, the image above
            # ``top`` reads from the base
            default_qemu_runner(commit_argv(top))
            for image in top.parent.glob("*.qcow2"):
                if parse_qcow2_header(image.read_bytes()[:4096]).backing_name == top.name:
                    default_qemu_runner(rebase_unsafe_argv(image, base.name))

    live = LockedOnce({"data": str(src.active_paths()["data"])})
    src.live = live
    report = src.cycle(1, [])
    assert "consistent read" in report.merge_error
    assert "merge deferred" in report.reason
    chain = src.manifest().chain("data")
    assert len(chain.files) == 3  # bottom, the frozen generation 1, the active overlay
    report = src.cycle(1, [])
    assert report.merge_error == ""
    assert len(src.manifest().chain("data").files) == 2  # both frozen overlays merged
