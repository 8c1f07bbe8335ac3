"""The image catalog: manifests, verification before use, quarantine, push command lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshcloud.agent.images import (
    BAD_PREFIX,
    MANIFEST,
    ImageCatalog,
    ImageError,
    ImageFile,
    ImageManifest,
    manifest_for,
    push_image_argvs,
    sha256_file,
    write_push_source,
)
from meshcloud.core.errors import InvalidInput, NotFound
from meshcloud.replication.transport import SshTarget


@pytest.fixture
def source(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "build"
    src.mkdir()
    files = {
        "kernel": src / "vmlinuz",
        "initrd": src / "initramfs.img",
        "disk:data": src / "d.qcow2",
    }
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * (1000 + i))
    return files


@pytest.fixture
def catalog(tmp_path: Path, source: dict[str, Path]) -> ImageCatalog:
    cat = ImageCatalog(tmp_path / "images")
    cat.install(manifest_for("demo", "v1", source), source)
    return cat


def test_manifest_round_trip_and_roles(source: dict[str, Path]) -> None:
    m = manifest_for("demo", "v1", source)
    assert ImageManifest.from_dict(json.loads(m.to_json())) == m
    assert m.by_role("kernel") is not None and m.by_role("kernel").file == "vmlinuz"  # type: ignore[union-attr]
    assert set(m.disk_templates()) == {"data"}
    assert m.by_role("kernel").sha256 == sha256_file(source["kernel"])  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"name": "Demo", "version": "1", "files": []}, "image"),
        ({"name": "demo", "version": "1", "files": []}, "1 to 16 files"),
        ({"name": "demo", "version": "a b", "files": []}, "version"),
        ({"name": "demo", "version": "1", "files": [], "x": 1}, "exactly"),
        (
            {"name": "demo", "version": "1", "files": [
                {"role": "kernel", "file": "../etc/passwd", "sha256": "0" * 64, "size": 1}]},
            "plain file name",
        ),
        (
            {"name": "demo", "version": "1", "files": [
                {"role": "bootloader", "file": "x", "sha256": "0" * 64, "size": 1}]},
            "role",
        ),
        (
            {"name": "demo", "version": "1", "files": [
                {"role": "kernel", "file": "x", "sha256": "0" * 64, "size": 1}]},
            "needs an initrd",
        ),
        (
            {"name": "demo", "version": "1", "files": [
                {"role": "disk:data", "file": "x", "sha256": "XYZ", "size": 1}]},
            "sha256",
        ),
        (
            {"name": "demo", "version": "1", "files": [
                {"role": "disk:data", "file": "manifest.json", "sha256": "0" * 64, "size": 1}]},
            "plain file name",
        ),
    ],
)  # fmt: skip
def test_hostile_manifests_are_refused(data: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        ImageManifest.from_dict(data)


def test_verified_image_gives_paths(catalog: ImageCatalog) -> None:
    image = catalog.verify("demo")
    assert image.kernel == catalog.root / "demo" / "vmlinuz"
    assert image.templates() == {"data": catalog.root / "demo" / "d.qcow2"}
    assert catalog.names() == ["demo"]


def test_a_corrupt_file_is_never_used(catalog: ImageCatalog) -> None:
    kernel = catalog.root / "demo" / "vmlinuz"
    catalog.verify("demo")  # verified once: cached by inode, size and mtime
    os.chmod(kernel, 0o644)
    data = bytearray(kernel.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    kernel.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="vmlinuz failed its checksum"):
        catalog.verify("demo")
    assert not kernel.exists()
    assert (kernel.parent / (BAD_PREFIX + "vmlinuz")).exists()
    with pytest.raises(ImageError, match="missing"):  # and it stays refused
        catalog.verify("demo")


def test_a_truncated_file_is_refused(catalog: ImageCatalog) -> None:
    initrd = catalog.root / "demo" / "initramfs.img"
    os.chmod(initrd, 0o644)
    initrd.write_bytes(b"short")
    with pytest.raises(ImageError, match="5 bytes"):
        catalog.verify("demo")


def test_a_tampered_manifest_is_refused(catalog: ImageCatalog) -> None:
    (catalog.root / "demo" / MANIFEST).write_text('{"name": "demo"}')
    with pytest.raises(ImageError, match="not a valid manifest"):
        catalog.verify("demo")


def test_an_unknown_image_is_not_found(catalog: ImageCatalog) -> None:
    with pytest.raises(NotFound, match="push it here"):
        catalog.verify("other")
    with pytest.raises(InvalidInput):
        catalog.verify("../demo")


def test_a_repush_fixes_a_quarantined_file(catalog: ImageCatalog, source: dict[str, Path]) -> None:
    kernel = catalog.root / "demo" / "vmlinuz"
    os.chmod(kernel, 0o644)
    kernel.write_bytes(b"x" * kernel.stat().st_size)
    with pytest.raises(ImageError):
        catalog.verify("demo")
    catalog.install(manifest_for("demo", "v1", source), source)
    assert catalog.verify("demo").kernel == kernel


def test_push_argvs_send_files_then_manifest(tmp_path: Path, source: dict[str, Path]) -> None:
    m = manifest_for("demo", "v1", source)
    staged = write_push_source(m, source, tmp_path / "push")
    assert json.loads((staged / MANIFEST).read_text()) == m.to_dict()
    target = SshTarget("10.77.0.2", tmp_path / "key", tmp_path / "known_hosts")
    files_argv, manifest_argv = push_image_argvs(m, staged, target, "/var/lib/mc/images")
    assert files_argv[0] == "rsync" and manifest_argv[0] == "rsync"
    assert files_argv[-1] == "root@10.77.0.2:/var/lib/mc/images/demo/"
    assert manifest_argv[-2:] == [str(staged / MANIFEST), "root@10.77.0.2:/var/lib/mc/images/demo/"]
    assert str(staged / MANIFEST) not in files_argv
    rsh = files_argv[files_argv.index("-e") + 1]
    assert "StrictHostKeyChecking=yes" in rsh and "BatchMode=yes" in rsh
    for bad in ("relative/dir", "/a b", "/x/../etc", "/x;rm"):
        with pytest.raises(InvalidInput):
            push_image_argvs(m, staged, target, bad)


def test_image_file_rejects_negative_size() -> None:
    with pytest.raises(InvalidInput, match="size"):
        ImageFile("kernel", "k", "0" * 64, -1)
