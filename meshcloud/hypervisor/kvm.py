"""KVM or TCG: the decision (pure) and the probe that informs it (cached per boot).

``hypervisor.kvm`` is ``on``, ``off`` or ``auto``. With ``auto``, KVM is used
only if /dev/kvm can be opened *and* a real guest boots under it: some hosts
(nested virtualisation with missing CPU features, as on the development
machine) expose /dev/kvm but hang every Linux guest. The probe boots the
appliance kernel with ``rdinit=/bin/busybox -- poweroff -f`` under KVM and
waits for the kernel's "reboot: Power down" on the serial port, for at most
PROBE_TIMEOUT_S. Its verdict is cached in /run/meshcloud/kvm-probe.json,
keyed by the boot id and the QEMU binary, so it runs once per host boot.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from meshcloud.core.errors import ConfigError, HypervisorError
from meshcloud.hypervisor.domain_xml import Accel, check_path

KVM_DEVICE = Path("/dev/kvm")
QEMU_BINARY = "qemu-system-x86_64"
PROBE_TIMEOUT_S = 20.0
PROBE_CACHE = Path("/run/meshcloud/kvm-probe.json")
POWER_DOWN_MARK = "reboot: Power down"
_SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class ProbeResult:
    """What the KVM probe found."""

    usable: bool
    detail: str


def decide_accel(setting: str, device_usable: bool, probe: ProbeResult | None) -> Accel:
    """KVM or TCG from the setting, /dev/kvm's state and the probe (None: not run).

    Raises ConfigError when ``on`` is asked for but KVM cannot work.
    """
    if setting not in _SETTINGS:
        raise ConfigError(f"hypervisor.kvm must be one of {', '.join(_SETTINGS)}, not {setting!r}")
    if setting == "off":
        return Accel.TCG
    if setting == "on":
        if not device_usable:
            raise ConfigError(
                f"hypervisor.kvm is 'on' but {KVM_DEVICE} cannot be opened:"
                " enable virtualisation in the firmware or set hypervisor.kvm to auto"
            )
        return Accel.KVM
    if not device_usable:
        return Accel.TCG
    if probe is None:
        raise HypervisorError("decide_accel: auto with a usable /dev/kvm needs a probe result")
    return Accel.KVM if probe.usable else Accel.TCG


def probe_argv(kernel: Path, initrd: Path, serial_log: Path, accel: Accel = Accel.KVM) -> list[str]:
    """argv of a QEMU that boots ``kernel`` and powers off at once (pure)."""
    for kind, path in (("kernel", kernel), ("initrd", initrd), ("serial log", serial_log)):
        check_path(kind, path)
    cmdline = "console=ttyS0 quiet panic=-1 rdinit=/bin/busybox -- poweroff -f"
    return [
        QEMU_BINARY, "-accel", accel.value, "-machine", "pc", "-m", "128", "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", f"file:{serial_log}",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip


def kvm_device_usable(device: Path = KVM_DEVICE) -> bool:
    """True when ``device`` exists and opens read-write."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def run_probe(kernel: Path, initrd: Path, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Boot ``kernel`` under KVM once; usable if it powered off within ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="mc-kvm-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        argv = probe_argv(kernel, initrd, log)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return ProbeResult(False, f"a KVM guest did not power off within {timeout_s:.0f} s")
        except FileNotFoundError:
            return ProbeResult(False, f"{QEMU_BINARY} is not installed")
        serial = log.read_text(errors="replace") if log.exists() else ""
        if POWER_DOWN_MARK in serial:
            return ProbeResult(True, "a KVM guest booted and powered off")
        return ProbeResult(
            False,
            f"KVM guest exited ({proc.returncode}) without powering off: {proc.stderr[-200:]}",
        )


def _cache_key() -> dict[str, str]:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    qemu = ""
    for d in os.environ.get("PATH", "/usr/bin").split(":"):
        candidate = Path(d) / QEMU_BINARY
        if candidate.exists():
            st = candidate.stat()
            qemu = f"{candidate}:{st.st_size}:{st.st_mtime_ns}"
            break
    return {"boot_id": boot_id, "qemu": qemu}


def cached_probe(
    kernel: Path, initrd: Path, cache: Path = PROBE_CACHE, timeout_s: float = PROBE_TIMEOUT_S
) -> ProbeResult:
    """The probe's verdict for this boot of this host, running it only when not cached."""
    key = _cache_key()
    try:
        data = json.loads(cache.read_text())
        if {k: data.get(k) for k in key} == key:
            return ProbeResult(bool(data["usable"]), str(data["detail"]) + " (cached)")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = run_probe(kernel, initrd, timeout_s)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({**key, "usable": result.usable, "detail": result.detail}))
        tmp.replace(cache)
    except OSError:
        pass  # no cache: the next start probes again
    return result


def choose_accel(
    setting: str, kernel: Path, initrd: Path, *, cache: Path = PROBE_CACHE
) -> tuple[Accel, str]:
    """KVM or TCG for this host, and one sentence saying why."""
    usable = kvm_device_usable()
    probe = cached_probe(kernel, initrd, cache) if setting == "auto" and usable else None
    accel = decide_accel(setting, usable, probe)
    if setting != "auto":
        why = f"hypervisor.kvm is {setting}"
    elif not usable:
        why = f"{KVM_DEVICE} cannot be opened"
    else:
        assert probe is not None
        why = probe.detail
    return accel, f"using {accel.value.upper()}: {why}"
