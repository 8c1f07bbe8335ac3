"""The rack image recipe: pure builders, input keys, apt sources, package lists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from meshcloud.images.disklayout import MIB, ROOT_PARTUUID, layout_for_root
from meshcloud.images.rackos import (
    RECIPE_DIR,
    SUITE,
    base_key,
    dpkg_versions,
    extlinux_conf,
    host_debian_sources,
    image_key,
    mkfs_argv,
    mmdebstrap_argv,
    read_package_list,
    root_size_for,
)
from meshcloud.images.tools import ImageError


def test_package_list_of_the_recipe_has_what_a_rack_needs() -> None:
    packages = read_package_list((RECIPE_DIR / "packages.txt").read_text())
    for needed in ("linux-image-amd64", "systemd", "libvirt-daemon-system", "qemu-system-x86",
                   "rsync", "openssh-server", "python3-venv", "cloud-guest-utils"):  # fmt: skip
        assert needed in packages
    with pytest.raises(ImageError, match="not a Debian package name"):
        read_package_list("rsync; rm -rf /\n")


def test_mmdebstrap_is_minbase_without_recommends(tmp_path: Path) -> None:
    argv = mmdebstrap_argv(["rsync", "udev"], ["deb http://mirror/debian bookworm main"],
                           tmp_path, tmp_path / "out.tar")  # fmt: skip
    assert argv[0] == "mmdebstrap" and "--variant=minbase" in argv and "--mode=root" in argv
    assert '--aptopt=APT::Install-Recommends "false"' in argv
    assert "--include=rsync,udev" in argv
    assert argv[-2:] == [str(tmp_path / "out.tar"), "deb http://mirror/debian bookworm main"]


def test_mkfs_and_boot_config() -> None:
    layout = layout_for_root(64 * MIB)
    argv = mkfs_argv(Path("/b/disk.img"), Path("/b/root"), layout, "1234")
    assert "offset=8388608,hash_seed=1234" in " ".join(argv) and "^64bit,^has_journal" in argv
    assert argv[-1] == "65536k"
    conf = extlinux_conf("vmlinuz-6.1.0-1-amd64", "initrd.img-6.1.0-1-amd64")
    assert f"root=PARTUUID={ROOT_PARTUUID}" in conf and "console=ttyS0" in conf
    assert "LINUX /boot/vmlinuz-6.1.0-1-amd64" in conf
    assert root_size_for(1000 * MIB) % MIB == 0 and root_size_for(1000 * MIB) > 1200 * MIB


def test_keys_follow_the_inputs(tmp_path: Path) -> None:
    recipe = tmp_path / "rack-os"
    shutil.copytree(RECIPE_DIR, recipe)
    key = base_key(recipe)
    assert key == base_key(recipe)
    assert image_key(key, recipe) == image_key(key, recipe)
    (recipe / "overlay" / "etc" / "motd").write_text("hello\n")
    assert base_key(recipe) == key  # the overlay is not part of the base layer
    img_before = image_key(key, RECIPE_DIR)
    assert image_key(key, recipe) != img_before
    with open(recipe / "packages.txt", "a") as f:
        f.write("less\n")
    assert base_key(recipe) != key


def test_host_debian_sources_keep_only_debian_bookworm(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    (apt / "sources.list.d" / "vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: stable\nComponents: main\n"
    )
    (apt / "sources.list").write_text("deb http://old.example/debian bullseye main\n")
    assert host_debian_sources(apt) == [
        f"deb http://mirror.example/debian {SUITE} main",
        f"deb http://mirror.example/debian {SUITE}-updates main",
        f"deb http://mirror.example/debian-security {SUITE}-security main",
    ]
    (apt / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(ImageError, match="no Debian 'bookworm' source"):
        host_debian_sources(apt)


def test_dpkg_versions() -> None:
    status = (
        "Package: rsync\nStatus: install ok installed\nVersion: 3.2.7-1\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b2\nDescription: x\n y\n"
    )
    assert dpkg_versions(status) == {"bash": "5.2.15-2+b2", "rsync": "3.2.7-1"}


def test_debugfs_script_resets_every_time_to_the_epoch(tmp_path: Path) -> None:
    from meshcloud.images.rackos import SOURCE_DATE_EPOCH, debugfs_epoch_script

    (tmp_path / "etc" / "ssh").mkdir(parents=True)
    (tmp_path / "etc" / "ssh" / "with space").write_text("x")
    (tmp_path / 'bad"name').write_text("x")
    (tmp_path / "bin").symlink_to("usr/bin")
    os.utime(tmp_path / "bin", (1000, 1000), follow_symlinks=False)
    script = debugfs_epoch_script(tmp_path).splitlines()
    at = f"@{SOURCE_DATE_EPOCH}"
    assert f"ssv wtime {at}" in script and f"ssv mkfs_time {at}" in script
    assert f'sif "/etc/ssh/with space" ctime {at}' in script
    assert f'sif "/etc" ctime {at}' in script and f'sif "/" ctime {at}' in script
    assert not any("bad" in line for line in script)  # cannot be quoted: left alone
    assert 'sif "/bin" atime @1000' in script  # a symlink's atime: its mtime
    assert f'sif "/boot/extlinux" mtime {at}' in script
