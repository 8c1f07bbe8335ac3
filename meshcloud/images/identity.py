"""A rack's identity: what ``meshcloud flash`` writes into the identity partition.

The record is self-checking::

    b"MCIDENT1" | payload length (u64 LE) | SHA-256 of payload (32 bytes) | payload

The payload is UTF-8 JSON: ``{"version": 1, "rack": ..., "site": ..., "cluster":
..., "cluster_id": ..., "files": {relative path: text}, "network": {...}}``.
An image fresh from ``meshcloud image build`` holds a *blank* record (empty
payload): the rack boots, but the daemon does not start until it is flashed.

On the rack, ``meshcloud-identity.service`` runs ``python -m
meshcloud.images.identity unpack`` before the daemon: it finds the identity
partition on the disk that holds ``/``, checks the record and writes the
files to ``/etc/meshcloud`` (secrets 0600), the host name and the mesh
network settings. The identity partition holds the cluster secret and the
rack's key: a rack's boot disk must be guarded like the kit itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name
from meshcloud.images.disklayout import IDENTITY_TYPE, SECTOR_BYTES, parse_mbr

MAGIC = b"MCIDENT1"
HEADER = struct.Struct("<8sQ32s")
RECORD_VERSION = 1
BLOCK = 4096
# Files from the record that must stay private on the rack.
SECRET_FILES = frozenset(
    {"cluster-secret", "tls/rack.key", "ssh/replication_ed25519", "users.json"}
)
ALLOWED_FILES = SECRET_FILES | {
    "daemon.yaml",
    "tls/ca.crt",
    "tls/rack.crt",
    "ssh/replication_ed25519.pub",
    "identity.json",
}


@dataclass(frozen=True)
class Identity:
    """Who a rack is and which cluster it belongs to."""

    rack: str
    site: str
    cluster: str
    cluster_id: str
    address: str
    prefix_len: int
    api_port: int
    mesh_interface: str = "en* eth*"
    files: dict[str, str] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "rack": self.rack,
            "site": self.site,
            "cluster": self.cluster,
            "cluster_id": self.cluster_id,
            "network": {
                "address": self.address,
                "prefix_len": self.prefix_len,
                "api_port": self.api_port,
                "mesh_interface": self.mesh_interface,
            },
            "files": dict(sorted(self.files.items())),
        }

    def summary(self) -> dict[str, Any]:
        """The payload without the file contents (safe to print or log)."""
        data = self.to_payload()
        data["files"] = sorted(self.files)
        return data


def _check_file_name(name: str) -> str:
    if name not in ALLOWED_FILES:
        raise InvalidInput(f"identity file {name!r} is not one of {sorted(ALLOWED_FILES)}")
    return name


def identity_from_payload(data: Any) -> Identity:
    """Validate a decoded payload; raises InvalidInput naming what is wrong."""
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        raise InvalidInput(f"identity record: expected version {RECORD_VERSION}")
    try:
        net = data["network"]
        files = data["files"]
        ident = Identity(
            rack=validate_name("rack", data["rack"]),
            site=validate_name("site", data["site"]),
            cluster=validate_name("cluster", data["cluster"]),
            cluster_id=str(data["cluster_id"]),
            address=str(net["address"]),
            prefix_len=int(net["prefix_len"]),
            api_port=int(net["api_port"]),
            mesh_interface=str(net["mesh_interface"]),
            files={_check_file_name(str(k)): str(v) for k, v in files.items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidInput(f"identity record: missing or malformed field: {exc}") from None
    return ident


def encode_record(identity: Identity | None) -> bytes:
    """The bytes to write at the start of the identity partition, padded to 4 KiB.

    ``None`` encodes the blank record of an image that has not been flashed.
    """
    payload = b""
    if identity is not None:
        payload = json.dumps(identity.to_payload(), sort_keys=True).encode()
    raw = HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload
    return raw + b"\0" * (-len(raw) % BLOCK)


def record_length(header: bytes) -> int:
    """The full record length (header + payload) announced by a header; checks the magic."""
    if len(header) < HEADER.size:
        raise InvalidInput("identity record: truncated header")
    magic, length, _digest = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise InvalidInput(
            "no identity record (wrong magic): this disk was not written by `meshcloud flash`"
            " or the identity partition is damaged"
        )
    return HEADER.size + int(length)


def decode_record(raw: bytes) -> Identity | None:
    """Decode a record; None for a blank record. Raises InvalidInput if damaged."""
    total = record_length(raw)
    if len(raw) < total:
        raise InvalidInput(f"identity record: {total} bytes announced, {len(raw)} available")
    _magic, length, digest = HEADER.unpack_from(raw)
    payload = raw[HEADER.size : total]
    if hashlib.sha256(payload).digest() != digest:
        raise InvalidInput("identity record: checksum mismatch (the identity area is damaged)")
    if length == 0:
        return None
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise InvalidInput(f"identity record: not JSON: {exc}") from None
    return identity_from_payload(data)


def read_record_at(path: Path, offset: int, limit: int) -> Identity | None:
    """Read and decode the record at ``offset`` of a file or block device."""
    with open(path, "rb", buffering=0) as dev:
        header = os.pread(dev.fileno(), HEADER.size, offset)
        total = record_length(header)
        if total > limit:
            raise InvalidInput(f"identity record of {total} bytes exceeds its area ({limit})")
        return decode_record(os.pread(dev.fileno(), total, offset))


def read_identity_from_disk(path: Path) -> Identity | None:
    """Read the identity record of a whole rack disk (or image file) via its MBR."""
    with open(path, "rb", buffering=0) as dev:
        sector0 = os.pread(dev.fileno(), SECTOR_BYTES, 0)
    parts = [p for p in parse_mbr(sector0) if p.type_id == IDENTITY_TYPE]
    if len(parts) != 1:
        raise InvalidInput(f"{path}: no identity partition: is this a meshcloud rack disk?")
    return read_record_at(path, parts[0].start_bytes, parts[0].size_bytes)


# -- on the rack ----------------------------------------------------------------------------


def networkd_unit(identity: Identity) -> str:
    """The systemd-networkd file giving the mesh interface the rack's address."""
    return (
        "# Written by meshcloud-identity.service from the identity partition.\n"
        "[Match]\n"
        f"Name={identity.mesh_interface}\n\n"
        "[Network]\n"
        f"Address={identity.address}/{identity.prefix_len}\n"
        "LinkLocalAddressing=ipv6\n"
        "MulticastDNS=no\n"
    )


