"""The hardening module's own checks: version pin, configuration, crash-safe journal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObjConf
from pysyncobj.journal import FileJournal

from meshcloud.raft import hardening
from meshcloud.raft.hardening import (
    DurableJournal,
    RaftHardeningError,
    check_conf,
    check_pysyncobj_version,
)

GOOD: dict[str, Any] = {
    "password": "p" * 64,
    "autoTick": False,
    "commandsWaitLeader": False,
    "leaderFallbackTimeout": 1.0,
    "useFork": False,
    "fullDumpFile": "/tmp/dump",
}


def test_the_pinned_version_is_installed() -> None:
    assert check_pysyncobj_version() == "0.3.17"


def test_another_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening.metadata, "version", lambda name: "0.3.18")
    with pytest.raises(RaftHardeningError, match=r"0\.3\.18.*pysyncobj==0\.3\.17"):
        check_pysyncobj_version()


def test_a_safe_configuration_passes() -> None:
    check_conf(SyncObjConf(**GOOD), journal_path="/tmp/journal")


@pytest.mark.parametrize(
    ("change", "journal", "words"),
    [
        ({"password": None}, "/tmp/j", "password is not set"),
        ({"commandsWaitLeader": True}, "/tmp/j", "commandsWaitLeader"),
        ({"leaderFallbackTimeout": 30.0}, "/tmp/j", "leaderFallbackTimeout"),
        ({"autoTick": True}, "/tmp/j", "autoTick"),
        ({"useFork": True}, "/tmp/j", "useFork"),
        ({"journalFile": "/tmp/j"}, "/tmp/j", "journal_path"),
        ({"fullDumpFile": None}, "/tmp/j", "full-dump file"),  # defect (d)
        ({}, None, "full-dump file"),
    ],
)
def test_unsafe_configurations_are_refused(
    change: dict[str, Any], journal: str | None, words: str
) -> None:
    with pytest.raises(RaftHardeningError, match=words):
        check_conf(SyncObjConf(**{**GOOD, **change}), journal_path=journal)


def _fill(journal: FileJournal, count: int) -> None:
    for index in range(1, count + 1):
        journal.add(b"\x00cmd%d" % index, index, 1)


def _crash_after(monkeypatch: pytest.MonkeyPatch, adds: int) -> None:
    """Make FileJournal.add die after ``adds`` calls, as a kill mid-write would."""
    real = FileJournal.add
    calls = {"n": 0}

    def add(self: FileJournal, *entry: Any) -> None:
        calls["n"] += 1
        if calls["n"] > adds:
            raise KeyboardInterrupt("killed")
        real(self, *entry)

    monkeypatch.setattr(FileJournal, "add", add)


def test_stock_compaction_loses_the_journal_tail_when_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stock FileJournal rewrites itself in place: a kill leaves only the first entries."""
    path = str(tmp_path / "journal")
    journal = FileJournal(path)
    _fill(journal, 10)
    _crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        journal.deleteEntriesTo(2)
    monkeypatch.undo()
    journal._destroy()
    assert [e[1] for e in FileJournal(path)[:]] == [3, 4, 5]  # 6..10 are gone


def test_durable_journal_compaction_survives_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    _fill(journal, 10)
    _crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        journal.deleteEntriesTo(2)
    monkeypatch.undo()
    journal._destroy()
    assert [e[1] for e in FileJournal(path)[:]] == list(range(1, 11))  # untouched
    reopened = DurableJournal(path)
    reopened.deleteEntriesTo(2)
    reopened._destroy()
    assert [e[1] for e in FileJournal(path)[:]] == list(range(3, 11))
