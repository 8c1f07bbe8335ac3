"""qemu-img argv builders."""

from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.hypervisor import qemu_img


@pytest.mark.parametrize(
    ("overlay", "base", "backing"),
    [
        ("/v/app/data/overlay-2.qcow2", "/v/app/data/base.qcow2", "base.qcow2"),
        ("/v/app/data/gen/overlay.qcow2", "/v/app/data/base.qcow2", "../base.qcow2"),
        ("/v/app/data/overlay.qcow2", "/images/demo/data.qcow2", "../../../images/demo/data.qcow2"),
    ],
)
def test_overlay_names_its_base_relatively(overlay: str, base: str, backing: str) -> None:
    argv = qemu_img.create_overlay_argv(Path(overlay), Path(base))
    assert argv == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        "-b", backing, "-F", "qcow2", overlay,
    ]  # fmt: skip


def test_overlay_paths_must_be_absolute() -> None:
    with pytest.raises(InvalidInput, match="absolute"):
        qemu_img.create_overlay_argv(Path("overlay.qcow2"), Path("/v/base.qcow2"))


def test_create_argv() -> None:
    assert qemu_img.create_argv(Path("/v/d.qcow2"), 1 << 30) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        "/v/d.qcow2", str(1 << 30),
    ]  # fmt: skip
    for bad in (0, -512, 1000):
        with pytest.raises(InvalidInput):
            qemu_img.create_argv(Path("/v/d.qcow2"), bad)


@pytest.mark.parametrize(
    "path", ["-f", "--help", "json:{}", "nbd:localhost:10809", "/v/\x00x", "/v/x\ny"]
)
def test_paths_that_qemu_would_misread_are_refused(path: str) -> None:
    with pytest.raises(InvalidInput):
        qemu_img.create_argv(Path(path), 4096)


def test_read_head_argv_reads_from_offset_zero_with_force_share() -> None:
    argv = qemu_img.read_head_argv(Path("/v/d.qcow2"), Path("/tmp/h.raw"), 8192)
    assert argv == [
        "qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", "bs=4096", "count=2",
        "if=/v/d.qcow2", "of=/tmp/h.raw",
    ]  # fmt: skip
    assert not [a for a in argv if a.startswith("skip=")]
    with pytest.raises(InvalidInput):
        qemu_img.read_head_argv(Path("/v/d.qcow2"), Path("/tmp/h.raw"), 1000)


def test_convert_argv_and_formats() -> None:
    argv = qemu_img.convert_argv(Path("/a.raw"), Path("/b.qcow2"))
    assert argv == [
        "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
        "/a.raw", "/b.qcow2",
    ]  # fmt: skip
    with pytest.raises(InvalidInput, match="not supported"):
        qemu_img.convert_argv(Path("/a"), Path("/b"), target_format="vmdk")


def test_info_argv() -> None:
    assert qemu_img.info_argv(Path("/a.qcow2"), backing_chain=True) == [
        "qemu-img", "info", "-U", "--output=json", "--backing-chain", "/a.qcow2",
    ]  # fmt: skip


def test_runner_reports_failures(tmp_path: Path) -> None:
    from meshcloud.core.errors import HypervisorError

    with pytest.raises(HypervisorError, match="failed"):
        qemu_img.run_qemu_img(qemu_img.info_argv(tmp_path / "missing.qcow2"))


def test_overlay_on_a_real_base(tmp_path: Path) -> None:
    import json

    base, overlay = tmp_path / "base.qcow2", tmp_path / "gen" / "overlay.qcow2"
    overlay.parent.mkdir()
    qemu_img.run_qemu_img(qemu_img.create_argv(base, 1 << 20))
    qemu_img.run_qemu_img(qemu_img.create_overlay_argv(overlay, base))
    info = json.loads(qemu_img.run_qemu_img(qemu_img.info_argv(overlay)))
    assert info["backing-filename"] == "../base.qcow2"
    assert info["cluster-size"] == 4096
    assert Path(info["full-backing-filename"]).resolve() == base.resolve()