def _write_private(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install_identity(identity: Identity, dest: Path, etc: Path = Path("/etc")) -> list[Path]:
    """Write the identity's files under ``dest`` and the host name and network under ``etc``."""
    written = []
    for name, text in sorted(identity.files.items()):
        rel = PurePosixPath(_check_file_name(name))
        target = dest.joinpath(*rel.parts)
        _write_private(target, text, 0o600 if name in SECRET_FILES else 0o644)
        written.append(target)
    _write_private(etc / "hostname", identity.rack + "\n", 0o644)
    network = etc / "systemd" / "network" / "10-meshcloud-mesh.network"
    _write_private(network, networkd_unit(identity), 0o644)
    written += [etc / "hostname", network]
    return written


def _mount_source_devnum(mountinfo: str, mount_point: str) -> tuple[int, int] | None:
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == mount_point:
            major, minor = fields[2].split(":")
            return int(major), int(minor)
    return None


def root_disk(sys_root: Path = Path("/sys"), proc: Path = Path("/proc")) -> Path:
    """The /dev path of the whole disk that holds ``/``."""
    devnum = _mount_source_devnum((proc / "self" / "mountinfo").read_text(), "/")
    if devnum is None:
        raise InvalidInput("cannot find the device holding / in /proc/self/mountinfo")
    node = (sys_root / "dev" / "block" / f"{devnum[0]}:{devnum[1]}").resolve()
    if (node / "partition").exists():
        node = node.parent
    return Path("/dev") / node.name


def unpack(dest: Path, disk: Path | None = None) -> str:
    """Install the identity of the disk holding / (or ``disk``); return a sentence saying what."""
    disk = disk or root_disk()
    identity = read_identity_from_disk(disk)
    if identity is None:
        return (
            f"{disk}: blank identity: this rack has not been flashed with"
            " `meshcloud flash --rack NAME --kit DIR`; the daemon will not start"
        )
    install_identity(identity, dest)
    # Not permitted in a container or a test: /etc/hostname still names it at the next boot.
    with contextlib.suppress(OSError):
        socket.sethostname(identity.rack)
    return (
        f"rack {identity.rack} (site {identity.site}) of cluster {identity.cluster}"
        f" ({identity.cluster_id}) installed from {disk}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcloud.images.identity")
    sub = parser.add_subparsers(dest="command", required=True)
    p_unpack = sub.add_parser("unpack", help="install the rack identity from the boot disk")
    p_unpack.add_argument("--dest", type=Path, default=Path("/etc/meshcloud"))
    p_unpack.add_argument("--disk", type=Path, default=None)
    p_show = sub.add_parser("show", help="print a disk's identity (without file contents)")
    p_show.add_argument("disk", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "unpack":
            print(unpack(args.dest, args.disk))
        else:
            ident = read_identity_from_disk(args.disk)
            print(json.dumps(ident.summary() if ident else None, indent=2))
    except (InvalidInput, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
