"""An appliance's cycle interval stretches on a slow link and comes back on a fast one."""

from meshcloud.replication.engine import EngineSettings, next_interval


def test_fixed_unless_a_maximum_is_set() -> None:
    fixed = EngineSettings(interval_s=2.0)
    assert next_interval(fixed, 2.0, push_s=10.0) == 2.0
    assert next_interval(fixed, 2.0, push_s=0.0) == 2.0


def test_doubles_while_the_link_is_busy_more_than_half_the_time() -> None:
    s = EngineSettings(interval_s=2.0, max_interval_s=10.0)
    assert next_interval(s, 2.0, push_s=1.5) == 4.0
    assert next_interval(s, 4.0, push_s=2.5) == 8.0
    assert next_interval(s, 8.0, push_s=5.0) == 10.0  # capped
    assert next_interval(s, 10.0, push_s=9.0) == 10.0


def test_stays_between_a_quarter_and_a_half_busy_then_halves_back() -> None:
    s = EngineSettings(interval_s=2.0, max_interval_s=16.0)
    assert next_interval(s, 8.0, push_s=3.0) == 8.0
    assert next_interval(s, 8.0, push_s=1.0) == 4.0
    assert next_interval(s, 4.0, push_s=0.2) == 2.0
    assert next_interval(s, 2.0, push_s=0.1) == 2.0  # never below interval_s


def test_a_fast_link_keeps_the_short_interval() -> None:
    s = EngineSettings(interval_s=2.0, max_interval_s=16.0)
    assert next_interval(s, 2.0, push_s=0.6) == 2.0
