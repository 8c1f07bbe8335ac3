"""Build the rack OS image: a bootable Debian 12 disk with libvirt/QEMU and meshcloud.

``meshcloud image build`` (or ``python -m meshcloud.images.rackos``) runs
as root, with no container, in two cached layers under ``build/rack-os/``:

1. **base** (``base/<key>/rootfs.tar``): ``mmdebstrap --variant=minbase``
   with ``rack-images/rack-os/packages.txt`` (no recommends) and the hooks in
   ``rack-images/rack-os/hooks/``. The key hashes those inputs, so the slow
   part (downloading and unpacking Debian) reruns only when they change.
2. **image** (``images/<key>/``): the base plus the overlay
   (``rack-images/rack-os/overlay/``: systemd units, softdog, watchdog), a
   virtualenv at ``/opt/meshcloud/venv`` with meshcloud installed from a
   wheel of this repository, then an MBR disk (see
   :mod:`meshcloud.images.disklayout`) with ext4 root and extlinux. Beside
   ``rack-os.img``: ``rack-os.img.bmap``, ``SHA256SUMS`` and
   ``manifest.json`` (package versions, kernel, layout, inputs).

Timestamps are clamped to ``SOURCE_DATE_EPOCH``, UUIDs derive from the
inputs and the file system is made with fixed hash seeds, so that the same
inputs and the same Debian packages give the same image where the tools
allow it (see docs/images.md for what still varies).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshcloud.images.bmap import generate_bmap, read_bmap, render_bmap, sparse_copy
from meshcloud.images.disklayout import (
    MIB,
    ROOT_PARTUUID,
    DiskLayout,
    layout_for_root,
    sfdisk_script,
)
from meshcloud.images.identity import encode_record
from meshcloud.images.tools import ImageError, run_tool

__all__ = [
    "RackImage",
    "build_rack_image",
    "find_rack_image",
]

BUILDER_VERSION = "1"  # bump when this file's output changes for the same inputs
REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "rack-images" / "rack-os"
# The cache of built layers; MESHCLOUD_IMAGE_CACHE moves it (e.g. to keep it across clones).
DEFAULT_BUILD_DIR = Path(os.environ.get("MESHCLOUD_IMAGE_CACHE") or REPO_ROOT / "build" / "rack-os")
SUITE = "bookworm"
SOURCE_DATE_EPOCH = 1767225600  # 2026-01-01T00:00:00Z: every file's time in the image
IMAGE_NAME = "rack-os.img"
VENV = "/opt/meshcloud/venv"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
ROOT_LABEL = "mc-root"
EXT4_SUPERBLOCK_OFFSET = 1024
EXT4_LAST_MOUNTED = 0x88  # s_last_mounted, 64 bytes
HEADROOM_BYTES = 384 * MIB  # free space on / before first-boot growth (logs, state)
UNITS_TO_ENABLE = (
    "meshcloud-identity.service",
    "meshcloud-sshkeys.service",
    "meshcloud-growroot.service",
    "meshcloud.service",
    "systemd-networkd.service",
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RackImage:
    """A built rack image and the files beside it."""

    directory: Path

    @property
    def image(self) -> Path:
        return self.directory / IMAGE_NAME

    @property
    def bmap(self) -> Path:
        return self.directory / f"{IMAGE_NAME}.bmap"

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.manifest_path.read_text())
        return data

    @property
    def sha256(self) -> str:
        return str(self.manifest()["sha256"])


# -- inputs and keys (pure) ------------------------------------------------------------------


def read_package_list(text: str) -> list[str]:
    """Package names from packages.txt (comments and blank lines dropped), checked."""
    names = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", line):
            raise ImageError(f"packages.txt: {line!r} is not a Debian package name")
        names.append(line)
    if not names:
        raise ImageError("packages.txt lists no packages")
    return names


def tree_digest(paths: Iterable[Path], base: Path) -> str:
    """SHA-256 over the relative names, modes and contents of files (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(base).as_posix()
        digest.update(f"{rel}\0{path.stat().st_mode & 0o777:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def base_key(recipe: Path = RECIPE_DIR) -> str:
    """Key of the base layer: builder version, suite, packages and hooks."""
    digest = hashlib.sha256(f"base\0{BUILDER_VERSION}\0{SUITE}\0".encode())
    digest.update(
        tree_digest([recipe / "packages.txt", *(recipe / "hooks").iterdir()], recipe).encode()
    )
    return digest.hexdigest()[:16]


def image_key(base: str, recipe: Path = RECIPE_DIR, repo: Path = REPO_ROOT) -> str:
    """Key of the image layer: the base, the overlay and the meshcloud sources."""
    digest = hashlib.sha256(f"image\0{BUILDER_VERSION}\0{base}\0{SOURCE_DATE_EPOCH}\0".encode())
    digest.update(tree_digest((recipe / "overlay").rglob("*"), recipe).encode())
    sources = [p for p in (repo / "meshcloud").rglob("*") if p.suffix in (".py", ".yaml", ".typed")]
    sources += [repo / "pyproject.toml", repo / "README.md"]
    static = repo / "meshcloud" / "web" / "static"
    if static.is_dir():
        sources += list(static.rglob("*"))
    digest.update(tree_digest(sources, repo).encode())
    return digest.hexdigest()[:16]


def host_debian_sources(apt_dir: Path = Path("/etc/apt")) -> list[str]:
    """One-line apt sources for Debian 12 taken from the build machine's apt configuration.

    Only entries for the ``bookworm`` suites from Debian's archive (signed by
    the Debian archive keyring, or with a URI path ending in ``/debian`` or
    ``/debian-security``) are kept; other repositories never reach the image.
    """
    entries: list[tuple[str, str, str]] = []

    def debian(uri: str, signed_by: str) -> bool:
        path = uri.rstrip("/").rsplit("/", 1)[-1]
        return "debian-archive-keyring" in signed_by or path in ("debian", "debian-security")

    files = sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in files:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if (
                fields.get("enabled", "yes").lower() == "no"
                or "deb" not in fields.get("types", "").split()
            ):
                continue
            for uri in fields.get("uris", "").split():
                if not debian(uri, fields.get("signed-by", "")):
                    continue
                for suite in fields.get("suites", "").split():
                    entries.append((uri, suite, fields.get("components", "main")))
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and debian(words[1], line):
                entries.append((words[1], words[2], " ".join(words[3:]) or "main"))
    lines = []
    for uri, suite, components in entries:
        if suite.split("-")[0] != SUITE:
            continue
        comps = [c for c in components.split() if c == "main"]
        line = f"deb {uri} {suite} {' '.join(comps or ['main'])}"
        if line not in lines:
            lines.append(line)
    if not any(line.split()[2] == SUITE for line in lines):
        raise ImageError(
            f"no Debian '{SUITE}' source found in {apt_dir}: add a Debian 12 mirror to apt"
            " or pass --mirror 'deb URI bookworm main'"
        )
    return lines


# -- command lines (pure) --------------------------------------------------------------------


def mmdebstrap_argv(
    packages: Sequence[str], mirrors: Sequence[str], hooks: Path, out_tar: Path
) -> list[str]:
    """argv for the base layer: a minbase Debian with ``packages``, no recommends, as a tar."""
    return [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=tar",
        '--aptopt=APT::Install-Recommends "false"',
        '--aptopt=Acquire::Retries "3"',
        f"--include={','.join(packages)}",
        f"--hook-directory={hooks}",
        SUITE,
        str(out_tar),
        *mirrors,
    ]


def tar_extract_argv(tarball: Path, dest: Path) -> list[str]:
    return [
        "tar", "--extract", "--numeric-owner", "--preserve-permissions",
        "--xattrs", "--xattrs-include=*", "--file", str(tarball), "--directory", str(dest),
    ]  # fmt: skip


def chroot_argv(root: Path, argv: Sequence[str]) -> list[str]:
    """argv running ``argv`` inside ``root`` with /proc, /sys, /dev in a private mount namespace."""
    script = RECIPE_DIR / "chroot-run.sh"
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", str(script),
            str(root), *argv]  # fmt: skip


def noatime_argv(tree: Path, argv: Sequence[str]) -> list[str]:
    """argv running ``argv`` while ``tree`` is seen through a private noatime bind mount."""
    script = RECIPE_DIR / "noatime-run.sh"
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", str(script),
            str(tree), *argv]  # fmt: skip


