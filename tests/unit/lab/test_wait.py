import itertools

import pytest

from meshcloud.lab.wait import WaitTimeout, holds_for, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert (
        wait_for(lambda: next(counter) >= 3 and "done", 5.0, "three polls", interval=0.001)
        == "done"
    )


def test_wait_for_times_out_with_a_clear_message() -> None:
    with pytest.raises(WaitTimeout, match=r"timed out after 0.05 s waiting for godot \(still no\)"):
        wait_for(lambda: False, 0.05, "godot", interval=0.01, describe=lambda: "still no")
    with pytest.raises(TimeoutError):
        wait_for(lambda: None, 0.01, "nothing")


def test_holds_for() -> None:
    assert holds_for(lambda: True, 0.05, interval=0.01)
    counter = itertools.count()
    assert not holds_for(lambda: next(counter) < 2, 1.0, interval=0.001)
