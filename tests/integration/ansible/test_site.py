"""ansible/site.yml applied to a fresh Debian 12 root through a chroot connection, twice.

The root is the rack image's cached Debian base layer (``build_base``: built
once with mmdebstrap, then reused from ``MESHCLOUD_IMAGE_CACHE``), unpacked
into the test's directory: a stock Debian with libvirt/QEMU, rsync and ssh
and without meshcloud. Nothing is downloaded when the caches are warm: the
packages the roles want are already in the base, so apt never runs; the
daemon comes from ``meshcloud image wheels``. No service starts in a chroot;
the play enables units and skips starting them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from argon2 import PasswordHasher
from click.testing import CliRunner

from meshcloud.cli import main
from meshcloud.images.kit import create_kit, load_kit, plan_kit
from meshcloud.images.rackos import DEFAULT_BUILD_DIR, build_base, tar_extract_argv

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(2400)]

CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
REPO = Path(__file__).resolve().parents[3]
ANSIBLE_DIR = REPO / "ansible"
IMAGE_UNIT = REPO / "rack-images/rack-os/overlay/etc/systemd/system/meshcloud.service"
RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                   r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)  # fmt: skip


@pytest.fixture
def debian_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh Debian 12 tree (the rack image's base layer), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot)")
    for tool in ("ansible-playbook", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (make bootstrap installs it)")
    DEFAULT_BUILD_DIR.mkdir(parents=True, exist_ok=True)
    _key, tarball = build_base(DEFAULT_BUILD_DIR, lambda line: print(line, flush=True))
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(tar_extract_argv(tarball, root), check=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks that reported a change in ansible-playbook's default output."""
    names, task = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed:") and task not in names:
            names.append(task)
    return names


def run_site(inventory: Path) -> tuple[dict[str, int], str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0")  # fmt: skip
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "site.yml"],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = proc.stdout + proc.stderr
    recap = RECAP.search(output)
    assert proc.returncode == 0 and recap, f"ansible-playbook failed:\n{output[-6000:]}"
    return {k: int(v) for k, v in recap.groupdict().items() if k != "host"}, output


def in_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=120)


def test_site_yml_makes_a_rack_and_a_second_run_changes_nothing(
    tmp_path: Path, debian_root: Path
) -> None:
    plan = plan_kit("relief", "rack-1,rack-2", sites="north,south")
    create_kit(plan, tmp_path / "kit", hasher=CHEAP_HASHER)
    kit = load_kit(tmp_path / "kit")
    wheels = tmp_path / "meshcloud-wheels.tar"
    result = CliRunner().invoke(main, ["image", "wheels", "--out", str(wheels)])
    assert result.exit_code == 0, result.output
    inventory = tmp_path / "hosts.yml"
    host_vars = {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(debian_root),
        "meshcloud_kit_dir": str(kit.directory),
        "meshcloud_wheelhouse": str(wheels),
        "meshcloud_mesh_interfaces": ["wlan0"],
        # batman-adv's files without batctl (not in the base layer: apt would need the network)
        "meshcloud_batman": True,
        "meshcloud_batman_packages": [],
        "meshcloud_config_overrides": {"replication": {"bwlimit_kbps": 2000}},
    }
    inventory.write_text(yaml.safe_dump({"racks": {"hosts": {"rack-1": host_vars}}}))

    first, output = run_site(inventory)
    assert first["failed"] == 0 and first["changed"] > 0, output[-4000:]

    # The daemon: a virtualenv that runs, checking the installed configuration.
    check = in_root(debian_root, "/opt/meshcloud/venv/bin/meshcloud", "config", "check",
                    "/etc/meshcloud/daemon.yaml")  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "valid (rack rack-1, site north, TLS with the kit's CA)" in check.stdout
    # Its configuration: the kit's, with the host's overrides merged in.
    etc = debian_root / "etc" / "meshcloud"
    installed = yaml.safe_load((etc / "daemon.yaml").read_text())
    from_kit = yaml.safe_load((kit.directory / "racks" / "rack-1" / "daemon.yaml").read_text())
    assert installed == {
        **from_kit,
        "replication": {
            "ssh_key": "/etc/meshcloud/ssh/replication_ed25519",
            "known_hosts": "/etc/meshcloud/ssh/known_hosts",
            "bwlimit_kbps": 2000,
        },
    }
    # Replication: the rack's own host key pinned at its mesh address.
    host_key = (debian_root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
    known_hosts = (etc / "ssh" / "known_hosts").read_text()
    assert f"10.44.0.11 {' '.join(host_key)}\n" in known_hosts
    for name, source, mode in [
        ("cluster-secret", "cluster-secret", 0o600),
        ("tls/ca.crt", "ca/ca.crt", 0o644),
        ("tls/rack.key", "racks/rack-1/rack.key", 0o600),
        ("ssh/replication_ed25519", "ssh/replication_ed25519", 0o600),
        ("users.json", "users.json", 0o600),
    ]:
        assert (etc / name).read_bytes() == (kit.directory / source).read_bytes(), name
        assert (etc / name).stat().st_mode & 0o777 == mode, name
    assert etc.stat().st_mode & 0o777 == 0o700
    # The unit: the rack image's own, less its identity partition; enabled, not started.
    unit = (debian_root / "etc/systemd/system/meshcloud.service").read_text()
    assert not re.search(r"(?m)^Requires=meshcloud-identity", unit)
    image_unit = IMAGE_UNIT.read_text().replace("Requires=meshcloud-identity.service\n", "")
    assert image_unit.strip() in unit
    for service in ("meshcloud.service", "libvirtd.service", "systemd-networkd.service"):
        enabled = in_root(debian_root, "systemctl", "is-enabled", service)
        assert enabled.stdout.strip() == "enabled", (service, enabled.stdout, enabled.stderr)
    # softdog, and the bridge on batman-adv on the mesh radio.
    assert (debian_root / "etc/modules-load.d/softdog.conf").read_text().count("softdog") >= 1
    network = debian_root / "etc/systemd/network"
    assert "Address=10.44.0.11/24" in (network / "20-meshcloud-bridge.network").read_text()
    assert "BatmanAdvanced=bat0" in (network / "21-meshcloud-mesh.network").read_text()
    assert "Bridge=mcbr0" in (network / "19-meshcloud-batman.network").read_text()

    second, output = run_site(inventory)
    assert second["failed"] == 0
    assert second["changed"] == 0, f"changed on the second run: {changed_tasks(output)}"