def mkfs_argv(image: Path, root_dir: Path, layout: DiskLayout, fs_uuid: str) -> list[str]:
    """argv making the ext4 root file system inside ``image`` at the root partition's offset.

    ``^64bit``: extlinux cannot boot from 64-bit ext4; the root stays far below 16 TiB.
    ``^has_journal``: the journal is added after extlinux is installed, so that the
    mount for extlinux leaves no transactions (with today's times) in the image.
    """
    root = layout.root
    return [
        "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", ROOT_LABEL, "-U", fs_uuid,
        "-O", "^64bit,^has_journal",
        "-E", f"offset={root.start_bytes},hash_seed={fs_uuid},lazy_itable_init=1,root_owner=0:0",
        "-d", str(root_dir), str(image), f"{root.size_bytes // 1024}k",
    ]  # fmt: skip


def extlinux_conf(kernel: str, initrd: str) -> str:
    """The boot loader configuration: one entry, serial and screen consoles."""
    return (
        "# meshcloud rack OS: written by `meshcloud image build`\n"
        "DEFAULT meshcloud\n"
        "PROMPT 0\n"
        "TIMEOUT 10\n"
        "SERIAL 0 115200\n"
        "LABEL meshcloud\n"
        f"  LINUX /boot/{kernel}\n"
        f"  INITRD /boot/{initrd}\n"
        f"  APPEND root=PARTUUID={ROOT_PARTUUID} ro rootwait console=tty0"
        " console=ttyS0,115200n8 quiet systemd.show_status=1 systemd.status_unit_format=name\n"
    )


