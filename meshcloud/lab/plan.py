"""The lab's plan: names, addresses, partitions and config files, as pure functions.

Nothing here touches the system; :mod:`meshcloud.lab.lab` turns the plan into
namespaces, links and processes.

IP plan (every lab has its own bridge namespace, so labs may overlap)::

    10.77.0.0/24        the lab's mesh (one L2 segment, the lab bridge)
    10.77.0.N           rack rN (N = 1..250) on its interface ``mesh0``
    10.77.0.254         the observer: the lab bridge's own address, in the
                        bridge namespace; it reaches every live rack and is
                        never partitioned (probes, checkers, tests); it
                        forwards nothing. Racks have no default route.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name

PREFIX = "mcl"
LAB_NAME_MAX = 20
MAX_RACKS = 250
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
OBSERVER_IP = "10.77.0.254"
RACK_IFNAME = "mesh0"
IFB_IFNAME = "ifb0"
BRIDGE_IFNAME = "labbr0"
APPLIANCE_BRIDGE = "mcbr0"
PARTITION_TABLE = "mcl_partition"
API_PORT = 8440
RAFT_PORT = 7440
SSH_PORT = 22
DEFAULT_SITE = "default"

_RACK_RE = re.compile(r"^r([1-9][0-9]{0,2})$")
_PLACEHOLDER_RE = re.compile(r"\{([a-z_]*)\}")
PLACEHOLDERS = ("config", "rack", "ip", "state_dir", "lab", "rack_dir")


def check_lab_name(name: str) -> str:
    """Return ``name`` if it is a valid lab name (a short meshcloud name), else raise."""
    validate_name("lab", name)
    if len(name) > LAB_NAME_MAX:
        raise InvalidInput(f"lab name {name!r} is too long: at most {LAB_NAME_MAX} characters")
    return name


def rack_name(index: int) -> str:
    """The name of the rack with 1-based ``index``: ``r1``, ``r2``, ..."""
    if not 1 <= index <= MAX_RACKS:
        raise InvalidInput(f"rack index {index} is out of range 1..{MAX_RACKS}")
    return f"r{index}"


def rack_index(name: str) -> int:
    """The 1-based index of rack ``name`` (``r3`` -> 3); raises on anything else."""
    validate_name("rack", name)
    match = _RACK_RE.match(name)
    if match is None or int(match.group(1)) > MAX_RACKS:
        raise InvalidInput(f"rack name {name!r} is not a lab rack: lab racks are r1..r{MAX_RACKS}")
    return int(match.group(1))


def rack_ip(index: int) -> str:
    """The lab address of rack ``index``."""
    rack_name(index)  # range check
    return str(SUBNET.network_address + index)


def rack_mac(index: int) -> str:
    """A fixed MAC for rack ``index``'s mesh0: it survives restarts, like a real NIC's."""
    rack_name(index)
    return f"02:6d:63:00:00:{index:02x}"


def bridge_netns(lab: str) -> str:
    """The namespace holding the lab bridge (and the observer address)."""
    return f"{PREFIX}-{lab}-net"


def rack_netns(lab: str, rack: str) -> str:
    """The namespace of ``rack`` in ``lab``."""
    return f"{PREFIX}-{lab}-{rack}"


def rack_port(rack: str) -> str:
    """The bridge-side end of ``rack``'s veth, in the bridge namespace."""
    return f"veth-{rack}"


def netns_pattern(lab: str) -> re.Pattern[str]:
    """Matches exactly the namespaces ``lab`` creates (never those of another lab)."""
    return re.compile(rf"^{re.escape(PREFIX)}-{re.escape(lab)}-(net|r[1-9][0-9]{{0,2}})$")


def parse_sites(sites: str | Sequence[str] | None, racks: int) -> list[str]:
    """One validated site per rack, from ``"a,a,b,b,c"``, a list, one site for all, or None."""
    if sites is None or sites == "":
        return [DEFAULT_SITE] * racks
    items = sites.split(",") if isinstance(sites, str) else list(sites)
    items = [s.strip() for s in items]
    for site in items:
        validate_name("site", site)
    if len(items) == 1:
        return items * racks
    if len(items) != racks:
        raise InvalidInput(
            f"--sites lists {len(items)} sites for {racks} racks: give one per rack"
            " (for example a,a,b,b,c) or a single site for all"
        )
    return items


