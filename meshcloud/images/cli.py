"""`meshcloud kit ...`, `meshcloud image ...` and `meshcloud flash ...`: the warehouse commands."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import click

from meshcloud.core.errors import InvalidInput

MB = 1_000_000


@click.group()
def kit() -> None:
    """Deployment kits: cluster identity, CA, rack certificates, first login."""


@kit.command("new")
@click.option("--cluster", required=True, help="cluster name (lowercase, digits, '-')")
@click.option("--racks", required=True, help="rack names, comma-separated: rack-1,rack-2,rack-3")
@click.option("--sites", default="", help="one site for all racks, or one per rack in order")
@click.option(
    "--addresses", default="", help="mesh address per rack in order (default: from --subnet)"
)
@click.option("--subnet", default="10.44.0.0/24", show_default=True, help="the mesh network")
@click.option("--api-port", default=8440, show_default=True, type=int)
@click.option("--raft-port", default=7440, show_default=True, type=int)
@click.option("--mesh-interface", default="en* eth*", show_default=True,
              help="interface name(s) or globs that carry the mesh on the racks")  # fmt: skip
@click.option("--bootstrap-expect", default=None, type=int,
              help="racks that form the cluster (default: 3, or fewer if the kit has fewer)")  # fmt: skip
@click.option("--config-dir", default="/etc/meshcloud", show_default=True,
              help="where the rack finds its files (the rack image uses /etc/meshcloud)")  # fmt: skip
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="new directory for the kit (refused if it exists and is not empty)")  # fmt: skip
@click.option("--codes-out", type=click.Path(path_type=Path), default=None,
              help="also write the admin login and emergency codes to this new file (0600)")  # fmt: skip
def kit_new(
    cluster: str,
    racks: str,
    sites: str,
    addresses: str,
    subnet: str,
    api_port: int,
    raft_port: int,
    mesh_interface: str,
    bootstrap_expect: int | None,
    config_dir: str,
    out: Path,
    codes_out: Path | None,
) -> None:
    """Make a deployment kit for a new cluster."""
    from meshcloud.images.kit import create_kit, load_kit, plan_kit, show_kit

    plan = plan_kit(
        cluster, racks, sites=sites, addresses=addresses, subnet=subnet, api_port=api_port,
        raft_port=raft_port, mesh_interface=mesh_interface, config_dir=config_dir,
        bootstrap_expect=bootstrap_expect,
    )  # fmt: skip
    if codes_out is not None and codes_out.exists():
        raise InvalidInput(f"--codes-out {codes_out} exists: it is never overwritten")
    secrets = create_kit(plan, out)
    click.echo(show_kit(load_kit(out)))
    sheet = secrets_sheet(plan.cluster, secrets.admin_user, secrets.admin_password,
                          secrets.emergency_codes)  # fmt: skip
    click.echo("")
    click.echo(sheet)
    if codes_out is not None:
        import os

        fd = os.open(codes_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(sheet + "\n")
        click.echo(f"(also written to {codes_out}, mode 0600)")


def secrets_sheet(cluster: str, user: str, password: str, codes: tuple[str, ...]) -> str:
    """The once-only printout: first admin login and emergency codes."""
    rule = "=" * 72
    lines = [
        rule,
        f"  CLUSTER {cluster}: PRINT OR WRITE THIS DOWN NOW. It is shown only once;",
        "  the kit keeps only argon2 hashes of these.",
        rule,
        f"  console login:   user {user}   password {password}",
        "                   (you will be asked to change it at first login)",
        "",
        "  one-time emergency codes (each works once, when no admin can log in):",
    ]
    half = (len(codes) + 1) // 2
    for i in range(half):
        right = f"{i + half + 1:>2}. {codes[i + half]}" if i + half < len(codes) else ""
        lines.append(f"    {i + 1:>2}. {codes[i]}        {right}")
    lines.append(rule)
    return "\n".join(lines)


@kit.command("show")
@click.argument("directory", type=click.Path(path_type=Path))
def kit_show(directory: Path) -> None:
    """Summarise a kit (no secrets are printed)."""
    from meshcloud.images.kit import load_kit, show_kit

    click.echo(show_kit(load_kit(directory)))


@kit.command("passport")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--rack", "racks", multiple=True, help="only these racks (default: every flashed one)"
)
def kit_passport(directory: Path, racks: tuple[str, ...]) -> None:
    """Print again the passports of flashed racks (from the kit's flash log)."""
    from meshcloud.images.kit import load_kit

    kit_obj = load_kit(directory)
    written = write_passports_from_log(kit_obj, set(racks) or None)
    if not written:
        raise InvalidInput("no rack of this kit has been flashed yet (see flash-log.jsonl)")
    for path in written:
        click.echo(f"passport: {path}")


def write_passports_from_log(kit_obj: object, racks: set[str] | None) -> list[Path]:
    import json

    from meshcloud.images.kit import Kit
    from meshcloud.images.passport import PassportInfo, render_passport

    assert isinstance(kit_obj, Kit)
    last: dict[str, dict[str, str]] = {}
    try:
        lines = kit_obj.flash_log.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        entry = json.loads(line)
        if entry.get("result") == "pass" and (racks is None or entry["rack"] in racks):
            last[entry["rack"]] = entry
    out_dir = kit_obj.directory / "passports"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    written = []
    for rack, entry in sorted(last.items()):
        info = PassportInfo(
            rack=rack,
            site=str(kit_obj.rack(rack)["site"]),
            cluster=kit_obj.cluster,
            cluster_id=kit_obj.cluster_id,
            console_url=kit_obj.console_url(rack),
            image_sha256=entry["image_sha256"],
            flashed_at=entry["time"][:16].replace("T", " ") + " UTC",
            device=entry["device"],
            ca_sha256=str(kit_obj.summary["ca"]["sha256"]),
        )
        written.append(render_passport(info, out_dir / f"{rack}.pdf"))
    return written


# -- image -----------------------------------------------------------------------------------


@click.group()
def image() -> None:
    """The rack OS image: build it, show what is in it."""


@image.command("build")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="directory to put rack-os.img, .bmap, SHA256SUMS, manifest.json in")  # fmt: skip
@click.option("--build-dir", type=click.Path(path_type=Path), default=None,
              help="cache directory (default: build/rack-os in the repository)")  # fmt: skip
