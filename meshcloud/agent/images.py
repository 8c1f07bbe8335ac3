"""The image catalog: appliance images by name, checksummed, shipped with rsync, verified before use.

An *image* is what an appliance spec names in ``image``: a few files (for
the demo appliance a kernel, an initramfs and a data-disk template) and a
manifest that gives each file's role, size and SHA-256. On a rack the
catalog lives under ``<state_dir>/images/``::

    <name>/manifest.json        the manifest (written last when an image is pushed)
    <name>/<file> ...           the files it lists
    <name>/.bad-<file>          a file that failed its checksum, kept for a post-mortem

:meth:`ImageCatalog.verify` is the only way the agent gets at an image's
files: it checks every file's size and SHA-256 against the manifest (a
verified file is re-hashed only when its inode, size or mtime changes) and
raises :class:`ImageError` otherwise, so an image that fails its checksum is
never used. A corrupt file is moved aside so the next push replaces it.

Images reach racks with rsync over SSH (:func:`push_image_argvs`, the same
ssh options and pinned host keys as replication): files first, the manifest
last, each file written to a temporary name and renamed by rsync. A rack
that has only part of an image fails verification and waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcloud.core.errors import InvalidInput, MeshcloudError, NotFound
from meshcloud.core.names import validate_name
from meshcloud.replication.transport import RSYNC, SshTarget, rsync_rsh

MANIFEST = "manifest.json"
BAD_PREFIX = ".bad-"
ROLE_KERNEL = "kernel"
ROLE_INITRD = "initrd"
DISK_ROLE_PREFIX = "disk:"
MAX_FILES = 16
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_REMOTE_DIR_RE = re.compile(r"^/[A-Za-z0-9_./@+-]+$")


class ImageError(MeshcloudError):
    """An image is missing, incomplete or failed its checksum: it is not used."""


def _check_role(role: str) -> str:
    if role in (ROLE_KERNEL, ROLE_INITRD):
        return role
    if isinstance(role, str) and role.startswith(DISK_ROLE_PREFIX):
        validate_name("disk", role[len(DISK_ROLE_PREFIX) :])
        return role
    raise InvalidInput(
        f"image file role {role!r} must be kernel, initrd or disk:<disk name> (a disk template)"
    )


def _check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _FILE_RE.match(name) or name == MANIFEST:
        raise InvalidInput(
            f"image file name {name!r} must be a plain file name (letters, digits, '._-')"
        )
    return name


@dataclass(frozen=True)
class ImageFile:
    """One file of an image: its role, its name in the image directory, size and SHA-256."""

    role: str
    file: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        _check_role(self.role)
        _check_file_name(self.file)
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise InvalidInput(f"image file {self.file}: sha256 must be 64 lowercase hex digits")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise InvalidInput(f"image file {self.file}: size must be a non-negative integer")

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "file": self.file, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: Any) -> ImageFile:
        if not isinstance(data, Mapping) or set(data) != {"role", "file", "sha256", "size"}:
            raise InvalidInput("an image file entry needs exactly role, file, sha256, size")
        return cls(data["role"], data["file"], data["sha256"], data["size"])


@dataclass(frozen=True)
class ImageManifest:
    """An image: its name (what specs say in ``image``), a version, and its files."""

    name: str
    version: str
    files: tuple[ImageFile, ...]

    def __post_init__(self) -> None:
        validate_name("image", self.name)
        if not isinstance(self.version, str) or not _VERSION_RE.match(self.version):
            raise InvalidInput(f"image {self.name}: version must be 1-64 of [A-Za-z0-9._-]")
        if not 0 < len(self.files) <= MAX_FILES:
            raise InvalidInput(f"image {self.name}: 1 to {MAX_FILES} files, not {len(self.files)}")
        roles = [f.role for f in self.files]
        names = [f.file for f in self.files]
        if len(set(roles)) != len(roles) or len(set(names)) != len(names):
            raise InvalidInput(f"image {self.name}: file roles and names must be unique")
        if (ROLE_KERNEL in roles) != (ROLE_INITRD in roles):
            raise InvalidInput(f"image {self.name}: a kernel needs an initrd and the other way")

    def by_role(self, role: str) -> ImageFile | None:
        return next((f for f in self.files if f.role == role), None)

    def disk_templates(self) -> dict[str, ImageFile]:
        """``{disk name: template file}``: disks of this name start as a copy of the template."""
        return {
            f.role[len(DISK_ROLE_PREFIX) :]: f
            for f in self.files
            if f.role.startswith(DISK_ROLE_PREFIX)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.role)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> ImageManifest:
        if not isinstance(data, Mapping) or set(data) != {"name", "version", "files"}:
            raise InvalidInput("an image manifest needs exactly name, version, files")
        files = data["files"]
        if not isinstance(files, list):
            raise InvalidInput("image manifest: files must be a list")
        return cls(data["name"], data["version"], tuple(ImageFile.from_dict(f) for f in files))


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose every file matched its checksum: the paths the hypervisor may use."""

    manifest: ImageManifest
    directory: Path

    def path(self, role: str) -> Path | None:
        entry = self.manifest.by_role(role)
        return self.directory / entry.file if entry is not None else None

    @property
    def kernel(self) -> Path | None:
        return self.path(ROLE_KERNEL)

    @property
    def initrd(self) -> Path | None:
        return self.path(ROLE_INITRD)

    def templates(self) -> dict[str, Path]:
        return {d: self.directory / f.file for d, f in self.manifest.disk_templates().items()}


