"""The whole warehouse path: build the rack image, flash it, boot it, reach the daemon.

Slow: the first build takes minutes (cached under build/rack-os/ by a hash of
its inputs, so later runs reuse it); the boot under TCG takes a few more.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcloud.cli import main
from meshcloud.images.disklayout import MIB
from meshcloud.images.identity import read_identity_from_disk
from meshcloud.images.kit import create_kit, load_kit, plan_kit
from meshcloud.images.rackos import build_rack_image
from meshcloud.web.tls import client_context

from .conftest import CHEAP_HASHER, LoopFactory

pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(2700)]

GUEST_ADDRESS = "10.0.2.15"  # QEMU user networking's guest address
BOOT_DEADLINE_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_argv(disk: Path, serial_log: Path, host_port: int, api_port: int) -> list[str]:
    """TCG guest, its disk on virtio, user networking with one forward bound to loopback."""
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-drive", f"file={disk},format=raw,if=virtio,cache=writeback",
        "-netdev", f"user,id=mesh,restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-{GUEST_ADDRESS}:{api_port}",
        "-device", "virtio-net-pci,netdev=mesh",
        "-serial", f"file:{serial_log}",
    ]  # fmt: skip


def console_text(serial: Path) -> str:
    """The serial console so far, without colour escapes."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", serial.read_text(errors="replace"))


def get_health(port: int, ca: Path, rack: str) -> dict[str, object] | None:
    """GET /api/v1/health over HTTPS (the kit turns TLS on), verified with the kit's CA.

    The guest is reached through a loopback forward, so the certificate is
    checked against the rack's name (a DNS SAN of every kit certificate).
    """
    conn = http.client.HTTPConnection(rack, port, timeout=5)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            conn.sock = client_context(ca).wrap_socket(raw, server_hostname=rack)
        except OSError:
            raw.close()
            raise
        conn.request("GET", "/api/v1/health")
        resp = conn.getresponse()
        data: dict[str, object] = json.loads(resp.read())
        return data if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_build_flash_boot_and_the_daemon_answers(tmp_path: Path, loop_device: LoopFactory) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("mmdebstrap") is None:
        pytest.skip("needs qemu-system-x86 and mmdebstrap")
    t0 = time.monotonic()
    image = build_rack_image(progress=lambda line: print(line, flush=True))
    build_s = time.monotonic() - t0

    plan = plan_kit(
        "field", "rack-1,rack-2", subnet="10.0.2.0/24", addresses=f"{GUEST_ADDRESS},10.0.2.16"
    )
    create_kit(plan, tmp_path / "kit", hasher=CHEAP_HASHER)
    kit = load_kit(tmp_path / "kit")
    # A disk larger than the image: the rack grows its root file system on first boot.
    disk = loop_device(size_bytes=image.image.stat().st_size + 64 * MIB)
    result = CliRunner().invoke(
        main,
        ["flash", str(image.image), str(disk), "--rack", "rack-1", "--kit", str(kit.directory)],
    )
    assert result.exit_code == 0, result.output
    identity = read_identity_from_disk(disk)
    assert identity is not None and identity.rack == "rack-1"

    port = free_port()
    serial = tmp_path / "serial.log"
    t1 = time.monotonic()
    qemu = subprocess.Popen(
        qemu_argv(disk, serial, port, kit.api_port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = None
        deadline = time.monotonic() + BOOT_DEADLINE_S
        while health is None:
            if qemu.poll() is not None:
                pytest.fail(f"QEMU exited ({qemu.returncode}): {qemu.stderr and qemu.stderr.read()}"
                            f"\n{console_text(serial)[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from the daemon in the guest after {BOOT_DEADLINE_S} s:\n"
                            f"{console_text(serial)[-3000:]}")  # fmt: skip
            health = get_health(port, kit.directory / "ca" / "ca.crt", "rack-1")
            if health is None:
                time.sleep(2)  # polling a condition with a deadline, not synchronising on time
        boot_s = time.monotonic() - t1
        assert health["rack"] == "rack-1"
        assert health["site"] == "default"
        # Type=notify: systemd prints "Started" only after the daemon said READY=1;
        # the daemon says so on the console too (systemd's line can be missing there
        # when the daemon's own lines reach the console at the same moment).
        deadline = time.monotonic() + 120
        while not any(
            line in console_text(serial)
            for line in ("Started meshcloud.service", "told systemd the daemon is ready")
        ):
            assert time.monotonic() < deadline, console_text(serial)[-3000:]
            time.sleep(1)
        log = console_text(serial)
        assert "Finished meshcloud-identity.service" in log
        print(f"image build {build_s:.0f} s, boot to API answer {boot_s:.0f} s")
    finally:
        qemu.terminate()
        try:
            qemu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
