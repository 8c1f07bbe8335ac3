"""VolumeSet.load parses a manifest once per version of the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import Manifest, Role
from meshcloud.replication.volume import VolumeSet


def fresh(root: Path) -> tuple[VolumeSet, Manifest]:
    vs = VolumeSet(root, "app")
    m = mf.new_manifest("app", Role.PRIMARY, 1, {"data": 8 << 20}, active_opened_at=1.0)
    vs.save(m)
    return vs, m


def test_an_unchanged_manifest_is_parsed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vs, m = fresh(tmp_path)
    parsed = []
    real = Manifest.from_json

    def counting(raw: bytes) -> Manifest:
        parsed.append(1)
        return real(raw)

    monkeypatch.setattr(Manifest, "from_json", staticmethod(counting))
    assert vs.load() == m and vs.load() is vs.load()
    assert parsed == []  # save() left the parsed copy behind
    other = VolumeSet(tmp_path, "app")  # another reader of the same files
    assert other.load() is vs.load()


def test_every_replacement_is_seen(tmp_path: Path) -> None:
    vs, m = fresh(tmp_path)
    newer = dataclasses.replace(m, epoch=2)
    VolumeSet(tmp_path, "app").save(newer)  # a save through another VolumeSet
    assert vs.load().epoch == 2
    # another process replaces the file (new inode): seen
    third = dataclasses.replace(m, epoch=3)
    tmp = vs.manifest_path.with_name("other-process.tmp")
    tmp.write_bytes(third.to_json())
    tmp.rename(vs.manifest_path)
    assert vs.load().epoch == 3
    # rewritten in place (same inode, new mtime and size): seen too
    vs.manifest_path.write_bytes(dataclasses.replace(m, epoch=12).to_json())
    assert vs.load().epoch == 12
    vs.manifest_path.write_bytes(b"{ not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        vs.load()