@click.option("--mirror", "mirrors", multiple=True,
              help="apt source line 'deb URI SUITE main' (default: the Debian sources of this machine)")  # fmt: skip
def image_build(out: Path | None, build_dir: Path | None, mirrors: tuple[str, ...]) -> None:
    """Build the rack OS image (as root; cached by a hash of its inputs)."""
    from meshcloud.images.rackos import DEFAULT_BUILD_DIR, build_rack_image

    start = time.monotonic()

    def progress(message: str) -> None:
        click.echo(f"[{time.monotonic() - start:6.0f}s] {message}")

    built = build_rack_image(out, build_dir=build_dir or DEFAULT_BUILD_DIR, progress=progress,
                             mirrors=list(mirrors) or None)  # fmt: skip
    manifest = built.manifest()
    click.echo(f"image:    {built.image}")
    click.echo(f"bmap:     {built.bmap}")
    click.echo(f"sha256:   {manifest['sha256']}")
    click.echo(f"size:     {int(str(manifest['bytes'])) // 2**20} MiB,"
               f" {int(str(manifest['mapped_bytes'])) // 2**20} MiB mapped")  # fmt: skip


@image.command("wheels")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="the tar file to write (replaced if it exists), e.g. build/meshcloud-wheels.tar")  # fmt: skip
@click.option("--build-dir", type=click.Path(path_type=Path), default=None,
              help="cache directory (default: build/rack-os in the repository)")  # fmt: skip
