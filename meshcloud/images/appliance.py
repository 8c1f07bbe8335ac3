"""Build the demo appliance: Debian's cloud kernel plus a busybox initramfs.

``python -m meshcloud.images.appliance build`` (what ``make appliance`` runs)
writes ``rack-images/appliances/build/<hash>/`` with ``vmlinuz``,
``initramfs.img``, ``data.qcow2`` (a blank, formatted data-disk template) and
``manifest.json``, and points ``build/current.json`` at it. ``<hash>`` is a
digest of every input (kernel, modules, busybox, guest sources, compiler and
C library, this builder's version): when nothing changed the build is a
no-op, and the same inputs give byte-identical outputs (fixed timestamps,
sorted archive, gzip without a date).

The initramfs carries the kernel modules the cloud kernel builds as modules
(virtio_pci, virtio_blk, virtio_net, the ACPI button and evdev, plus what
modules.dep says they need), busybox, and ``mcappliance`` (a small static C
program: the counter, the random writer and the HTTP page). See
docs/appliance.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshcloud.core.errors import InvalidInput, MeshcloudError
from meshcloud.hypervisor.qemu_img import convert_argv, create_overlay_argv, run_qemu_img
from meshcloud.images.appliance_disk import (
    CounterValue,
    encode_header,
    read_counter_from_image,
    read_counter_log,
)

__all__ = [
    "ApplianceImage",
    "BuildError",
    "CounterValue",
    "build_appliance",
    "ensure_appliance",
    "find_appliance",
    "new_data_disk",
    "read_counter_from_image",
    "read_counter_log",
]

BUILDER_VERSION = "1"  # bump when this file's output changes for the same inputs
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO_ROOT / "rack-images" / "appliances" / "demo"
BUILD_DIR = REPO_ROOT / "rack-images" / "appliances" / "build"
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
DATA_TEMPLATE_BYTES = 1 << 30
KEEP_BUILDS = 3  # older build directories are removed
CFLAGS = ("-O2", "-static", "-s", "-pthread", "-Wall", "-Wextra", "-Werror")
FIXED_MTIME = 0
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class BuildError(MeshcloudError):
    """The appliance could not be built; the message says which input is missing."""


@dataclass(frozen=True)
class ApplianceImage:
    """A built demo appliance: what the hypervisor boots."""

    kernel: Path
    initrd: Path
    data_template: Path
    kernel_version: str
    digest: str

    def to_dict(self) -> dict[str, str]:
        return {
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "data_template": str(self.data_template),
            "kernel_version": self.kernel_version,
            "digest": self.digest,
        }


# --- pure parts -------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net`` (modprobe's normal form)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise InvalidInput(f"modules.dep: cannot parse line {line!r}")
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def resolve_modules(dep_text: str, builtin_text: str, wanted: Iterable[str]) -> list[str]:
    """Module paths to load, dependencies first; built-in modules need nothing."""
    table = parse_modules_dep(dep_text)
    by_path = {path: name for name, (path, _) in table.items()}
    builtin = {module_name(line.strip()) for line in builtin_text.splitlines() if line.strip()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise InvalidInput(f"modules.dep: dependency cycle {' -> '.join((*chain, name))}")
        if name not in table:
            raise InvalidInput(f"kernel module {name} is neither built in nor in modules.dep")
        path, deps = table[name]
        for dep in deps:
            visit(by_path.get(dep, module_name(dep)), (*chain, name))
        seen.add(name)
        order.append(path)

    for name in wanted:
        if name not in builtin:
            visit(name, ())
    return order


@dataclass(frozen=True)
class CpioEntry:
    """One initramfs member: a directory, a regular file, a symlink or a device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Sequence[CpioEntry]) -> bytes:
    """A reproducible newc cpio archive (what the kernel unpacks as initramfs)."""
    out = io.BytesIO()

    def pad4() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    def member(ino: int, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, FIXED_MTIME, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)  # fmt: skip
        out.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
        out.write(name)
        pad4()
        out.write(entry.data)
        pad4()

    for ino, entry in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        member(ino, entry)
    member(0, CpioEntry("TRAILER!!!", 0))
    return out.getvalue()


