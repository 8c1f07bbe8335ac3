"""qemu-img command lines (pure builders) and the one runner that executes them.

Appliance disks are qcow2 *overlays* on a read-only base, created with
4 KiB clusters so that a frozen overlay holds little more than the bytes
the guest changed (see docs/hypervisor.md and the replication design). The
overlay names its backing file by a path *relative to the overlay's
directory*, so a volume directory can be copied or renamed as a whole.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from meshcloud.core.errors import HypervisorError, InvalidInput

OVERLAY_CLUSTER_BYTES = 4096
QEMU_IMG = "qemu-img"
_FORMATS = frozenset({"qcow2", "raw"})


def _check_path(kind: str, path: Path | str) -> str:
    """A path we pass to qemu-img: no control characters, not an option, not a protocol."""
    text = os.fspath(path)
    if not text:
        raise InvalidInput(f"{kind} path must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidInput(f"{kind} path {text!r} contains control characters")
    if text.startswith("-"):
        raise InvalidInput(f"{kind} path {text!r} must not start with '-'")
    first = text.split("/", 1)[0]
    if ":" in first:
        # qemu would read "json:{...}" or "nbd:..." as a protocol, not a file.
        raise InvalidInput(f"{kind} path {text!r}: a ':' in the first component is refused")
    return text


def _check_format(fmt: str) -> str:
    if fmt not in _FORMATS:
        raise InvalidInput(f"disk format {fmt!r} is not supported (use one of {sorted(_FORMATS)})")
    return fmt


def relative_backing(overlay: Path, base: Path) -> str:
    """The backing name to store in ``overlay``: ``base`` relative to the overlay's directory."""
    if not overlay.is_absolute() or not base.is_absolute():
        raise InvalidInput(f"overlay {overlay} and base {base} must be absolute paths")
    return os.path.relpath(base, overlay.parent)


def create_argv(
    path: Path, size_bytes: int, *, cluster_bytes: int = OVERLAY_CLUSTER_BYTES
) -> list[str]:
    """argv creating an empty qcow2 image of ``size_bytes``."""
    if size_bytes <= 0 or size_bytes % 512:
        raise InvalidInput(f"disk size {size_bytes} must be a positive multiple of 512 bytes")
    return [
        QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_bytes}",
        _check_path("image", path), str(size_bytes),
    ]  # fmt: skip


def create_overlay_argv(
    overlay: Path,
    base: Path,
    *,
    base_format: str = "qcow2",
    cluster_bytes: int = OVERLAY_CLUSTER_BYTES,
) -> list[str]:
    """argv creating a qcow2 overlay on ``base``, which it names by a relative path."""
    backing = relative_backing(overlay, base)
    return [
        QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_bytes}",
        "-b", _check_path("backing", backing), "-F", _check_format(base_format),
        _check_path("overlay", overlay),
    ]  # fmt: skip


def convert_argv(
    source: Path,
    target: Path,
    *,
    source_format: str = "raw",
    target_format: str = "qcow2",
    cluster_bytes: int = OVERLAY_CLUSTER_BYTES,
) -> list[str]:
    """argv copying ``source`` into a new standalone ``target`` (sparse-aware)."""
    argv = [QEMU_IMG, "convert", "-q", "-f", _check_format(source_format), "-O"]
    argv.append(_check_format(target_format))
    if target_format == "qcow2":
        argv += ["-o", f"cluster_size={cluster_bytes}"]
    return [*argv, _check_path("source", source), _check_path("target", target)]


def read_head_argv(
    image: Path, target: Path, length_bytes: int, *, fmt: str = "qcow2"
) -> list[str]:
    """argv copying the first ``length_bytes`` of the guest-visible disk to a raw file.

    ``-U`` (force share) lets it read an image a running QEMU holds open;
    what it reads is whatever the guest had flushed. ``skip=`` is avoided on
    purpose: qemu-img 7.2 shortens the output by the skipped amount.
    """
    block = 4096
    if length_bytes <= 0 or length_bytes % block:
        raise InvalidInput(f"length {length_bytes} must be a positive multiple of {block}")
    return [
        QEMU_IMG, "dd", "-U", "-f", _check_format(fmt), "-O", "raw", f"bs={block}",
        f"count={length_bytes // block}", f"if={_check_path('image', image)}",
        f"of={_check_path('target', target)}",
    ]  # fmt: skip


def info_argv(image: Path, *, backing_chain: bool = False) -> list[str]:
    """argv printing ``image``'s metadata as JSON (readable while QEMU runs it)."""
    argv = [QEMU_IMG, "info", "-U", "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    return [*argv, _check_path("image", image)]


def run_qemu_img(argv: Sequence[str], *, timeout_s: float = 300.0) -> str:
    """Run one qemu-img argv (never through a shell); return stdout or raise HypervisorError."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as exc:
        raise HypervisorError(f"{argv[0]} is not installed: run `make bootstrap`") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{' '.join(argv)} took longer than {timeout_s} s") from exc
    if proc.returncode != 0:
        raise HypervisorError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout
