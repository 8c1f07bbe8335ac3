import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.lab import linkspec
from meshcloud.lab.linkspec import LinkSpec, parse_link_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("delay=50ms loss=1% rate=20mbit", LinkSpec(50.0, 1.0, 20_000)),
        ("rate=512kbit delay=1s", LinkSpec(1000.0, 0.0, 512)),
        ("delay=250us", LinkSpec(0.25, 0.0, None)),
        ("loss=0.5%", LinkSpec(0.0, 0.5, None)),
        ("rate=1gbit", LinkSpec(0.0, 0.0, 1_000_000)),
        ("  delay=10ms   loss=2% ", LinkSpec(10.0, 2.0, None)),
        ("", LinkSpec()),
        ("clear", LinkSpec()),
        ("none", LinkSpec()),
        (None, LinkSpec()),
    ],
)
def test_specs_parse_into_numbers(text: str | None, expected: LinkSpec) -> None:
    assert parse_link_spec(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "delay=50",  # no unit
        "delay=50m",
        "delay=11s",  # too long
        "loss=1",  # not a percentage
        "loss=101%",
        "rate=20",  # no unit
        "rate=1kbit",  # below the minimum
        "rate=20mbps",
        "jitter=5ms",  # unknown key
        "delay=50ms delay=60ms",  # twice
        "delay=-5ms",
        "delay=50ms;rm",
        "delay=50ms $(reboot)",
        "DELAY=50ms",
        "delay=1e3ms",
        "x" * 300,
    ],
)
def test_bad_specs_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        parse_link_spec(bad)


def test_canonical_text_round_trips() -> None:
    for text in ["delay=50ms loss=1% rate=20mbit", "delay=0.25ms", "rate=512kbit", "loss=0.5%"]:
        spec = parse_link_spec(text)
        assert str(spec) == text
        assert parse_link_spec(str(spec)) == spec
    assert str(LinkSpec()) == ""
    assert LinkSpec().is_clear and not parse_link_spec("loss=1%").is_clear


def test_netem_argv_uses_only_numbers() -> None:
    spec = parse_link_spec("delay=50ms loss=1% rate=20mbit")
    assert linkspec.netem_argv("ifb0", spec) == [
        "tc", "qdisc", "replace", "dev", "ifb0", "root", "netem", "limit", "10000",
        "delay", "50ms", "loss", "1%", "rate", "20000kbit",
    ]  # fmt: skip


def test_tbf_has_a_burst_of_at_least_a_few_frames() -> None:
    argv = linkspec.tbf_argv("ifb0", 1000)
    assert argv[:8] == ["tc", "qdisc", "replace", "dev", "ifb0", "root", "tbf", "rate"]
    assert int(argv[argv.index("burst") + 1]) >= 16 * 1514


def test_ingress_redirect_goes_through_the_ifb() -> None:
    qdisc, flt = linkspec.ingress_redirect_argvs("mesh0", "ifb0")
    assert qdisc[-2:] == ["ffff:", "ingress"]
    assert flt[-4:] == ["egress", "redirect", "dev", "ifb0"]


def test_iptables_rules_for_loss_and_delay_cover_ipv4_and_ipv6() -> None:
    argvs = linkspec.iptables_rules_argvs(parse_link_spec("delay=50ms loss=1%"))
    assert [a[0] for a in argvs] == ["iptables", "iptables", "ip6tables", "ip6tables"]
    assert "0.010000" in argvs[0] and "DROP" in argvs[0]
    assert argvs[1][-5:] == ["NFQUEUE", "--queue-num", "0", "--queue-bypass"][-5:] or (
        "NFQUEUE" in argvs[1] and "--queue-bypass" in argvs[1]
    )
    assert linkspec.iptables_rules_argvs(parse_link_spec("rate=1mbit")) == []


def test_iptables_chain_is_hooked_on_the_rack_interface() -> None:
    pairs = linkspec.iptables_reset_argvs("mesh0")
    hooks = [argv for argv, must in pairs if "-A" in argv]
    assert hooks and all(a[-4:] == ["-i", "mesh0", "-j", linkspec.IPTABLES_CHAIN] for a in hooks)
    assert all(argv[argv.index("-t") + 1] == "mangle" for argv, _ in pairs)


def test_shaper_argv() -> None:
    argv = linkspec.shaper_argv("/py", "mcl-x-r1", parse_link_spec("delay=50ms"))
    assert argv == ["/py", "-m", "meshcloud.lab.shaper", "--netns", "mcl-x-r1", "--queue", "0",
                    "--delay-ms", "50"]  # fmt: skip