def fstab(fs_uuid: str) -> str:
    return f"# meshcloud rack OS\nUUID={fs_uuid} / ext4 errors=remount-ro,noatime 0 1\n"


# -- helpers ---------------------------------------------------------------------------------


def epoch_env() -> dict[str, str]:
    """Environment making e2fsprogs use SOURCE_DATE_EPOCH as "now"."""
    return {
        "E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH),
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
    }


def debugfs_epoch_script(tree: Path, epoch: int = SOURCE_DATE_EPOCH) -> str:
    """debugfs commands that make the file system's times depend on the inputs only.

    - the superblock's times: ``epoch``;
    - every inode's ctime (mkfs.ext4 -d copies it from the tree, where no tool
      can set it): ``epoch``;
    - directories' and symbolic links' atime (mkfs.ext4 gives them the time
      it made them): their mtime, as for files (see :func:`clamp_mtimes`);
    - the boot loader's files and directory, which extlinux made: ``epoch``.

    Paths come from ``tree`` (what mkfs.ext4 -d copied); a path debugfs cannot
    quote (a double quote or a newline in it) keeps its times.
    """
    at = f"@{epoch}"
    cmds = [f"ssv {field} {at}" for field in ("mtime", "wtime", "lastcheck", "mkfs_time")]
    cmds += ["ssv mnt_count 0", "ssv kbytes_written 0"]
    boot = ["/boot/extlinux/ldlinux.sys", "/boot/extlinux/ldlinux.c32", "/boot/extlinux"]
    for path in boot:
        cmds += [f'sif "{path}" {field} {at}' for field in ("atime", "mtime", "crtime", "ctime")]
        cmds += [f'sif "{path}" {field}_extra 0' for field in ("atime", "mtime", "crtime", "ctime")]
        cmds.append(f'sif "{path}" generation 0')  # the kernel drew it at random
    entries = [("/", tree)]
    for dirpath, dirnames, filenames in os.walk(tree):
        rel = "/" + os.path.relpath(dirpath, tree).removeprefix(".").lstrip("/")
        for name in [*dirnames, *filenames]:
            entries.append((os.path.join(rel, name), Path(dirpath) / name))
    for path, source in entries:
        if '"' in path or "\n" in path or path in boot:
            continue
        cmds += [f'sif "{path}" ctime {at}', f'sif "{path}" ctime_extra 0']
        st = os.lstat(source)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            mtime = min(int(st.st_mtime), epoch)
            cmds += [f'sif "{path}" atime @{mtime}', f'sif "{path}" atime_extra 0']
    return "\n".join(cmds) + "\n"


