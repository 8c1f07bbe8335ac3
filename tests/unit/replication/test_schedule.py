import math

import pytest

from meshcloud.replication.manifest import GenerationRecord
from meshcloud.replication.schedule import (
    TransferItem,
    lag_percentiles,
    order_transfers,
    replication_lag_s,
)


def rec(gen: int, opened: float, frozen: float, data: int = 1) -> GenerationRecord:
    return GenerationRecord(gen, 1, opened, frozen, data)


HISTORY = [rec(1, 0, 2), rec(2, 2, 4), rec(3, 4, 6, data=0), rec(4, 6, 8, data=0), rec(5, 8, 10)]


@pytest.mark.parametrize(
    "replica_gen, now, lag",
    [
        (5, 11.0, 1.0),  # holds everything frozen: lag counts from the last freeze
        (2, 11.0, 11.0 - 8.0),  # 3 and 4 were empty: it holds every write before 8
        (1, 11.0, 11.0 - 2.0),
        (0, 11.0, 11.0),  # older than the history: counted from the oldest record
        (5, 9.0, 0.0),  # never negative
    ],
)
def test_lag_is_the_age_of_the_oldest_missing_write(replica_gen, now, lag) -> None:
    assert replication_lag_s(HISTORY, replica_gen, 5, now) == pytest.approx(lag)


def test_lag_without_history() -> None:
    assert replication_lag_s([], 0, 0, 5.0) == 0.0
    assert math.isinf(replication_lag_s([], 0, 3, 5.0))


def test_transfers_are_ordered_by_priority_then_lag() -> None:
    items = [
        TransferItem("tiles", "rack-2", 100, 30.0),
        TransferItem("voip", "rack-2", 900, 1.0),
        TransferItem("db", "rack-2", 900, 5.0),
        TransferItem("proxy", "rack-2", 100, 30.0),
    ]
    assert [i.appliance for i in order_transfers(items)] == ["db", "voip", "proxy", "tiles"]


def test_lag_percentiles() -> None:
    p = lag_percentiles([float(i) for i in range(1, 101)])
    assert p == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert lag_percentiles([])["p99"] == 0.0