def initramfs_entries(
    *,
    busybox: bytes,
    program: bytes,
    rootfs: Mapping[str, tuple[int, bytes]],
    modules: Sequence[tuple[str, bytes]],
) -> list[CpioEntry]:
    """The initramfs tree: busybox as /init, our program, rootfs files, flat modules."""
    dirs = ["bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "run", "sys", "tmp", "var"]
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries += [
        CpioEntry("init", stat.S_IFLNK | 0o777, b"bin/busybox"),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("bin/mcappliance", stat.S_IFREG | 0o755, program),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
    ]
    made = set(dirs)
    for rel, (mode, data) in sorted(rootfs.items()):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                entries.append(CpioEntry(parent, stat.S_IFDIR | 0o755))
        entries.append(CpioEntry(rel, stat.S_IFREG | mode, data))
    names = [module_name(path) + ".ko" for path, _ in modules]
    entries += [
        CpioEntry(f"lib/modules/{n}", stat.S_IFREG | 0o644, data)
        for n, (_, data) in zip(names, modules, strict=True)
    ]
    order = "".join(f"{n}\n" for n in names).encode()
    entries.append(CpioEntry("lib/modules/load-order", stat.S_IFREG | 0o644, order))
    return entries


def gzip_reproducible(data: bytes) -> bytes:
    """gzip with no file name and a zero date, so equal input gives equal output."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version)]


def pick_kernel(boot_files: Iterable[str]) -> str:
    """The newest ``vmlinuz-*-cloud-amd64`` version among /boot's file names."""
    versions = [
        name.removeprefix("vmlinuz-")
        for name in boot_files
        if name.startswith("vmlinuz-") and name.endswith("-cloud-amd64")
    ]
    if not versions:
        raise BuildError(
            "no Debian cloud kernel in /boot (vmlinuz-*-cloud-amd64):"
            " apt-get install linux-image-cloud-amd64 (or run `make bootstrap`)"
        )
    return max(versions, key=_version_key)


# --- I/O --------------------------------------------------------------------


@dataclass(frozen=True)
class BuildInputs:
    """Where the build reads from; overridable for tests."""

    boot_dir: Path = Path("/boot")
    modules_root: Path = Path("/lib/modules")
    busybox: Path = Path("/bin/busybox")
    source_dir: Path = SOURCE_DIR
    cc: str = "gcc"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _tool_output(argv: Sequence[str], what: str) -> str:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"{what} ({argv[0]}) is not usable: {exc}; run `make bootstrap`") from exc


def _libc_archive(cc: str) -> Path:
    out = _tool_output([cc, "-print-file-name=libc.a"], "the C compiler").strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        raise BuildError("static C library libc.a not found: apt-get install libc6-dev")
    return Path(out)


def _rootfs_files(source_dir: Path) -> dict[str, tuple[int, bytes]]:
    root = source_dir / "rootfs"
    files: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            files[path.relative_to(root).as_posix()] = (mode, path.read_bytes())
    if "etc/inittab" not in files:
        raise BuildError(f"{root}/etc/inittab is missing: the guest would not boot")
    return files


def _decompress_module(path: Path) -> bytes:
    data = _read(path, "kernel module")
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


@dataclass(frozen=True)
class _Plan:
    kernel_version: str
    kernel: Path
    module_paths: list[Path]
    digest: str


def plan_build(inputs: BuildInputs) -> _Plan:
    """Find every input and hash it; no output is written."""
    try:
        boot_names = os.listdir(inputs.boot_dir)
    except OSError as exc:
        raise BuildError(f"cannot list {inputs.boot_dir}: {exc.strerror}") from exc
    version = pick_kernel(boot_names)
    kernel = inputs.boot_dir / f"vmlinuz-{version}"
    moddir = inputs.modules_root / version
    dep_text = _read(moddir / "modules.dep", "module list").decode()
    builtin_path = moddir / "modules.builtin"
    builtin_text = builtin_path.read_text() if builtin_path.exists() else ""
    module_paths = [moddir / p for p in resolve_modules(dep_text, builtin_text, WANTED_MODULES)]
    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    feed("builder", BUILDER_VERSION.encode())
    feed("builder-source", _read(Path(__file__), "builder source"))
    feed("disk-layout", _read(Path(__file__).with_name("appliance_disk.py"), "layout source"))
    feed("kernel", _read(kernel, "kernel"))
    for path in module_paths:
        feed(f"module {path.relative_to(moddir)}", _read(path, "kernel module"))
    feed("busybox", _read(inputs.busybox, "busybox (apt-get install busybox-static)"))
    feed("program", _read(inputs.source_dir / "mcappliance.c", "guest program source"))
    for rel, (mode, data) in sorted(_rootfs_files(inputs.source_dir).items()):
        feed(f"rootfs {rel} {mode:o}", data)
    feed("cc", _tool_output([inputs.cc, "--version"], "the C compiler").encode())
    feed("cflags", " ".join(CFLAGS).encode())
    feed("libc", _read(_libc_archive(inputs.cc), "static C library"))
    return _Plan(version, kernel, module_paths, h.hexdigest())


def _compile(inputs: BuildInputs, tmp: Path) -> bytes:
    out = tmp / "mcappliance"
    argv = [inputs.cc, *CFLAGS, "-o", str(out), str(inputs.source_dir / "mcappliance.c")]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"compiling the guest program failed:\n{proc.stderr.strip()}")
    return out.read_bytes()


def _make_data_template(path: Path, tmp: Path) -> None:
    raw = tmp / "data.raw"
    with raw.open("wb") as f:
        f.write(encode_header())
        f.truncate(DATA_TEMPLATE_BYTES)
    run_qemu_img(convert_argv(raw, path, source_format="raw", target_format="qcow2"))


def _image_in(directory: Path, manifest: Mapping[str, str]) -> ApplianceImage:
    return ApplianceImage(
        kernel=directory / "vmlinuz",
        initrd=directory / "initramfs.img",
        data_template=directory / "data.qcow2",
        kernel_version=manifest["kernel_version"],
        digest=manifest["digest"],
    )