def image_wheels(out: Path, build_dir: Path | None) -> None:
    """One tar of the wheels of meshcloud and its dependencies, as the image installs them.

    For ansible/ (docs/ansible.md): the same wheels give the same tar, byte for byte.
    """
    import os

    from meshcloud.images.rackos import DEFAULT_BUILD_DIR, SOURCE_DATE_EPOCH

    cache = build_dir or DEFAULT_BUILD_DIR
    cache.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # pip and the wheel builder stamp every member with SOURCE_DATE_EPOCH when it is set.
    saved_epoch = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(SOURCE_DATE_EPOCH)
    try:
        names = _write_wheel_tar(out, cache)
    finally:
        if saved_epoch is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = saved_epoch
    click.echo(f"{len(names)} wheels in {out}")


def _write_wheel_tar(out: Path, cache: Path) -> list[str]:
    """Build the wheels, write them to ``out`` as one tar (fixed times and owners); their names."""
    import os
    import tarfile
    import tempfile

    from meshcloud.images.rackos import SOURCE_DATE_EPOCH, build_wheelhouse

    with tempfile.TemporaryDirectory(prefix="wheels-", dir=cache) as tmp:
        wheels = Path(tmp) / "wheels"
        names = build_wheelhouse(wheels, cache, lambda line: click.echo(line))
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                info = tar.gettarinfo(wheels / name, arcname=name)
                info.mtime, info.mode = SOURCE_DATE_EPOCH, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with open(wheels / name, "rb") as f:
                    tar.addfile(info, f)
        os.replace(partial, out)
    return names


@image.command("show")
@click.argument("path", type=click.Path(path_type=Path))
def image_show(path: Path) -> None:
    """Show an image's manifest (PATH: the image or its directory)."""
    import json

    directory = path if path.is_dir() else path.parent
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"no readable manifest.json in {directory}: {exc}") from exc
    for key in ("image", "sha256", "bytes", "mapped_bytes", "kernel", "suite", "image_key",
                "base_key", "source_date_epoch"):  # fmt: skip
        click.echo(f"{key + ':':<18} {manifest.get(key)}")
    click.echo(f"{'packages:':<18} {len(manifest.get('packages', {}))} Debian packages")
    click.echo(f"{'wheels:':<18} {', '.join(manifest.get('wheels', []))}")


# -- flash -----------------------------------------------------------------------------------


class ProgressBoard:
    """One progress line per device: redrawn in place on a terminal, else every 10 %."""

    PHASES = {"write": "writing", "verify": "verifying", "identity": "identity",
              "done": "done", "failed": "FAILED"}  # fmt: skip

    def __init__(self, devices: list[str], stream: TextIO | None = None) -> None:
        self.stream: TextIO = stream or sys.stdout
        self.devices = devices
        self.state: dict[str, tuple[str, int, int]] = {d: ("waiting", 0, 0) for d in devices}
        self.lock = threading.Lock()
        self.tty = self.stream.isatty()
        self.drawn = False
        self.last_draw = 0.0
        self.last_decile: dict[tuple[str, str], int] = {}
        self.start = time.monotonic()

    def line(self, device: str) -> str:
        phase, done, total = self.state[device]
        pct = 100 * done / total if total else 0.0
        bar = "#" * int(pct / 5)
        rate = ""
        elapsed = time.monotonic() - self.start
        if phase in ("write", "verify") and elapsed > 0:
            rate = f" {done / MB / elapsed:6.1f} MB/s"
        return f"{device:<14} {self.PHASES.get(phase, phase):<10} [{bar:<20}] {pct:5.1f}%{rate}"

    def update(self, device: str, phase: str, done: int, total: int) -> None:
        with self.lock:
            previous = self.state[device][0]
            if phase != previous:
                self.start = time.monotonic() if phase in ("write", "verify") else self.start
            self.state[device] = (phase, done, total)
            write = self.stream.write
            if self.tty:
                now = time.monotonic()
                if now - self.last_draw < 0.2 and phase == previous:
                    return
                self.last_draw = now
                if self.drawn:
                    write(f"\x1b[{len(self.devices)}A")
                for d in self.devices:
                    write("\x1b[2K" + self.line(d) + "\n")
                self.drawn = True
            else:
                decile = int(10 * done / total) if total else 0
                key = (device, phase)
                if phase != previous or decile > self.last_decile.get(key, -1):
                    self.last_decile[key] = decile
                    write(self.line(device) + "\n")
            self.stream.flush()


