"""Link specs: ``"delay=50ms loss=1% rate=20mbit"`` parsed into numbers, and the commands that apply them.

A spec shapes what a rack *receives* on its mesh link: a packet between two
racks crosses the spec of the receiving rack once, so with the same spec on
every rack ``delay=50ms`` gives a one-way delay of 50 ms and a round trip of
100 ms.

User text is parsed strictly into a :class:`LinkSpec` (numbers and fixed
units); only the canonical numbers ever reach a command line.

Two backends apply a spec inside the rack's namespace:

- ``netem``: one ``tc netem`` qdisc on the rack's IFB device, when the kernel
  has ``sch_netem``;
- ``nfqueue``: for kernels without it (such as this project's CI machine):
  rate with a ``tbf`` qdisc on the IFB device, loss with an iptables
  ``statistic`` rule and delay with an NFQUEUE rule in PREROUTING, served by
  :mod:`meshcloud.lab.shaper` (a small userspace process that holds each
  packet for the delay).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshcloud.core.errors import InvalidInput

MAX_DELAY_MS = 10_000.0
MIN_RATE_KBIT = 8
MAX_RATE_KBIT = 100_000_000
SHAPER_QUEUE = 0
IPTABLES_CHAIN = "MCLAB"

_TOKEN_RE = re.compile(r"^(delay|loss|rate)=([0-9]+(?:\.[0-9]+)?)([a-z%]*)$")
_DELAY_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_RATE_UNITS = {"kbit": 1, "mbit": 1000, "gbit": 1_000_000}
_CLEAR_WORDS = ("", "clear", "none", "off")


@dataclass(frozen=True)
class LinkSpec:
    """A link's shaping: one-way delay added to sent packets, loss, and a rate cap."""

    delay_ms: float = 0.0
    loss_pct: float = 0.0
    rate_kbit: int | None = None

    @property
    def is_clear(self) -> bool:
        """True when the spec shapes nothing (a plain link)."""
        return self.delay_ms == 0 and self.loss_pct == 0 and self.rate_kbit is None

    def __str__(self) -> str:
        parts = []
        if self.delay_ms:
            parts.append(f"delay={_num(self.delay_ms)}ms")
        if self.loss_pct:
            parts.append(f"loss={_num(self.loss_pct)}%")
        if self.rate_kbit is not None:
            if self.rate_kbit % 1000 == 0:
                parts.append(f"rate={self.rate_kbit // 1000}mbit")
            else:
                parts.append(f"rate={self.rate_kbit}kbit")
        return " ".join(parts)


CLEAR = LinkSpec()