def dpkg_versions(status_text: str) -> dict[str, str]:
    """{package: version} of installed packages, from /var/lib/dpkg/status."""
    versions = {}
    for stanza in status_text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            versions[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(versions.items()))


def clamp_mtimes(root: Path, epoch: int) -> int:
    """Give every file whole-second times: mtime clamped to ``epoch``, atime = mtime.

    Returns how many mtimes were clamped. (The ctimes cannot be set here;
    :func:`debugfs_epoch_script` sets them in the file system.)
    """
    clamped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            mtime = int(os.lstat(path).st_mtime)
            if mtime > epoch:
                mtime = epoch
                clamped += 1
            os.utime(path, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)
    os.utime(root, (epoch, epoch))
    return clamped


def tree_bytes(root: Path, block: int = 4096) -> int:
    """Space the tree takes on a 4 KiB-block file system (files rounded up, one block per inode)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            total += -(-st.st_size // block) * block + 256
    return total


def root_size_for(used_bytes: int) -> int:
    """Root file system size: used + 20 % for metadata and journal + headroom, in MiB."""
    size = int(used_bytes * 1.2) + HEADROOM_BYTES + 64 * MIB
    return -(-size // MIB) * MIB


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ImageError("building the rack image needs root (mmdebstrap, loop devices, mount)")
    missing = [
        t
        for t in ("mmdebstrap", "mkfs.ext4", "sfdisk", "extlinux", "losetup", "unshare", "debugfs")
        if shutil.which(t) is None
    ]
    if not MBR_BIN.exists():
        missing.append(f"{MBR_BIN} (package syslinux-common)")
    if missing:
        raise ImageError(
            f"missing tools: {', '.join(missing)}: run `make bootstrap` (installs"
            " scripts/debian-packages.txt)"
        )


# -- the layers ------------------------------------------------------------------------------


def build_base(
    build_dir: Path, progress: Progress, mirrors: Sequence[str] | None = None
) -> tuple[str, Path]:
    """The base layer tarball (cached by :func:`base_key`)."""
    key = base_key()
    final = build_dir / "base" / key
    tarball = final / "rootfs.tar"
    if tarball.exists():
        progress(f"base layer {key}: cached")
        return key, tarball
    packages = read_package_list((RECIPE_DIR / "packages.txt").read_text())
    sources = list(mirrors) if mirrors else host_debian_sources()
    progress(f"base layer {key}: mmdebstrap {SUITE} minbase + {len(packages)} packages")
    staging = Path(tempfile.mkdtemp(prefix=f"base-{key}-", dir=build_dir))
    try:
        run_tool(
            mmdebstrap_argv(packages, sources, RECIPE_DIR / "hooks", staging / "rootfs.tar"),
            env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)},
            on_line=lambda line: progress(f"  mmdebstrap: {line}"),
            what="mmdebstrap (base layer)",
        )
        (staging / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return key, tarball


def build_wheelhouse(dest: Path, build_dir: Path, progress: Progress) -> list[str]:
    """Wheels of meshcloud and its dependencies (built here: same Debian, same Python ABI).

    The dependencies' wheels are cached by a hash of pyproject.toml; only
    meshcloud's own wheel is built every time.
    """
    deps_key = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    deps = build_dir / "wheels" / deps_key
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet"]
    if not deps.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f"wheels-{deps_key}-", dir=build_dir))
        try:
            run_tool([*pip, "--wheel-dir", str(staging), str(REPO_ROOT)],
                     on_line=lambda line: progress(f"  pip: {line}"),
                     what="pip wheel (meshcloud's dependencies)")  # fmt: skip
            for own in staging.glob("meshcloud-*.whl"):
                own.unlink()
            deps.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, deps)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in deps.glob("*.whl"):
        shutil.copyfile(wheel, dest / wheel.name)
    # Build from a clean copy of the sources: setuptools keeps a build/lib in the
    # source tree, where a deleted module would linger, and which two builds share.
    source = dest.parent / "source"
    shutil.copytree(REPO_ROOT / "meshcloud", source / "meshcloud",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO_ROOT / name, source / name)
    run_tool([*pip, "--no-deps", "--wheel-dir", str(dest), str(source)],
             on_line=lambda line: progress(f"  pip: {line}"), what="pip wheel (meshcloud)")  # fmt: skip
    shutil.rmtree(source)
    return sorted(p.name for p in dest.glob("*.whl"))


def _customize(root: Path, wheels: Path, progress: Progress) -> None:
    """Overlay, virtualenv, units: everything the image adds to the base layer."""
    overlay = RECIPE_DIR / "overlay"
    shutil.copytree(overlay, root, dirs_exist_ok=True, symlinks=True)
    inside_wheels = root / "root" / "wheelhouse"
    shutil.copytree(wheels, inside_wheels)
    steps = [
        ["python3", "-m", "venv", VENV],
        [f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-compile",
         "--find-links", "/root/wheelhouse", "meshcloud"],
        [f"{VENV}/bin/python", "-m", "compileall", "-q", "-f", "-j", "1",
         "--invalidation-mode", "unchecked-hash", f"{VENV}/lib"],
        ["systemctl", "enable", *UNITS_TO_ENABLE],
        # No login on the serial console (no account has a password), so systemd keeps
        # printing boot status and the daemon's log there; nothing that waits for a
        # network the rack does not have, or scrubs LVM it does not use.
        ["systemctl", "mask", "systemd-networkd-wait-online.service",
         "serial-getty@ttyS0.service", "e2scrub_reap.service", "e2scrub_all.timer",
         "apt-daily.timer", "apt-daily-upgrade.timer"],
    ]  # fmt: skip
    for argv in steps:
        progress(f"  chroot: {' '.join(argv)}")
        run_tool(chroot_argv(root, argv), on_line=lambda line: progress(f"    {line}"),
                 clean_env=True, what=f"in the image: {argv[0]}")  # fmt: skip
    shutil.rmtree(inside_wheels)
    os.chmod(root / "etc" / "meshcloud", 0o700)
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()  # every rack makes its own host keys on first boot
    # libvirt's "default" NAT network (virbr0, 192.168.122.0/24) has no place on a
    # mesh rack: appliances use meshcloud's own bridge.
    (root / "etc" / "libvirt" / "qemu" / "networks" / "autostart" / "default.xml").unlink(
        missing_ok=True
    )
    for cache in (root / "var" / "cache" / "apt").glob("*.bin"):
        cache.unlink()
    (root / "etc" / "machine-id").write_text("")  # systemd makes one per rack on first boot


def _boot_files(root: Path) -> tuple[str, str]:
    kernels = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in the image's /boot, found {kernels}")
    version = kernels[0].removeprefix("vmlinuz-")
    initrd = f"initrd.img-{version}"
    if not (root / "boot" / initrd).exists():
        raise ImageError(f"the image has no {initrd}: did update-initramfs fail?")
    return kernels[0], initrd


def _install_bootloader(
    image: Path, layout: DiskLayout, mount_dir: Path, tree: Path, progress: Progress
) -> None:
    """extlinux into the root partition (needs it mounted), mbr.bin into the MBR."""
    root = layout.root
    loop = run_tool(
        ["losetup", "--find", "--show", "--offset", str(root.start_bytes),
         "--sizelimit", str(root.size_bytes), str(image)],
        what="losetup (root partition)",
    ).strip()  # fmt: skip
    try:
        run_tool(["mount", "-t", "ext4", "-o", "noinit_itable,noatime", loop, str(mount_dir)])
        try:
            run_tool(["extlinux", "--install", str(mount_dir / "boot" / "extlinux")],
                     on_line=lambda line: progress(f"  extlinux: {line}"))  # fmt: skip
        finally:
            run_tool(["umount", str(mount_dir)])
        # The mount stamped the superblock and extlinux's files with today's time, and
        # mkfs.ext4 -d copied each file's ctime (which no tool can set) from the tree:
        # put SOURCE_DATE_EPOCH everywhere so that rebuilds compare equal.
        # The kernel wrote the mount point's path (a temporary directory) into the
        # superblock; zero it here, debugfs then rewrites the superblock's checksum
        # (-n: it must not refuse the superblock it is about to fix).
        with open(loop, "r+b", buffering=0) as dev:
            os.pwrite(dev.fileno(), bytes(64), EXT4_SUPERBLOCK_OFFSET + EXT4_LAST_MOUNTED)
        run_tool(["debugfs", "-w", "-n", "-f", "-", loop], input_text=debugfs_epoch_script(tree),
                 env=epoch_env(), what="debugfs (timestamps)")  # fmt: skip
        # Now the journal: tune2fs copies the (now clean) superblock into the backups.
        run_tool(["tune2fs", "-O", "has_journal", loop], env=epoch_env(),
                 what="tune2fs (journal)")  # fmt: skip
        at = f"@{SOURCE_DATE_EPOCH}"
        run_tool(["debugfs", "-w", "-f", "-", loop], input_text=f"ssv wtime {at}\nssv mtime {at}\n",
                 env=epoch_env(), what="debugfs (superblock times)")  # fmt: skip
    finally:
        run_tool(["losetup", "--detach", loop])
    with open(image, "r+b") as f, open(MBR_BIN, "rb") as mbr:
        code = mbr.read(440)
        f.seek(0)
        f.write(code)


def _assemble(root: Path, work: Path, key: str, progress: Progress) -> tuple[Path, DiskLayout]:
    """The disk image from the customized root tree."""
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"meshcloud-rack-os:{key}"))
    kernel, initrd = _boot_files(root)
    (root / "boot" / "extlinux").mkdir(parents=True, exist_ok=True)
    (root / "boot" / "extlinux" / "extlinux.conf").write_text(extlinux_conf(kernel, initrd))
    (root / "etc" / "fstab").write_text(fstab(fs_uuid))
    clamp_mtimes(root, SOURCE_DATE_EPOCH)
    layout = layout_for_root(root_size_for(tree_bytes(root)))
    image = work / IMAGE_NAME
    progress(f"disk: {layout.total_bytes // MIB} MiB, root {layout.root.size_bytes // MIB} MiB")
    with open(image, "xb") as f:
        f.truncate(layout.total_bytes)
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
             input_text=sfdisk_script(layout), what="sfdisk")  # fmt: skip
    with open(image, "r+b") as f:
        f.seek(layout.identity.start_bytes)
        f.write(encode_record(None))
    progress("disk: ext4 root file system from the tree (mkfs.ext4 -d)")
    run_tool(noatime_argv(root, mkfs_argv(image, root, layout, fs_uuid)), env=epoch_env(),
             what="mkfs.ext4")  # fmt: skip
    progress("disk: extlinux boot loader")
    mount_dir = work / "mnt"
    mount_dir.mkdir()
    _install_bootloader(image, layout, mount_dir, root, progress)
    return image, layout


def build_image_layer(build_dir: Path, base: str, tarball: Path, progress: Progress) -> RackImage:
    key = image_key(base)
    final = build_dir / "images" / key
    if (final / "manifest.json").exists():
        progress(f"image layer {key}: cached")
        return RackImage(final)
    work = Path(tempfile.mkdtemp(prefix=f"image-{key}-", dir=build_dir))
    try:
        root = work / "root"
        root.mkdir()
        progress(f"image layer {key}: unpacking the base layer")
        run_tool(tar_extract_argv(tarball, root), what="tar (base layer)")
        progress("image layer: building wheels of meshcloud and its dependencies")
        wheels = build_wheelhouse(work / "wheels", build_dir, progress)
        progress("image layer: overlay, virtualenv and systemd units")
        _customize(root, work / "wheels", progress)
        packages = dpkg_versions((root / "var" / "lib" / "dpkg" / "status").read_text())
        kernel, _initrd = _boot_files(root)
        image, layout = _assemble(root, work, key, progress)
        progress("image layer: block map and checksums")
        bmap = generate_bmap(image)
        bmap_path = work / f"{IMAGE_NAME}.bmap"
        bmap_path.write_text(render_bmap(bmap))
        image_sum, bmap_sum = _sha256_file(image), _sha256_file(bmap_path)
        (work / "SHA256SUMS").write_text(
            f"{image_sum}  {IMAGE_NAME}\n{bmap_sum}  {IMAGE_NAME}.bmap\n"
        )
        manifest = {
            "image": IMAGE_NAME,
            "sha256": image_sum,
            "bytes": layout.total_bytes,
            "mapped_bytes": bmap.mapped_bytes,
            "base_key": base,
            "image_key": key,
            "builder_version": BUILDER_VERSION,
            "source_date_epoch": SOURCE_DATE_EPOCH,
            "suite": SUITE,
            "kernel": kernel.removeprefix("vmlinuz-"),
            "layout": {
                "identity": {
                    "start": layout.identity.start_bytes,
                    "size": layout.identity.size_bytes,
                },
                "root": {
                    "start": layout.root.start_bytes,
                    "size": layout.root.size_bytes,
                    "partuuid": ROOT_PARTUUID,
                },
            },
            "wheels": wheels,
            "packages": packages,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(root)
        (work / "mnt").rmdir()
        shutil.rmtree(work / "wheels")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return RackImage(final)


def verify_image_files(image: RackImage) -> None:
    """Check the image against its SHA256SUMS; raises ImageError on a mismatch."""
    for line in (image.directory / "SHA256SUMS").read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        if _sha256_file(image.directory / name) != expected:
            raise ImageError(
                f"{image.directory / name} does not match SHA256SUMS: the file is damaged;"
                " rebuild it with `meshcloud image build`"
            )


def export_image(image: RackImage, out: Path) -> RackImage:
    """Put the image files into ``out`` (hard links if possible, else sparse copies)."""
    out.mkdir(parents=True, exist_ok=True)
    names = [IMAGE_NAME, f"{IMAGE_NAME}.bmap", "SHA256SUMS", "manifest.json"]
    bmap = read_bmap(image.bmap)
    for name in names:
        src, dst = image.directory / name, out / name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            if name == IMAGE_NAME:
                sparse_copy(src, dst, bmap)
            else:
                shutil.copyfile(src, dst)
    return RackImage(out)


def build_rack_image(
    out: Path | None = None,
    *,
    build_dir: Path = DEFAULT_BUILD_DIR,
    progress: Progress = print,
    mirrors: Sequence[str] | None = None,
) -> RackImage:
    """Build (or reuse from the cache) the rack image; export it to ``out`` if given."""
    _check_prerequisites()
    build_dir.mkdir(parents=True, exist_ok=True)
    progress("[1/3] base layer: Debian with libvirt/QEMU, rsync, openssh")
    base, tarball = build_base(build_dir, progress, mirrors)
    progress("[2/3] image layer: meshcloud, units, disk, boot loader")
    image = build_image_layer(build_dir, base, tarball, progress)
    progress("[3/3] checking the image against SHA256SUMS")
    verify_image_files(image)
    (build_dir / "current").unlink(missing_ok=True)
    (build_dir / "current").symlink_to(image.directory.relative_to(build_dir))
    if out is not None:
        image = export_image(image, out)
    progress(f"rack image {image.image} sha256 {image.sha256}")
    return image


def find_rack_image(build_dir: Path = DEFAULT_BUILD_DIR) -> RackImage | None:
    """The image the current inputs would build, if it is in the cache."""
    try:
        key = image_key(base_key())
    except OSError:
        return None
    candidate = RackImage(build_dir / "images" / key)
    return candidate if candidate.manifest_path.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcloud.images.rackos")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--mirror", action="append", default=None)
    args = parser.parse_args(argv)
    build_rack_image(args.out, build_dir=args.build_dir, mirrors=args.mirror)
    return 0


if __name__ == "__main__":
    sys.exit(main())
