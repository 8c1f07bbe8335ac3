"""Cluster formation: wait, found the cluster, or join one. Pure, no I/O.

Every rack runs :func:`decide` on what it knows: its own persisted
:class:`FormationStatus`, ``bootstrap_expect`` and the :class:`PeerReport`
of every peer it has admitted (a peer that proved it holds the cluster
secret). The rules, argued in docs/discovery.md:

* A rack that has ever been formed never founds again (:class:`AlreadyFormed`).
* A rack that sees any formed cluster joins it (:class:`Join`), even if it
  would otherwise be the founder.
* Otherwise the *view* of a rack is itself plus every rack it has admitted.
  The founding set is the ``bootstrap_expect`` lowest names of the view; its
  lowest name is the founder. The founder founds (:class:`Found`) only when
  every other rack of the founding set reports, unformed, the very same
  founding set. Everyone else waits (:class:`Wait`) and then joins.

Safety rests on three properties the discovery layer guarantees: a view
only grows while the rack is unformed; a report carries the sender's whole
view as it was when the report was built; and the switch to "formed" is
made in the same event-loop step as the decision to found, so no report
built afterwards says "unformed". Under these, two founding sets that share
a rack can never both be founded (argued in docs/discovery.md, checked by
property tests), so two clusters can only arise from two *disjoint* groups
of ``bootstrap_expect`` racks that do not see each other at bootstrap: a
network split, or twice ``bootstrap_expect`` racks powered on at once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name

MAX_MEMBERS = 256
MAX_CANDIDATES = 256
MAX_BOOTSTRAP_EXPECT = 64
MAX_FOUNDING_VOTERS = 5  # the largest voter group (core.state.ALLOWED_MAX_VOTERS)
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def validate_cluster_uuid(value: object) -> str:
    """Return ``value`` if it is a lowercase canonical UUID string, else raise InvalidInput."""
    if not isinstance(value, str) or not _UUID_RE.match(value):
        shown = repr(value)[:60]
        raise InvalidInput(
            f"cluster uuid {shown} is not a lowercase UUID like 0f8e...-...-...-...-............"
        )
    return value


def validate_port(what: str, value: object) -> int:
    """Return ``value`` if it is an int in 1..65535 (bool refused), else raise InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInput(f"{what} {value!r} must be an integer port between 1 and 65535")
    return value


def validate_address(what: str, value: object) -> str:
    """Return ``value`` if it is an IPv4 or IPv6 address in text form, else raise InvalidInput."""
    if not isinstance(value, str) or len(value) > 45:
        raise InvalidInput(f"{what} {value!r:.60} must be an IP address")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidInput(f"{what} {value!r:.60} is not an IP address") from None
    return value


@dataclass(frozen=True)
class Member:
    """A rack of a formed cluster, as far as peers know it: where to reach it."""

    name: str
    address: str
    raft_port: int
    api_port: int

    def __post_init__(self) -> None:
        validate_name("rack", self.name)
        validate_address(f"rack {self.name}: address", self.address)
        validate_port(f"rack {self.name}: raft_port", self.raft_port)
        validate_port(f"rack {self.name}: api_port", self.api_port)


@dataclass(frozen=True)
class FormationStatus:
    """A rack's own formation state: persisted by the daemon, reported to peers.

    ``formed`` is True once the rack has founded or joined a cluster, and it
    never goes back to False on that rack. ``leader`` is the rack it believes
    leads (a hint, may be stale), ``members`` the racks it knows in the cluster.
    ``founding`` names the cluster's founding voters, as the founder chose
    them when it founded (empty if it founded alone, or for a cluster formed
    before founding voters existed): a rack of that list that joins with no
    Raft state starts as a voter of that static group at once, instead of as
    a follower promoted later (docs/discovery.md, "Founding voters").
    """

    formed: bool = False
    cluster_uuid: str | None = None
    leader: str | None = None
    members: tuple[Member, ...] = ()
    founding: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.formed, bool):
            raise InvalidInput("formation status: formed must be true or false")
        if not self.formed:
            if (
                self.cluster_uuid is not None
                or self.leader is not None
                or self.members
                or self.founding
            ):
                raise InvalidInput(
                    "formation status: an unformed rack has no cluster uuid, leader or members"
                )
            return
        validate_cluster_uuid(self.cluster_uuid)
        if self.leader is not None:
            validate_name("leader rack", self.leader)
        _check_members(self.members, "members", "members", "member", MAX_MEMBERS)
        _check_members(
            self.founding, "founding", "founding voters", "founding voter", MAX_FOUNDING_VOTERS
        )


