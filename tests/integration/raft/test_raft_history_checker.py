"""The history checker itself, on hand-made histories."""

from __future__ import annotations

from history import History, Op, check


def test_the_checker_finds_each_kind_of_violation() -> None:
    history = History(
        [Op("a", "r1", 0, 1, "ok"), Op("b", "r1", 0, 1, "ok"), Op("c", "r2", 0, 1, "fail", "conflict"),
         Op("d", "r2", 0, 1, "unknown")]
    )  # fmt: skip
    assert check(history, {"r1": ["a", "b", "d"], "r2": ["a", "b", "d"]}) == []
    problems = check(history, {"r1": ["a", "c", "x", "a"], "r2": ["a"]})
    text = "\n".join(problems)
    for words in ("disagree", "applied twice", "nobody wrote", "missing", "refused by the state"):
        assert words in text, text