def _num(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def parse_link_spec(text: str | LinkSpec | None) -> LinkSpec:
    """Parse ``"delay=50ms loss=1% rate=20mbit"`` (any subset, any order) into a LinkSpec.

    ``""``, ``"clear"``, ``"none"`` and ``"off"`` mean a plain link. Raises
    InvalidInput naming the offending token.
    """
    if text is None:
        return CLEAR
    if isinstance(text, LinkSpec):
        return text
    if not isinstance(text, str):
        raise InvalidInput(f"link spec must be a string, not {type(text).__name__}")
    if len(text) > 200:
        raise InvalidInput("link spec is too long (at most 200 characters)")
    if text.strip().lower() in _CLEAR_WORDS:
        return CLEAR
    seen: dict[str, float] = {}
    for token in text.split():
        match = _TOKEN_RE.match(token)
        if match is None:
            raise InvalidInput(
                f"link spec token {token[:40]!r} is not understood: use delay=<n>ms|s|us,"
                " loss=<n>%, rate=<n>kbit|mbit|gbit, for example 'delay=50ms loss=1% rate=20mbit'"
            )
        key, number, unit = match.groups()
        if key in seen:
            raise InvalidInput(f"link spec sets {key} twice")
        value = float(number)
        if key == "delay":
            if unit not in _DELAY_UNITS:
                raise InvalidInput(f"delay {token!r} needs a unit: us, ms or s (e.g. delay=50ms)")
            value *= _DELAY_UNITS[unit]
            if value > MAX_DELAY_MS:
                raise InvalidInput(f"delay {token!r} exceeds {MAX_DELAY_MS / 1000:g} s")
        elif key == "loss":
            if unit != "%":
                raise InvalidInput(f"loss {token!r} must be a percentage (e.g. loss=1%)")
            if value > 100:
                raise InvalidInput(f"loss {token!r} exceeds 100%")
        else:
            if unit not in _RATE_UNITS:
                raise InvalidInput(
                    f"rate {token!r} needs a unit: kbit, mbit or gbit (e.g. rate=20mbit)"
                )
            value *= _RATE_UNITS[unit]
            if not MIN_RATE_KBIT <= value <= MAX_RATE_KBIT:
                raise InvalidInput(
                    f"rate {token!r} must be between {MIN_RATE_KBIT} kbit and"
                    f" {MAX_RATE_KBIT // 1_000_000} gbit"
                )
        seen[key] = value
    rate = seen.get("rate")
    return LinkSpec(
        delay_ms=round(seen.get("delay", 0.0), 3),
        loss_pct=round(seen.get("loss", 0.0), 4),
        rate_kbit=None if rate is None else round(rate),
    )


# -- commands ----------------------------------------------------------------
# All shaping acts on what the rack *receives*: the rack's mesh interface
# redirects its ingress to an IFB device (rate, or everything with netem), and
# the nfqueue backend delays and drops in PREROUTING. Shaping the receiving
# side keeps the sender's TCP small-queue accounting out of the way (a packet
# held on the sending side stays charged to its socket and throttles TCP to a
# few packets per round trip).


def ingress_redirect_argvs(dev: str, ifb: str) -> list[list[str]]:
    """``tc`` argvs sending everything ``dev`` receives through ``ifb`` first."""
    return [
        ["tc", "qdisc", "replace", "dev", dev, "handle", "ffff:", "ingress"],
        ["tc", "filter", "replace", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1",
         "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb],
    ]  # fmt: skip


def netem_argv(ifb: str, spec: LinkSpec) -> list[str]:
    """``tc`` argv setting ``spec`` with one netem qdisc on ``ifb``."""
    argv = ["tc", "qdisc", "replace", "dev", ifb, "root", "netem", "limit", "10000"]
    if spec.delay_ms:
        argv += ["delay", f"{_num(spec.delay_ms)}ms"]
    if spec.loss_pct:
        argv += ["loss", f"{_num(spec.loss_pct)}%"]
    if spec.rate_kbit is not None:
        argv += ["rate", f"{spec.rate_kbit}kbit"]
    return argv


def tbf_argv(ifb: str, rate_kbit: int) -> list[str]:
    """``tc`` argv for a token bucket capping ``ifb`` at ``rate_kbit``."""
    bytes_per_s = rate_kbit * 1000 // 8
    burst = max(bytes_per_s // 50, 16 * 1514)  # 20 ms worth, at least a few full frames
    return ["tc", "qdisc", "replace", "dev", ifb, "root", "tbf", "rate", f"{rate_kbit}kbit",
            "burst", str(burst), "latency", "400ms"]  # fmt: skip


def tc_clear_argvs(dev: str, ifb: str) -> list[list[str]]:
    """``tc`` argvs removing the ingress redirect and the IFB qdisc (may fail harmlessly)."""
    return [
        ["tc", "qdisc", "del", "dev", dev, "handle", "ffff:", "ingress"],
        ["tc", "qdisc", "del", "dev", ifb, "root"],
    ]


IPTABLES = ("iptables", "ip6tables")


def iptables_reset_argvs(dev: str) -> list[tuple[list[str], bool]]:
    """(argv, must_succeed) pairs that leave an empty lab chain hooked to ``dev``'s PREROUTING."""
    argvs: list[tuple[list[str], bool]] = []
    for tool in IPTABLES:
        ipt = [tool, "-w", "5", "-t", "mangle"]
        argvs += [
            ([*ipt, "-N", IPTABLES_CHAIN], False),  # exists already after the first time
            ([*ipt, "-F", IPTABLES_CHAIN], True),
            ([*ipt, "-D", "PREROUTING", "-i", dev, "-j", IPTABLES_CHAIN], False),
            ([*ipt, "-A", "PREROUTING", "-i", dev, "-j", IPTABLES_CHAIN], True),
        ]
    return argvs


def iptables_rules_argvs(spec: LinkSpec) -> list[list[str]]:
    """argvs filling the lab chain (IPv4 and IPv6): random loss, then the delay queue."""
    argvs = []
    for tool in IPTABLES:
        ipt = [tool, "-w", "5", "-t", "mangle", "-A", IPTABLES_CHAIN]
        if spec.loss_pct:
            argvs.append([*ipt, "-m", "statistic", "--mode", "random", "--probability",
                          f"{spec.loss_pct / 100:.6f}", "-j", "DROP"])  # fmt: skip
        if spec.delay_ms:
            argvs.append(
                [*ipt, "-j", "NFQUEUE", "--queue-num", str(SHAPER_QUEUE), "--queue-bypass"]
            )
    return argvs


def shaper_argv(python: str, netns: str, spec: LinkSpec) -> list[str]:
    """argv of the userspace delay process serving the rack's queue."""
    return [python, "-m", "meshcloud.lab.shaper", "--netns", netns,
            "--queue", str(SHAPER_QUEUE), "--delay-ms", _num(spec.delay_ms)]  # fmt: skip