# -- hashing and building manifests ------------------------------------------------


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's contents, hex (blocking)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(name: str, version: str, files: Mapping[str, Path]) -> ImageManifest:
    """Hash ``{role: path}`` into a manifest; each file keeps its base name (blocking)."""
    entries = []
    for role, path in sorted(files.items()):
        entries.append(ImageFile(role, path.name, sha256_file(path), path.stat().st_size))
    return ImageManifest(name, version, tuple(entries))


def appliance_files(kernel: Path, initrd: Path, data_template: Path) -> dict[str, Path]:
    """The roles of the demo appliance's files (meshcloud.images.appliance)."""
    return {ROLE_KERNEL: kernel, ROLE_INITRD: initrd, f"{DISK_ROLE_PREFIX}data": data_template}


# -- the catalog on a rack ----------------------------------------------------------


@dataclass(frozen=True)
class _Stamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int


def _stamp(path: Path) -> _Stamp:
    st = path.stat()
    return _Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ImageCatalog:
    """The images on this rack, under ``root`` (``<state_dir>/images``). Blocking methods."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: dict[tuple[str, str], tuple[_Stamp, str]] = {}

    def image_dir(self, name: str) -> Path:
        return self.root / validate_name("image", name)

    def names(self) -> list[str]:
        """Images with a manifest here (verified or not)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()
        )

    def manifest(self, name: str) -> ImageManifest:
        path = self.image_dir(name) / MANIFEST
        try:
            raw = path.read_text()
        except FileNotFoundError:
            raise NotFound(
                f"image {name} is not on this rack: push it here (docs/catalog.md)"
            ) from None
        try:
            return ImageManifest.from_dict(json.loads(raw))
        except (ValueError, InvalidInput) as exc:
            raise ImageError(
                f"image {name}: {path} is not a valid manifest ({exc}): push the image again"
            ) from None

    def verify(self, name: str) -> VerifiedImage:
        """Check every file of image ``name``; raise ImageError (or NotFound) if one does not match.

        A file that fails its checksum is renamed ``.bad-<file>`` so that it can never be
        used and the next push replaces it.
        """
        manifest = self.manifest(name)
        directory = self.image_dir(name)
        for entry in manifest.files:
            path = directory / entry.file
            try:
                stamp = _stamp(path)
            except FileNotFoundError:
                raise ImageError(
                    f"image {name}: file {entry.file} is missing on this rack: push the image again"
                ) from None
            if stamp.size != entry.size:
                self._quarantine(name, path)
                raise ImageError(
                    f"image {name}: {entry.file} is {stamp.size} bytes, the manifest says"
                    f" {entry.size}: refusing it (moved aside); push the image again"
                )
            key = (name, entry.file)
            cached = self._verified.get(key)
            if cached == (stamp, entry.sha256):
                continue
            actual = sha256_file(path)
            if actual != entry.sha256:
                self._verified.pop(key, None)
                self._quarantine(name, path)
                raise ImageError(
                    f"image {name}: {entry.file} failed its checksum (sha256 {actual[:12]}...,"
                    f" expected {entry.sha256[:12]}...): refusing it (moved aside); push the"
                    " image again"
                )
            self._verified[key] = (stamp, entry.sha256)
        return VerifiedImage(manifest, directory)

    def _quarantine(self, name: str, path: Path) -> None:
        bad = path.with_name(BAD_PREFIX + path.name)
        try:
            os.replace(path, bad)
        except OSError:
            return
        self._verified.pop((name, path.name), None)

    def install(self, manifest: ImageManifest, files: Mapping[str, Path]) -> VerifiedImage:
        """Copy an image from local files ``{role: path}`` into the catalog, then verify it."""
        directory = self.image_dir(manifest.name)
        directory.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            source = files.get(entry.role)
            if source is None:
                raise InvalidInput(f"image {manifest.name}: no file given for role {entry.role}")
            tmp = directory / f".tmp-{entry.file}"
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, directory / entry.file)
        _write_atomically(directory / MANIFEST, manifest.to_json())
        return self.verify(manifest.name)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- distribution with rsync over SSH -----------------------------------------------


