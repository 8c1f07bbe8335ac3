from hypothesis import given
from hypothesis import strategies as st

from meshcloud.core.leases import Leadership, LeaseTimers, OwnLease, next_leadership
from meshcloud.core.models import Lease

T = LeaseTimers(renew_s=0.5, lease_s=3.0, margin_s=2.0)


def test_own_lease_counts_from_issue_time_and_never_goes_back() -> None:
    lease = OwnLease().committed(10.0)
    assert lease.held(12.9, T.lease_s)
    assert not lease.held(13.0, T.lease_s)
    # a late acknowledgement of an older renewal extends nothing
    assert lease.committed(9.0) is lease
    assert lease.committed(11.0).expires_at(T.lease_s) == 14.0


def test_no_lease_before_first_renewal() -> None:
    assert not OwnLease().held(0.0, T.lease_s)
    assert OwnLease().expires_at(T.lease_s) is None


def test_leader_counts_only_its_own_receipts_of_this_term() -> None:
    office = Leadership("r1", term=7, took_office_at=100.0)
    mine = Lease("r2", issued_at=5.0, received_at=103.0, leader="r1", term=7)
    old_term = Lease("r2", issued_at=5.0, received_at=150.0, leader="r1", term=6)
    other = Lease("r2", issued_at=5.0, received_at=150.0, leader="r3", term=7)
    assert office.last_heard(mine) == 103.0
    assert office.last_heard(old_term) == 100.0
    assert office.last_heard(other) == 100.0
    assert office.last_heard(None) == 100.0


def test_new_leader_treats_every_lease_as_renewed_when_it_took_office() -> None:
    office = Leadership("r1", term=3, took_office_at=50.0)
    racks = frozenset({"r1", "r2", "r3"})
    assert office.alive(racks, {}, 50.0 + T.lost_after_s, T) == racks
    assert office.alive(racks, {}, 50.0 + T.lost_after_s + 0.01, T) == frozenset()


def test_leadership_tracking() -> None:
    first = next_leadership(None, "r1", "r1", 4, 10.0)
    assert first == Leadership("r1", 4, 10.0)
    assert next_leadership(first, "r1", "r1", 4, 20.0) is first
    assert next_leadership(first, "r1", "r1", 5, 20.0) == Leadership("r1", 5, 20.0)
    assert next_leadership(first, "r1", "r2", 5, 20.0) is None


@given(
    issue=st.floats(0, 1e6),
    transit=st.floats(0, 10),
    office_delay=st.floats(-20, 20),
    probe=st.floats(0, 100),
)
def test_leader_never_declares_loss_before_the_rack_fenced(
    issue: float, transit: float, office_delay: float, probe: float
) -> None:
    """Same clock rate, any transit delay and office start: loss is declared after expiry."""
    received = issue + transit
    took_office = min(received, issue + office_delay) if office_delay < 0 else issue + office_delay
    took_office = max(took_office, 0.0)
    office = Leadership("r1", 2, took_office)
    lease = Lease("r2", issue, received, "r1", 2) if received >= took_office else None
    rack = OwnLease().committed(issue)
    now = issue + probe
    declared_lost = "r2" not in office.alive(
        frozenset({"r2"}), {"r2": lease} if lease else {}, now, T
    )
    if declared_lost:
        # the rack has fenced itself at least margin_s earlier
        assert not rack.held(now - T.margin_s, T.lease_s)