def parse_groups(groups: Iterable[str | Iterable[str]], racks: Sequence[str]) -> list[list[str]]:
    """Partition groups from ``["r1,r2", "r3"]`` (or lists of names).

    Every rack appears in at most one group; racks named in no group form one
    more group together, so ``["r3"]`` cuts r3 off from the rest. Raises
    InvalidInput unless at least two groups result.
    """
    known = set(racks)
    seen: set[str] = set()
    result: list[list[str]] = []
    for group in groups:
        names = group.split(",") if isinstance(group, str) else list(group)
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise InvalidInput("a partition group is empty: write groups like r1,r2 r3,r4,r5")
        for name in names:
            rack_index(name)
            if name not in known:
                raise InvalidInput(f"rack {name} is not in this lab (racks: {', '.join(racks)})")
            if name in seen:
                raise InvalidInput(f"rack {name} is in two partition groups")
            seen.add(name)
        result.append(names)
    rest = [r for r in racks if r not in seen]
    if rest:
        result.append(rest)
    if len(result) < 2:
        raise InvalidInput("a partition needs at least two groups (for example: r1,r2 r3,r4,r5)")
    return result


def partition_ruleset(groups: Sequence[Sequence[str]]) -> str:
    """An nft script that atomically replaces the lab's partition table with ``groups``.

    Bridge-family rules in the bridge namespace drop frames forwarded between
    ports of different groups (unicast, broadcast and multicast alike); the
    observer's own traffic is not forwarded, so it is never partitioned.
    """
    lines = [
        f"table bridge {PARTITION_TABLE} {{}}",
        f"delete table bridge {PARTITION_TABLE}",
        f"table bridge {PARTITION_TABLE} {{",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
    ]
    ports = [", ".join(f'"{rack_port(rack_name(rack_index(r)))}"' for r in g) for g in groups]
    for i, src in enumerate(ports):
        for j, dst in enumerate(ports):
            if i != j:
                lines.append(f"    iifname {{ {src} }} oifname {{ {dst} }} drop")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def heal_ruleset() -> str:
    """An nft script removing the partition table whether or not it exists."""
    return f"table bridge {PARTITION_TABLE} {{}}\ndelete table bridge {PARTITION_TABLE}\n"


