"""The KVM-or-TCG decision, as a table."""

from pathlib import Path

import pytest

from meshcloud.core.errors import ConfigError, HypervisorError
from meshcloud.hypervisor import kvm
from meshcloud.hypervisor.domain_xml import Accel

WORKS = kvm.ProbeResult(True, "booted")
HANGS = kvm.ProbeResult(False, "did not power off")


@pytest.mark.parametrize(
    ("setting", "device", "probe", "expected"),
    [
        ("off", True, None, Accel.TCG),
        ("off", False, None, Accel.TCG),
        ("on", True, None, Accel.KVM),
        ("on", True, HANGS, Accel.KVM),  # the operator insisted
        ("auto", False, None, Accel.TCG),
        ("auto", True, WORKS, Accel.KVM),
        ("auto", True, HANGS, Accel.TCG),  # /dev/kvm exists but guests hang: this machine
    ],
)
def test_decide_accel(
    setting: str, device: bool, probe: kvm.ProbeResult | None, expected: Accel
) -> None:
    assert kvm.decide_accel(setting, device, probe) is expected


def test_on_without_a_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"hypervisor\.kvm"):
        kvm.decide_accel("on", False, None)


def test_unknown_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="auto, on, off"):
        kvm.decide_accel("yes", True, WORKS)


def test_auto_with_a_device_needs_a_probe() -> None:
    with pytest.raises(HypervisorError):
        kvm.decide_accel("auto", True, None)


def test_probe_argv_boots_the_kernel_and_powers_off() -> None:
    argv = kvm.probe_argv(Path("/k/vmlinuz"), Path("/k/initrd"), Path("/tmp/x/serial.log"))
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "kvm"]
    assert "-no-reboot" in argv
    assert argv[argv.index("-serial") + 1] == "file:/tmp/x/serial.log"
    assert argv[argv.index("-append") + 1].endswith("rdinit=/bin/busybox -- poweroff -f")
    assert kvm.probe_argv(Path("/k"), Path("/i"), Path("/s"), Accel.TCG)[2] == "tcg"


def test_missing_device_is_not_usable(tmp_path: Path) -> None:
    assert not kvm.kvm_device_usable(tmp_path / "kvm")


def test_cached_verdict_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_probe(kernel: Path, initrd: Path, timeout_s: float) -> kvm.ProbeResult:
        calls.append(1)
        return HANGS

    monkeypatch.setattr(kvm, "run_probe", fake_probe)
    cache = tmp_path / "probe.json"
    first = kvm.cached_probe(Path("/k"), Path("/i"), cache)
    second = kvm.cached_probe(Path("/k"), Path("/i"), cache)
    assert not first.usable and not second.usable
    assert "(cached)" in second.detail
    assert len(calls) == 1
