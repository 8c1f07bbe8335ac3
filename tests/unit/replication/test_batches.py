"""How pending generations are grouped into rsync runs."""

from meshcloud.replication.source import batch_generations


def test_one_run_while_they_fit() -> None:
    sizes = {g: 10 for g in range(1, 6)}
    assert batch_generations([1, 2, 3, 4, 5], sizes, 100) == [[1, 2, 3, 4, 5]]


def test_split_in_order_at_the_byte_limit() -> None:
    sizes = {1: 40, 2: 40, 3: 40, 4: 10}
    assert batch_generations([1, 2, 3, 4], sizes, 100) == [[1, 2], [3, 4]]


def test_a_generation_larger_than_the_limit_goes_alone() -> None:
    sizes = {1: 5, 2: 500, 3: 5}
    assert batch_generations([1, 2, 3], sizes, 100) == [[1], [2], [3]]


def test_count_limit_and_nothing_pending() -> None:
    sizes = {g: 0 for g in range(10)}
    assert batch_generations(list(range(10)), sizes, 100, max_count=4) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert batch_generations([], {}, 100) == []