def _check_members(value: object, field: str, plural: str, singular: str, limit: int) -> None:
    """A tuple of at most ``limit`` Member with unique names, else InvalidInput."""
    if not isinstance(value, tuple) or not all(isinstance(m, Member) for m in value):
        raise InvalidInput(f"formation status: {field} must be a tuple of Member")
    if len(value) > limit:
        raise InvalidInput(f"formation status: at most {limit} {plural}")
    names = [m.name for m in value]
    if len(set(names)) != len(names):
        raise InvalidInput(f"formation status: {singular} names must be unique")


NOT_FORMED = FormationStatus()


@dataclass(frozen=True)
class PeerReport:
    """What an admitted peer told us about itself during admission.

    ``candidates`` is the peer's view: itself plus every rack it had admitted
    when it built the report.
    """

    name: str
    bootstrap_expect: int
    status: FormationStatus = NOT_FORMED
    candidates: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        validate_name("rack", self.name)
        if (
            isinstance(self.bootstrap_expect, bool)
            or not isinstance(self.bootstrap_expect, int)
            or not 1 <= self.bootstrap_expect <= MAX_BOOTSTRAP_EXPECT
        ):
            raise InvalidInput(
                f"rack {self.name}: bootstrap_expect {self.bootstrap_expect!r} must be an"
                f" integer between 1 and {MAX_BOOTSTRAP_EXPECT}"
            )
        if not isinstance(self.status, FormationStatus):
            raise InvalidInput(f"rack {self.name}: status must be a FormationStatus")
        if not isinstance(self.candidates, frozenset):
            raise InvalidInput(f"rack {self.name}: candidates must be a frozenset of names")
        if len(self.candidates) > MAX_CANDIDATES:
            raise InvalidInput(f"rack {self.name}: at most {MAX_CANDIDATES} candidates")
        for candidate in self.candidates:
            validate_name("candidate rack", candidate)
        if self.name not in self.candidates:
            raise InvalidInput(f"rack {self.name}: its candidates must include itself")


@dataclass(frozen=True)
class Wait:
    """Nothing to do yet; ``reason`` says what is missing."""

    reason: str


@dataclass(frozen=True)
class Found:
    """This rack founds cluster ``cluster_uuid`` now; the rest of ``founding_set`` joins it.

    ``cluster_uuid`` is the one the caller minted and passed to :func:`decide`.
    """

    reason: str
    founding_set: tuple[str, ...]
    cluster_uuid: str | None = None


@dataclass(frozen=True)
class Join:
    """Ask ``leader`` (or, failing it, another of ``members``) to add this rack."""

    reason: str
    cluster_uuid: str
    leader: str | None
    members: tuple[Member, ...]
    reported_by: tuple[str, ...]
    founding: tuple[Member, ...] = ()  # the cluster's founding voters, as reported

    def founding_voter(self, name: str) -> bool:
        """Whether rack ``name`` is one of the cluster's founding voters."""
        return any(m.name == name for m in self.founding)

    def contacts(self) -> tuple[str, ...]:
        """Member names in the order to ask: the believed leader first, then by name."""
        names = sorted(m.name for m in self.members)
        if self.leader is not None:
            return (self.leader, *(n for n in names if n != self.leader))
        return tuple(names)


@dataclass(frozen=True)
class AlreadyFormed:
    """This rack is already in a cluster; formation has nothing to do.

    ``conflicting_clusters`` lists other cluster uuids that peers report:
    that only happens after a split at bootstrap and needs an operator.
    """

    reason: str
    cluster_uuid: str
    conflicting_clusters: tuple[str, ...] = ()


Decision = Wait | Found | Join | AlreadyFormed


def founding_set(view: Iterable[str], bootstrap_expect: int) -> tuple[str, ...]:
    """The ``bootstrap_expect`` lowest names of ``view``, sorted (fewer if the view is smaller)."""
    return tuple(sorted(set(view))[:bootstrap_expect])


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed) if listed else "none"


def _choose_cluster(
    formed: Mapping[str, PeerReport],
) -> tuple[str, dict[str, list[PeerReport]]]:
    by_cluster: dict[str, list[PeerReport]] = {}
    for report in formed.values():
        assert report.status.cluster_uuid is not None
        by_cluster.setdefault(report.status.cluster_uuid, []).append(report)

    def size(uuid: str) -> int:
        names = {r.name for r in by_cluster[uuid]}
        for r in by_cluster[uuid]:
            names.update(m.name for m in r.status.members)
        return len(names)

    chosen = min(by_cluster, key=lambda uuid: (-size(uuid), uuid))
    return chosen, by_cluster


