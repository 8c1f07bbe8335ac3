import pytest

from meshcloud.lab import netns


def test_ip_builder_targets_the_namespace() -> None:
    assert netns.ip("link", "show", netns="mc-r1") == ["ip", "-n", "mc-r1", "link", "show"]
    assert netns.ip("link", "show") == ["ip", "link", "show"]


def test_in_netns_prefix() -> None:
    assert netns.in_netns("mc-r1", ["sshd", "-D"]) == ["ip", "netns", "exec", "mc-r1", "sshd", "-D"]
    assert netns.in_netns(None, ["true"]) == ["true"]


@pytest.mark.parametrize("bad", ["", "a" * 16, "a/b", "..", "a b", "a;b", "-x"])
def test_bad_interface_names_are_refused(bad: str) -> None:
    with pytest.raises(netns.NetnsError):
        netns.check_ifname(bad)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a b", "$x"])
def test_bad_namespace_names_are_refused(bad: str) -> None:
    with pytest.raises(netns.NetnsError):
        netns.check_netns(bad)


def test_veth_between_validates_the_mac_address() -> None:
    with pytest.raises(netns.NetnsError):
        netns.add_veth_between("mesh0", "mc-r1", "veth-r1", "mc-net", a_address="02:00:00:00:00")


def test_tc_builder_targets_the_namespace() -> None:
    assert netns.tc("qdisc", "show", netns="mc-r1") == ["tc", "-n", "mc-r1", "qdisc", "show"]
    assert netns.tc("qdisc") == ["tc", "qdisc"]