@click.command("flash")
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@click.argument("devices", metavar="DEVICE...", nargs=-1, required=True,
                type=click.Path(path_type=Path))  # fmt: skip
@click.option("--rack", "racks", multiple=True, required=True,
              help="the rack these disks are for (once for all devices, or once per device)")  # fmt: skip
@click.option("--kit", "kit_dir", required=True, type=click.Path(path_type=Path),
              help="the cluster's kit (from `meshcloud kit new`)")  # fmt: skip
@click.option("--bmap", "bmap_path", type=click.Path(path_type=Path), default=None,
              help="block map (default: IMAGE.bmap)")  # fmt: skip
@click.option("--check", is_flag=True, help="only check the devices; write nothing")
@click.option("--no-passport", is_flag=True, help="do not write rack passports")
def flash(
    image_path: Path,
    devices: tuple[Path, ...],
    racks: tuple[str, ...],
    kit_dir: Path,
    bmap_path: Path | None,
    check: bool,
    no_passport: bool,
) -> None:
    """Write the rack image and a rack's identity to boot disks, then verify them.

    Refuses mounted devices, the disk the system runs from, the disk holding
    the image and read-only devices; there is no override.
    """
    from meshcloud.images.flash import flash_devices, load_image, pair_racks, plan_flash
    from meshcloud.images.kit import load_kit

    kit_obj = load_kit(kit_dir)
    pairs = pair_racks(list(devices), list(racks))
    for _device, rack in pairs:
        kit_obj.rack(rack)
    info = load_image(image_path, bmap_path)
    plan = plan_flash(info, pairs)
    click.echo(
        f"image {image_path} (sha256 {info.sha256[:16]}...):"
        f" {info.bmap.mapped_bytes / MB:.0f} MB mapped of {info.bmap.image_bytes / MB:.0f} MB"
    )
    for device in plan.devices:
        if device.accepted:
            click.echo(f"  {device.path}: ok for rack {device.rack}")
        else:
            click.secho(f"  {device.path}: REFUSED: {'; '.join(device.reasons)}", fg="red")
    if check:
        sys.exit(0 if not plan.refused else 1)
    board = ProgressBoard([str(d.path) for d in plan.devices if d.accepted])
    results = flash_devices(plan, kit_obj, progress=board.update)
    click.echo("")
    for r in results:
        if r.ok:
            rate = r.written_bytes / MB / r.write_s if r.write_s else 0.0
            click.secho(
                f"PASS    {r.device}  rack {r.rack}: {r.written_bytes / MB:.0f} MB in"
                f" {r.write_s:.1f} s ({rate:.0f} MB/s), verified in {r.verify_s:.1f} s",
                fg="green",
            )
        else:
            label = "REFUSED" if r.refused else "FAIL   "
            click.secho(f"{label} {r.device}  rack {r.rack}: {r.error}", fg="red")
    click.echo(f"logged in {kit_obj.flash_log}")
    passed = {r.rack for r in results if r.ok}
    if passed and not no_passport:
        for path in write_passports_from_log(kit_obj, passed):
            click.echo(f"passport: {path}")
    if not all(r.ok for r in results):
        sys.exit(1)


COMMANDS = [kit, image, flash]