def _join(formed: Mapping[str, PeerReport]) -> Join:
    chosen, by_cluster = _choose_cluster(formed)
    reports = sorted(by_cluster[chosen], key=lambda r: r.name)
    members: dict[str, Member] = {}
    for report in reports:
        for member in report.status.members:
            members.setdefault(member.name, member)
    # The leader's own claim beats hearsay; then the most named leader; then the lowest name.
    self_claims = [r.name for r in reports if r.status.leader == r.name]
    if self_claims:
        leader: str | None = self_claims[0]
    else:
        votes: dict[str, int] = {}
        for report in reports:
            if report.status.leader is not None:
                votes[report.status.leader] = votes.get(report.status.leader, 0) + 1
        leader = min(votes, key=lambda n: (-votes[n], n)) if votes else None
    # The founding voters: every reporter that knows them got them from the founder.
    founding = next((r.status.founding for r in reports if r.status.founding), ())
    reporters = tuple(r.name for r in reports)
    reason = f"rack(s) {_names(reporters)} report the formed cluster {chosen}"
    reason += f"; asking {leader} to add this rack" if leader else "; its leader is not known yet"
    if len(by_cluster) > 1:
        others = sorted(u for u in by_cluster if u != chosen)
        reason += (
            f" (peers also report the cluster(s) {', '.join(others)}: two clusters were formed"
            " during a split at bootstrap; joining the one with the most known members;"
            " see docs/discovery.md)"
        )
    return Join(
        reason=reason,
        cluster_uuid=chosen,
        leader=leader,
        members=tuple(members[n] for n in sorted(members)),
        reported_by=reporters,
        founding=founding,
    )


def decide(
    self_name: str,
    self_status: FormationStatus,
    bootstrap_expect: int,
    peers: Mapping[str, PeerReport],
    new_cluster_uuid: str | None = None,
) -> Decision:
    """Decide what this rack does about cluster formation, with a one-sentence reason.

    ``peers`` maps the name of every admitted peer to its latest report.
    ``new_cluster_uuid`` (minted by the caller) names the cluster if this rack founds it.
    """
    validate_name("rack", self_name)
    if new_cluster_uuid is not None:
        validate_cluster_uuid(new_cluster_uuid)
    if not 1 <= bootstrap_expect <= MAX_BOOTSTRAP_EXPECT:
        raise InvalidInput(
            f"bootstrap_expect ({bootstrap_expect}) must be between 1 and {MAX_BOOTSTRAP_EXPECT}"
        )
    for key, report in peers.items():
        if key != report.name:
            raise InvalidInput(f"peer report for {key!r} carries the name {report.name!r}")
    peers = {name: report for name, report in peers.items() if name != self_name}

    if self_status.formed:
        assert self_status.cluster_uuid is not None
        own = self_status.cluster_uuid
        conflicts = tuple(
            sorted(
                {
                    r.status.cluster_uuid
                    for r in peers.values()
                    if r.status.cluster_uuid is not None and r.status.cluster_uuid != own
                }
            )
        )
        reason = f"this rack is a member of cluster {own}; nothing to form"
        if conflicts:
            reason += (
                f"; WARNING: peers report other cluster(s) {', '.join(conflicts)}, formed during"
                " a split at bootstrap; an operator must merge them (see docs/discovery.md)"
            )
        return AlreadyFormed(reason=reason, cluster_uuid=own, conflicting_clusters=conflicts)

    formed = {name: r for name, r in peers.items() if r.status.formed}
    if formed:
        return _join(formed)

    view = {self_name, *peers}
    chosen = founding_set(view, bootstrap_expect)
    if len(view) < bootstrap_expect:
        missing = bootstrap_expect - len(view)
        return Wait(
            f"found {len(view)} of {bootstrap_expect} racks ({_names(view)}); waiting for"
            f" {missing} more before forming the cluster (cluster.bootstrap_expect ="
            f" {bootstrap_expect})"
        )
    for name in chosen:
        if name == self_name:
            continue
        report = peers[name]
        if report.bootstrap_expect != bootstrap_expect:
            return Wait(
                f"rack {name} expects {report.bootstrap_expect} racks to form the cluster but"
                f" this rack expects {bootstrap_expect}: set cluster.bootstrap_expect to the same"
                " value on every rack"
            )
    founder = chosen[0]
    if founder != self_name:
        return Wait(
            f"waiting for {founder} to found the cluster (founding racks: {_names(chosen)})"
        )
    for name in chosen[1:]:
        theirs = founding_set(peers[name].candidates, bootstrap_expect)
        if theirs != chosen:
            unseen = sorted(set(chosen) - peers[name].candidates)
            detail = f"has not yet admitted {_names(unseen)}" if unseen else "sees lower names"
            return Wait(
                f"rack {name} names the founding racks {_names(theirs)}, not"
                f" {_names(chosen)} ({detail}); waiting for its view to settle"
            )
    if len(chosen) == 1:
        reason = (
            "cluster.bootstrap_expect is 1 and no peer reports a formed cluster:"
            " this rack founds the cluster alone"
        )
    else:
        reason = (
            f"all {len(chosen)} founding racks ({_names(chosen)}) agree and none reports a"
            " formed cluster; this rack has the lowest name and founds the cluster"
        )
    return Found(
        reason=reason,
        founding_set=chosen,
        cluster_uuid=new_cluster_uuid,
    )