def sshd_config(ip: str, ssh_dir: Path, pid_file: Path, state_dir: Path | None = None) -> str:
    """The rack's sshd_config: its own host key, its lab address only, keys only.

    Keys are read from ``ssh_dir/authorized_keys`` (the lab's key) and, if
    ``state_dir`` is given, from ``state_dir/ssh/authorized_keys`` (keys the
    rack's own software installs, e.g. restricted replication keys).
    """
    key_files = [str(ssh_dir / "authorized_keys")]
    if state_dir is not None:
        key_files.append(str(state_dir / "ssh" / "authorized_keys"))
    return "\n".join(
        [
            "# written by meshcloud lab; one sshd per rack, inside the rack's namespace",
            f"ListenAddress {ip}:{SSH_PORT}",
            f"HostKey {ssh_dir / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {' '.join(key_files)}",
            f"PidFile {pid_file}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # lab state may live under /tmp in tests
            "X11Forwarding no",
            "PrintMotd no",
            "UseDNS no",
            "MaxStartups 100:30:200",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def daemon_config(
    *,
    rack: str,
    site: str,
    ip: str,
    secret_file: Path,
    bootstrap_expect: int,
    state_dir: Path,
    api_port: int = API_PORT,
    raft_port: int = RAFT_PORT,
    fencer_socket: Path | None = None,
    replication_key: Path | None = None,
    known_hosts: Path | None = None,
    replication_user: str = "root",
    power: dict[str, Any] | None = None,
    tls: tuple[Path, Path, Path] | None = None,
) -> dict[str, Any]:
    """The rack daemon's config as plain data (validated by meshcloud.config before writing).

    ``tls``: (certificate, key, CA) paths: the rack serves and calls HTTPS.
    """
    extra: dict[str, Any] = {}
    if power is not None:
        extra["power"] = power
    if tls is not None:
        cert, key, ca = tls
        extra["console"] = {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca)}
    if replication_key is not None and known_hosts is not None:
        extra["replication"] = {
            "ssh_key": str(replication_key),
            "known_hosts": str(known_hosts),
            "ssh_user": replication_user,
        }
    return {
        "rack": {"name": rack, "site": site},
        "cluster": {"secret_file": str(secret_file), "bootstrap_expect": bootstrap_expect},
        "network": {
            "bind_address": ip,
            "api_port": api_port,
            "raft_port": raft_port,
            "appliance_bridge": APPLIANCE_BRIDGE,
        },
        "state_dir": str(state_dir),
        "hypervisor": {"uri": f"qemu:///embed?root={state_dir / 'libvirt'}"},
        "watchdog": (
            {"mode": "fencer", "socket": str(fencer_socket)}
            if fencer_socket is not None
            else {"mode": "none"}
        ),
        **extra,
    }


def expand_argv(template: Sequence[str], values: dict[str, str]) -> list[str]:
    """Replace ``{config}``, ``{rack}``, ``{ip}``, ``{state_dir}``, ``{rack_dir}``, ``{lab}``.

    Each argv element is expanded on its own (no shell, no splitting); an
    unknown placeholder raises InvalidInput.
    """

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in PLACEHOLDERS or key not in values:
            raise InvalidInput(
                f"unknown placeholder {{{key}}} in the daemon command;"
                f" known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        return values[key]

    if not template:
        raise InvalidInput("the daemon command is empty")
    return [_PLACEHOLDER_RE.sub(sub, part) for part in template]


# -- power: a UPS per rack (NUT's dummy-ups driver and upsd, inside the rack) -----------

NUT_UPS = "ups"
NUT_ADDRESS = "127.0.0.1"  # upsd listens on the rack namespace's own loopback
NUT_PORT = 3493
NUT_DRIVER = "/lib/nut/dummy-ups"  # Debian's nut-server
NUT_UPSD = "/lib/nut/upsd"  # the real upsd (/usr/sbin/upsd is a wrapper reading nut.conf)
LAB_POWER_POLL_S = 1.0
_UPS_FLAG_RE = re.compile(r"^[A-Z]{1,12}$")


def ups_dev(status: str, charge_pct: float = 100.0, runtime_s: float = 3600.0) -> str:
    """The dummy-ups ``.dev`` file for a UPS state, e.g. ``ups_dev("OB LB", 5, 120)``."""
    flags = status.split()
    if not flags or not all(_UPS_FLAG_RE.match(f) for f in flags):
        raise InvalidInput(f"UPS status {status!r:.40} must be flags like OL, OB, LB, CHRG")
    for key, value, high in (("charge_pct", charge_pct, 100.0), ("runtime_s", runtime_s, 1e7)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
            raise InvalidInput(f"UPS {key} ({value!r}) must be a number between 0 and {high:g}")
    return (
        f"ups.status: {' '.join(flags)}\n"
        f"battery.charge: {charge_pct:g}\n"
        f"battery.runtime: {runtime_s:g}\n"
    )


def nut_files() -> dict[str, str]:
    """The rack's NUT config files (NUT_CONFPATH): one dummy UPS, upsd on loopback."""
    return {
        "ups.conf": (
            "# written by meshcloud lab: the rack's UPS is NUT's dummy-ups driver reading\n"
            "# ups.dev; `meshcloud lab ups` (Lab.set_ups) rewrites it\n"
            f'[{NUT_UPS}]\n  driver = dummy-ups\n  port = ups.dev\n  desc = "lab UPS"\n'
        ),
        "upsd.conf": f"LISTEN {NUT_ADDRESS} {NUT_PORT}\nMAXAGE 15\n",
        "upsd.users": "# nobody: the rack only reads variables\n",
        "ups.dev": ups_dev("OL CHRG", 100.0, 3600.0),
    }


def nut_services(nut_dir: Path, run_dir: Path) -> dict[str, list[str]]:
    """argv of the rack's UPS driver and upsd (foreground, as root, config from ``nut_dir``)."""
    env = [
        "/usr/bin/env",
        f"NUT_CONFPATH={nut_dir}",
        f"NUT_STATEPATH={run_dir}",
        f"NUT_ALTPIDPATH={run_dir}",
    ]
    return {
        "nut-driver": [*env, NUT_DRIVER, "-a", NUT_UPS, "-u", "root", "-F"],
        "nut-upsd": [*env, NUT_UPSD, "-u", "root", "-F"],
    }


def nut_power_config(evacuate_below_s: float = 600.0) -> dict[str, Any]:
    """The daemon's ``power`` section for a lab rack with a UPS."""
    return {
        "source": "nut",
        "nut_host": NUT_ADDRESS,
        "nut_port": NUT_PORT,
        "nut_ups": NUT_UPS,
        "poll_s": LAB_POWER_POLL_S,
        "evacuate_below_s": evacuate_below_s,
    }
