"""The roles and the rack image agree: same packages, same places (fast, no root)."""

from __future__ import annotations

from pathlib import Path

import yaml

from meshcloud.images.rackos import RECIPE_DIR, VENV, read_package_list

ROLES = Path(__file__).resolve().parents[3] / "ansible" / "roles"


def defaults(role: str) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    return data


def test_the_host_role_installs_only_packages_the_rack_image_has() -> None:
    image = set(read_package_list((RECIPE_DIR / "packages.txt").read_text()))
    wanted = defaults("meshcloud_host")["meshcloud_host_packages"]
    assert isinstance(wanted, list)
    assert sorted(set(wanted) - image) == []


def test_the_daemon_lives_where_the_images_unit_runs_it() -> None:
    assert defaults("meshcloud_daemon")["meshcloud_venv"] == VENV
    unit = (RECIPE_DIR / "overlay/etc/systemd/system/meshcloud.service").read_text()
    assert f"ExecStart={VENV}/bin/python " in unit
    assert "/etc/meshcloud/daemon.yaml" in unit
    assert defaults("meshcloud_daemon")["meshcloud_config_dir"] == "/etc/meshcloud"


def test_every_role_has_the_usual_layout() -> None:
    for role in ("meshcloud_common", "meshcloud_host", "meshcloud_network", "meshcloud_daemon"):
        for part in ("tasks", "defaults", "meta"):
            assert (ROLES / role / part / "main.yml").is_file(), (role, part)
