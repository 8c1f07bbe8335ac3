"""The lab's network: the bridge namespace, rack namespaces, link shaping, partitions.

Layout (see docs/lab.md)::

    mcl-<lab>-net    labbr0 (10.77.0.254/24, the observer), veth-r1 .. veth-rN
    mcl-<lab>-rN     mesh0 (10.77.0.N/24, no default route) <-> veth-rN,
                     lo, mcbr0 (appliances), ifb0 (only while shaped)

Nothing is created in the root namespace: veth ends are born in their
namespaces.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence

from meshcloud.core.errors import MeshcloudError
from meshcloud.lab import linkspec, netns, plan
from meshcloud.lab.linkspec import LinkSpec

REQUIRED_TOOLS = ("ip", "tc", "nft", "iptables", "ip6tables", "sysctl")


class LabNetworkError(MeshcloudError):
    """The lab's network could not be set up as planned."""


def check_tools() -> None:
    """Raise when a tool the lab drives is not installed."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise LabNetworkError(
            f"the lab needs {', '.join(missing)}: install iproute2, nftables, iptables and procps"
            " (listed in scripts/debian-packages.txt; `make bootstrap` installs them)"
        )


def _sysctl(ns: str, *settings: str) -> None:
    netns.run(netns.in_netns(ns, ["sysctl", "-q", "-w", *settings]))


# What a real rack sets in rack-images/rack-os/overlay/etc/sysctl.d/60-meshcloud.conf
# (docs/replication.md, "TCP on slow links"). Both are per network namespace, and
# a new namespace starts from the host's values, so the lab sets them explicitly.
RACK_TCP_SYSCTLS = ("net.ipv4.tcp_congestion_control=bbr", "net.ipv4.tcp_slow_start_after_idle=0")


def set_rack_tcp(ns: str) -> bool:
    """BBR and no slow start after idle in a rack namespace, as on a real rack.

    False (and the kernel's defaults kept) when this kernel has no BBR.
    """
    proc = netns.run(netns.in_netns(ns, ["sysctl", "-q", "-w", *RACK_TCP_SYSCTLS]), check=False)
    return proc.returncode == 0


def create_bridge_netns(ns: str) -> None:
    """The lab's bridge namespace: ``labbr0`` up, multicast flooded, observer address."""
    netns.delete_netns(ns)
    netns.add_netns(ns)
    # The observer routes nothing: racks' traffic can only ever reach the lab.
    _sysctl(ns, "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
    netns.add_bridge(plan.BRIDGE_IFNAME, netns=ns)
    # No IGMP querier exists in the lab: snooping would stop multicast after
    # the membership timeout. Flood multicast to every port instead.
    netns.run(netns.ip("link", "set", plan.BRIDGE_IFNAME, "type", "bridge",
                       "mcast_snooping", "0", netns=ns))  # fmt: skip
    netns.add_address(plan.BRIDGE_IFNAME, f"{plan.OBSERVER_IP}/{plan.SUBNET.prefixlen}", ns)
    netns.run(netns.ip("route", "add", "224.0.0.0/4", "dev", plan.BRIDGE_IFNAME, netns=ns))


def detect_shaper_backend(ns: str) -> str:
    """``netem`` when the kernel has sch_netem, else ``nfqueue``; ``$MESHCLOUD_LAB_SHAPER`` wins."""
    forced = os.environ.get("MESHCLOUD_LAB_SHAPER", "")
    if forced in ("netem", "nfqueue"):
        return forced
    probe = netns.run(netns.tc("qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                               netns=ns), check=False)  # fmt: skip
    if probe.returncode == 0:
        netns.run(netns.tc("qdisc", "del", "dev", "lo", "root", netns=ns), check=False)
        return "netem"
    return "nfqueue"


def create_rack_netns(bridge_ns: str, ns: str, port: str, ip: str, mac: str) -> None:
    """A rack namespace wired to the lab bridge, with its address and appliance bridge."""
    netns.delete_netns(ns)
    netns.add_netns(ns)
    # IPv6 link-local addresses usable at once (no duplicate address detection).
    _sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
    set_rack_tcp(ns)
    netns.delete_link(port, bridge_ns)
    netns.add_veth_between(plan.RACK_IFNAME, ns, port, bridge_ns, a_address=mac)
    netns.set_master(port, plan.BRIDGE_IFNAME, netns=bridge_ns)
    netns.set_up(port, netns=bridge_ns)
    netns.add_address(plan.RACK_IFNAME, f"{ip}/{plan.SUBNET.prefixlen}", ns)
    netns.set_up(plan.RACK_IFNAME, netns=ns)
    netns.run(netns.ip("route", "add", "224.0.0.0/4", "dev", plan.RACK_IFNAME, netns=ns))
    # No default route: anything outside the lab (a DNS server, the internet)
    # fails at once with ENETUNREACH instead of timing out.
    netns.add_bridge(plan.APPLIANCE_BRIDGE, netns=ns)


def cut_link(bridge_ns: str, port: str) -> None:
    """Take the rack's bridge port down: from now on nothing it sends reaches anyone."""
    netns.set_up(port, netns=bridge_ns, up=False)


def destroy_rack_netns(bridge_ns: str, ns: str, port: str) -> None:
    """Remove the rack's veth and namespace (processes must be gone already)."""
    if netns.netns_exists(bridge_ns):
        netns.delete_link(port, bridge_ns)
    netns.delete_netns(ns)


# -- shaping -----------------------------------------------------------------


def _ensure_ifb(ns: str) -> None:
    if not netns.link_exists(plan.IFB_IFNAME, ns):
        netns.run(netns.ip("link", "add", plan.IFB_IFNAME, "type", "ifb", netns=ns))
    netns.set_up(plan.IFB_IFNAME, netns=ns)
    for argv in linkspec.ingress_redirect_argvs(plan.RACK_IFNAME, plan.IFB_IFNAME):
        netns.run(netns.tc(*argv[1:], netns=ns))


def clear_shaping(ns: str) -> None:
    """Remove every shaping rule from the rack (the shaper process is stopped by the caller)."""
    for argv in linkspec.tc_clear_argvs(plan.RACK_IFNAME, plan.IFB_IFNAME):
        netns.run(netns.tc(*argv[1:], netns=ns), check=False)
    for tool in linkspec.IPTABLES:
        netns.run(netns.in_netns(ns, [tool, "-w", "5", "-t", "mangle", "-F",
                                      linkspec.IPTABLES_CHAIN]), check=False)  # fmt: skip


def apply_shaping(ns: str, spec: LinkSpec, backend: str) -> bool:
    """Shape what the rack receives; True when a shaper process must serve the delay queue."""
    clear_shaping(ns)
    if spec.is_clear:
        return False
    if backend == "netem":
        _ensure_ifb(ns)
        netns.run(netns.tc(*linkspec.netem_argv(plan.IFB_IFNAME, spec)[1:], netns=ns))
        return False
    if spec.rate_kbit is not None:
        _ensure_ifb(ns)
        netns.run(netns.tc(*linkspec.tbf_argv(plan.IFB_IFNAME, spec.rate_kbit)[1:], netns=ns))
    if spec.loss_pct or spec.delay_ms:
        for argv, must in linkspec.iptables_reset_argvs(plan.RACK_IFNAME):
            netns.run(netns.in_netns(ns, argv), check=must)
        for argv in linkspec.iptables_rules_argvs(spec):
            netns.run(netns.in_netns(ns, argv))
    return bool(spec.delay_ms)


def shaper_queue_bound(ns: str) -> bool:
    """True when a process serves the rack's delay queue."""
    proc = netns.run(netns.in_netns(ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"]),
                     check=False)  # fmt: skip
    return any(
        line.split()[0] == str(linkspec.SHAPER_QUEUE)
        for line in proc.stdout.splitlines()
        if line.split()
    )


# -- partitions --------------------------------------------------------------


def apply_partition(bridge_ns: str, groups: Sequence[Sequence[str]]) -> None:
    netns.run(netns.in_netns(bridge_ns, ["nft", "-f", "-"]),
              input_text=plan.partition_ruleset(groups))  # fmt: skip


def heal(bridge_ns: str) -> None:
    netns.run(netns.in_netns(bridge_ns, ["nft", "-f", "-"]), input_text=plan.heal_ruleset())


# -- probes ------------------------------------------------------------------


def socket_in(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in namespace ``ns`` (the calling thread is moved there only to create it)."""
    with netns.thread_in_netns(ns):
        return socket.socket(family, kind)


def tcp_open(ns: str, ip: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection from ``ns`` to ip:port succeeds within ``timeout``."""
    sock = socket_in(ns)
    try:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()
