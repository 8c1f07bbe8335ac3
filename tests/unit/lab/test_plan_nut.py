"""The lab's UPS plan: dummy-ups files, upsd argv, the daemon's power section."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcloud.config import parse_config
from meshcloud.core.errors import InvalidInput
from meshcloud.lab import plan
from meshcloud.power.source import reading_from_vars


def test_ups_dev_is_what_the_reader_understands() -> None:
    text = plan.ups_dev("OB DISCHRG LB", 7, 95)
    vars_ = dict(line.split(": ", 1) for line in text.splitlines())
    reading = reading_from_vars(vars_)
    assert (reading.on_battery, reading.low_battery) == (True, True)
    assert (reading.charge_pct, reading.runtime_s) == (7.0, 95.0)


@pytest.mark.parametrize(
    ("status", "charge", "runtime"),
    [("", 1, 1), ("OB\nups.status: OL", 1, 1), ("ob", 1, 1), ("OB", 101, 1), ("OB", 1, -1)],
)
def test_ups_dev_refuses_what_would_inject_or_lie(
    status: str, charge: float, runtime: float
) -> None:
    with pytest.raises(InvalidInput):
        plan.ups_dev(status, charge, runtime)


def test_nut_services_and_daemon_power_config(tmp_path: Path) -> None:
    services = plan.nut_services(tmp_path / "nut", tmp_path / "run")
    assert services["nut-driver"][-6:] == [plan.NUT_DRIVER, "-a", "ups", "-u", "root", "-F"]
    assert f"NUT_CONFPATH={tmp_path / 'nut'}" in services["nut-upsd"]
    assert "LISTEN 127.0.0.1 3493" in plan.nut_files()["upsd.conf"]
    data = plan.daemon_config(
        rack="r1", site="a", ip="10.77.0.1", secret_file=tmp_path / "s", bootstrap_expect=3,
        state_dir=tmp_path / "state", power=plan.nut_power_config(),
    )  # fmt: skip
    cfg = parse_config(data)
    assert (cfg.power.source, cfg.power.nut_port, cfg.power.poll_s) == ("nut", 3493, 1.0)