def _load_built(directory: Path) -> ApplianceImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = _image_in(directory, manifest)
    if all(p.is_file() for p in (image.kernel, image.initrd, image.data_template)):
        return image
    return None


def build_appliance(
    *,
    inputs: BuildInputs | None = None,
    build_dir: Path = BUILD_DIR,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ApplianceImage:
    """Build the appliance into ``build_dir/<digest>`` unless that build exists already."""
    inputs = inputs or BuildInputs()
    progress("appliance: hashing inputs (kernel, modules, busybox, guest sources, compiler)")
    plan = plan_build(inputs)
    short = plan.digest[:16]
    target = build_dir / short
    if not force and (done := _load_built(target)) is not None:
        progress(f"appliance: up to date ({short}, kernel {plan.kernel_version})")
        _write_current(build_dir, done)
        return done
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=build_dir) as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "out"
        out.mkdir()
        progress(f"appliance: compiling the guest program ({inputs.cc} {' '.join(CFLAGS)})")
        program = _compile(inputs, tmp)
        names = ", ".join(p.name for p in plan.module_paths)
        progress(f"appliance: packing {len(plan.module_paths)} kernel modules ({names})")
        modules = [(str(p), _decompress_module(p)) for p in plan.module_paths]
        entries = initramfs_entries(
            busybox=_read(inputs.busybox, "busybox"),
            program=program,
            rootfs=_rootfs_files(inputs.source_dir),
            modules=modules,
        )
        progress("appliance: writing initramfs.img (newc cpio, gzip)")
        (out / "initramfs.img").write_bytes(gzip_reproducible(cpio_newc(entries)))
        progress(f"appliance: copying kernel {plan.kernel.name}")
        shutil.copyfile(plan.kernel, out / "vmlinuz")
        progress(f"appliance: writing data.qcow2 (blank {DATA_TEMPLATE_BYTES >> 30} GiB data disk)")
        _make_data_template(out / "data.qcow2", tmp)
        manifest = {"digest": plan.digest, "kernel_version": plan.kernel_version}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in out.iterdir():
            os.chmod(f, 0o444 if f.name != "manifest.json" else 0o644)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    image = _image_in(target, manifest)
    _write_current(build_dir, image)
    progress(f"appliance: built {target}")
    for old in _stale_builds(build_dir, keep=KEEP_BUILDS):
        progress(f"appliance: removing old build {old.name}")
        shutil.rmtree(old, ignore_errors=True)
    return image


def _stale_builds(build_dir: Path, keep: int) -> list[Path]:
    """Build directories beyond the ``keep`` newest (older domains may still name those)."""
    builds = [p for p in build_dir.iterdir() if p.is_dir() and (p / "manifest.json").exists()]
    builds.sort(key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    return builds[keep:]


def _write_current(build_dir: Path, image: ApplianceImage) -> None:
    current = build_dir / "current.json"
    tmp = current.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(image.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(current)


def find_appliance(build_dir: Path = BUILD_DIR) -> ApplianceImage:
    """The appliance last built into ``build_dir``; raises BuildError if there is none."""
    try:
        data = json.loads((build_dir / "current.json").read_text())
    except (OSError, ValueError):
        raise BuildError(f"no demo appliance built in {build_dir}: run `make appliance`") from None
    image = _load_built(Path(data["kernel"]).parent)
    if image is None:
        raise BuildError(f"the appliance build in {build_dir} is incomplete: run `make appliance`")
    return image


def ensure_appliance(
    build_dir: Path = BUILD_DIR, progress: Callable[[str], None] = lambda _m: None
) -> ApplianceImage:
    """The appliance for the current inputs, building it first if needed."""
    return build_appliance(build_dir=build_dir, progress=progress)


def new_data_disk(image: ApplianceImage, directory: Path) -> Path:
    """A fresh data disk for one appliance: ``base.qcow2`` plus ``overlay.qcow2`` on it.

    The base is a private copy of the build's template (the appliance's own
    base, into which replication later merges frozen overlays); the overlay,
    with 4 KiB clusters and a relative backing name, is what the VM writes.
    Returns the overlay's path. Blocking: call it from a thread in async code.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base, overlay = directory / "base.qcow2", directory / "overlay.qcow2"
    if base.exists() or overlay.exists():
        raise BuildError(f"{directory} already holds a data disk: remove it or reuse it")
    run_qemu_img(convert_argv(image.data_template, base, source_format="qcow2"))
    run_qemu_img(create_overlay_argv(overlay.absolute(), base.absolute()))
    return overlay


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcloud.images.appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the demo appliance (cached by input hash)")
    b.add_argument("--out", type=Path, default=BUILD_DIR, help="build directory")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    r = sub.add_parser("read-counter", help="print the last durable counter on a data disk")
    r.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            image = build_appliance(build_dir=args.out, force=args.force, progress=print)
            print(f"appliance: ready: {image.kernel.parent}")
        else:
            value = read_counter_from_image(args.image)
            print(json.dumps({"seq": value.seq, "timestamp": value.timestamp}))
    except MeshcloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
