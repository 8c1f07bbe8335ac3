import pytest

from meshcloud.config import parse_config
from meshcloud.core.errors import InvalidInput
from meshcloud.lab import plan


def test_ip_plan() -> None:
    assert plan.rack_ip(1) == "10.77.0.1"
    assert plan.rack_ip(250) == "10.77.0.250"
    assert plan.OBSERVER_IP == "10.77.0.254"
    with pytest.raises(InvalidInput):
        plan.rack_ip(251)
    assert plan.rack_mac(10) == "02:6d:63:00:00:0a"


def test_names() -> None:
    assert plan.rack_name(3) == "r3"
    assert plan.rack_index("r12") == 12
    assert plan.rack_netns("demo", "r2") == "mcl-demo-r2"
    assert plan.bridge_netns("demo") == "mcl-demo-net"
    assert plan.rack_port("r7") == "veth-r7"
    assert len(plan.rack_port("r250")) <= 15


@pytest.mark.parametrize("bad", ["", "R1", "r0", "r01", "rack1", "r251", "r1;x", "r-1", "../r1"])
def test_bad_rack_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        plan.rack_index(bad)


@pytest.mark.parametrize("bad", ["", "Lab", "a b", "a/b", "x" * 21, "-a", "a--b", "lab;rm"])
def test_bad_lab_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        plan.check_lab_name(bad)


def test_netns_pattern_matches_only_its_own_lab() -> None:
    pattern = plan.netns_pattern("a")
    assert pattern.match("mcl-a-net") and pattern.match("mcl-a-r1") and pattern.match("mcl-a-r250")
    for other in ["mcl-a-b-r1", "mcl-a-r1-net", "mcl-ab-r1", "mcl-a-", "xmcl-a-r1", "mcl-a-r01"]:
        assert not pattern.match(other), other


def test_sites() -> None:
    assert plan.parse_sites("a,a,b,b,c", 5) == ["a", "a", "b", "b", "c"]
    assert plan.parse_sites("north", 3) == ["north"] * 3
    assert plan.parse_sites(None, 2) == ["default", "default"]
    with pytest.raises(InvalidInput, match="3 sites for 5 racks"):
        plan.parse_sites("a,b,c", 5)
    with pytest.raises(InvalidInput):
        plan.parse_sites("a,B", 2)


RACKS = ["r1", "r2", "r3", "r4", "r5"]


def test_groups_and_the_implicit_rest() -> None:
    assert plan.parse_groups(["r1,r2", "r3,r4,r5"], RACKS) == [["r1", "r2"], ["r3", "r4", "r5"]]
    assert plan.parse_groups(["r3"], RACKS) == [["r3"], ["r1", "r2", "r4", "r5"]]
    assert plan.parse_groups([["r1"], ["r2"]], RACKS) == [["r1"], ["r2"], ["r3", "r4", "r5"]]


@pytest.mark.parametrize(
    "groups",
    [["r1,r2", "r2,r3"], ["r1,r9"], ["r1,r2,r3,r4,r5"], [","], ["r1;r2"], []],
)
def test_bad_groups_are_refused(groups: list[str]) -> None:
    with pytest.raises(InvalidInput):
        plan.parse_groups(groups, RACKS)


def test_partition_ruleset_drops_between_groups_only() -> None:
    text = plan.partition_ruleset([["r1", "r2"], ["r3"]])
    rules = [line.strip() for line in text.splitlines() if "drop" in line]
    assert rules == [
        'iifname { "veth-r1", "veth-r2" } oifname { "veth-r3" } drop',
        'iifname { "veth-r3" } oifname { "veth-r1", "veth-r2" } drop',
    ]
    # Atomic replacement: create-if-missing, delete, recreate, in one nft transaction.
    assert text.startswith(f"table bridge {plan.PARTITION_TABLE} {{}}\ndelete table bridge")
    assert "table bridge" in plan.heal_ruleset() and "delete" in plan.heal_ruleset()


def test_sshd_config_listens_on_the_rack_address_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = plan.sshd_config("10.77.0.4", tmp_path, tmp_path / "sshd.pid")
    assert "ListenAddress 10.77.0.4:22" in text
    assert "PasswordAuthentication no" in text and "UsePAM no" in text
    assert f"HostKey {tmp_path}/ssh_host_ed25519_key" in text


def test_daemon_config_is_valid_for_the_schema(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = plan.daemon_config(rack="r2", site="b", ip="10.77.0.2", secret_file=tmp_path / "s",
                              bootstrap_expect=5, state_dir=tmp_path / "state")  # fmt: skip
    cfg = parse_config(data)
    assert cfg.network.bind_address == "10.77.0.2"
    assert cfg.hypervisor.uri == f"qemu:///embed?root={tmp_path}/state/libvirt"
    assert cfg.network.appliance_bridge == plan.APPLIANCE_BRIDGE
    assert cfg.cluster.bootstrap_expect == 5


def test_daemon_command_placeholders() -> None:
    values = {"config": "/c.yaml", "rack": "r1", "ip": "10.77.0.1"}
    assert plan.expand_argv(["d", "--config", "{config}", "--name={rack}@{ip}"], values) == [
        "d", "--config", "/c.yaml", "--name=r1@10.77.0.1",
    ]  # fmt: skip
    with pytest.raises(InvalidInput, match="unknown placeholder"):
        plan.expand_argv(["d", "{secret}"], values)
    # Only {identifier} is a placeholder; other braces pass through untouched (no str.format).
    assert plan.expand_argv(["{config.__class__}", '{"a": 1}'], values) == [
        "{config.__class__}",
        '{"a": 1}',
    ]
    with pytest.raises(InvalidInput):
        plan.expand_argv([], values)
    # Placeholders never split or join arguments: a value with spaces stays one argument.
    assert plan.expand_argv(["{config}"], {"config": "a b; c"}) == ["a b; c"]


def test_sshd_also_reads_keys_the_rack_installs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = plan.sshd_config("10.77.0.4", tmp_path / "ssh", tmp_path / "pid", tmp_path / "state")
    assert (
        f"AuthorizedKeysFile {tmp_path}/ssh/authorized_keys {tmp_path}/state/ssh/authorized_keys"
        in text
    )