def _check_remote_dir(path: str) -> str:
    if not _REMOTE_DIR_RE.match(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise InvalidInput(
            f"remote image directory {path!r} must be absolute and use only letters, digits"
            " and ._/@+-"
        )
    return path.rstrip("/")


def push_image_argvs(
    manifest: ImageManifest,
    source_dir: Path,
    target: SshTarget,
    remote_root: str,
    *,
    bwlimit_kbps: int = 0,
) -> list[list[str]]:
    """rsync argvs pushing an image to one rack: the files, then (separately) the manifest.

    ``source_dir`` holds the files under their manifest names and ``manifest.json``;
    ``remote_root`` is the rack's catalog root (``<state_dir>/images``). rsync
    writes each file under a temporary name and renames it once complete, and
    ``--checksum`` makes a re-push skip files that already match.
    """
    remote = f"{_check_remote_dir(remote_root)}/{validate_name('image', manifest.name)}"

    def rsync(chmod: str, sources: list[str]) -> list[str]:
        argv = [RSYNC, "--checksum", "--times", f"--chmod={chmod}", "--mkpath", "--timeout=60"]
        if bwlimit_kbps:
            argv.append(f"--bwlimit={int(bwlimit_kbps)}")
        return [*argv, "-e", rsync_rsh(target), *sources, f"{target.destination}:{remote}/"]

    files = [str(source_dir / f.file) for f in sorted(manifest.files, key=lambda f: f.file)]
    return [rsync("F444,D755", files), rsync("F644,D755", [str(source_dir / MANIFEST)])]


def write_push_source(manifest: ImageManifest, files: Mapping[str, Path], directory: Path) -> Path:
    """Lay out an image for pushing: files under their manifest names plus manifest.json.

    Files are hard-linked when possible (same filesystem), else copied.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        target = directory / entry.file
        target.unlink(missing_ok=True)
        try:
            os.link(files[entry.role], target)
        except OSError:
            shutil.copyfile(files[entry.role], target)
    (directory / MANIFEST).write_text(manifest.to_json())
    return directory


Runner = Callable[[Sequence[str]], None]


def run_argv(argv: Sequence[str], timeout_s: float = 600.0) -> None:
    """Run one argv (no shell); raise ImageError with rsync's message if it fails."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{argv[0]} failed: {exc}") from None
    if proc.returncode != 0:
        raise ImageError(f"{argv[0]} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")


def push_image(
    manifest: ImageManifest,
    source_dir: Path,
    target: SshTarget,
    remote_root: str,
    *,
    runner: Runner = run_argv,
) -> None:
    """Push an image to one rack (files, then manifest); the rack verifies it before use."""
    for argv in push_image_argvs(manifest, source_dir, target, remote_root):
        runner(argv)
