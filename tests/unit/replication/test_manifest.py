import pytest

from meshcloud.core.errors import Conflict, InvalidInput
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import (
    DiskDelta,
    GenerationRecord,
    Manifest,
    Role,
    generation_file,
    last_common_generation,
    parse_generation_file,
)

SHA = "sha1:" + "ab" * 20


def primary(epoch: int = 1) -> Manifest:
    return mf.new_manifest(
        "voip", Role.PRIMARY, epoch, {"data": 1 << 30, "root": 2 << 30}, active_opened_at=10.0
    )


def replica(epoch: int = 1) -> Manifest:
    return mf.new_manifest("voip", Role.REPLICA, epoch, {"data": 1 << 30, "root": 2 << 30})


def record(gen: int, epoch: int = 1, data: int = 4096) -> GenerationRecord:
    deltas = tuple(DiskDelta(d, generation_file(gen), 8192, SHA) for d in ("data", "root"))
    return GenerationRecord(gen, epoch, float(gen), float(gen) + 0.5, data, deltas)


def test_generation_file_names_round_trip() -> None:
    assert generation_file(7) == "g000000000007.qcow2"
    assert parse_generation_file("g000000000007.qcow2") == 7
    for bad in (
        "g7.qcow2",
        "x000000000007.qcow2",
        "g000000000007.qcow2.tmp",
        "../g000000000007.qcow2",
    ):
        assert parse_generation_file(bad) is None


def test_new_primary_has_bottom_and_active_overlay() -> None:
    m = primary()
    assert m.chain("data").files == (generation_file(0), generation_file(1))
    assert m.generation == 0 and m.lineage == ((1, 1),)
    assert replica().chain("root").files == (generation_file(0),)


def test_manifest_json_round_trip() -> None:
    m = mf.freeze_primary(primary(), 1, 12.0, 100)
    m = mf.acknowledge(m, "rack-2", 1)
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format=2), "format"),
        (lambda d: d.update(role="boss"), "role"),
        (lambda d: d.update(extra=1), "unknown field"),
        (
            lambda d: d["disks"][0].update(files=["g000000000002.qcow2", "g000000000001.qcow2"]),
            "rising",
        ),
        (lambda d: d["disks"][0].update(files=["../etc/passwd"]), "chain file"),
        (lambda d: d.update(appliance="../x"), "appliance"),
        (lambda d: d.update(epoch=-1), "epoch"),
        (lambda d: d.update(lineage=[[2, 1], [1, 5]]), "lineage"),
    ],
)
def test_bad_manifests_are_refused(mutate, message) -> None:
    data = primary().to_dict()
    mutate(data)
    with pytest.raises(InvalidInput, match=message):
        Manifest.from_dict(data)


def test_freeze_makes_the_active_overlay_the_next_generation() -> None:
    m = mf.freeze_primary(primary(), 1, 12.0, 4096)
    assert m.generation == 1
    assert m.chain("data").files == tuple(generation_file(g) for g in (0, 1, 2))
    rec = m.record(1)
    assert rec is not None and (rec.opened_at, rec.frozen_at, rec.data_bytes) == (10.0, 12.0, 4096)
    assert m.active_opened_at == 12.0


def test_freeze_with_an_older_epoch_is_refused() -> None:
    m = mf.freeze_primary(primary(epoch=3), 3, 12.0, 0)
    with pytest.raises(Conflict, match="epoch 2"):
        mf.freeze_primary(m, 2, 13.0, 0)


def test_freeze_under_a_new_epoch_extends_the_lineage() -> None:
    m = mf.freeze_primary(primary(epoch=1), 1, 12.0, 0)
    m = mf.freeze_primary(m, 4, 13.0, 0)
    assert m.lineage == ((1, 1), (4, 2))
    assert m.epoch_of(1) == 1 and m.epoch_of(2) == 4


def test_replica_accepts_the_next_generation_only() -> None:
    m = mf.accept_delta(replica(), record(1), (0, 0), 1)
    assert m.generation == 1 and m.head == (1, 1)
    assert m.chain("data").files == (generation_file(0), generation_file(1))
    with pytest.raises(Conflict, match="ship the generations in between"):
        mf.accept_delta(m, record(3), (2, 1), 1)


def test_replica_refuses_an_older_epoch() -> None:
    m = mf.raise_epoch(replica(), 5)
    with pytest.raises(Conflict, match="fenced"):
        mf.accept_delta(m, record(1, epoch=4), (0, 0), 4)


def test_replica_refuses_a_diverged_parent() -> None:
    m = mf.accept_delta(replica(), record(1), (0, 0), 1)
    # the new primary's generation 1 was made under epoch 2: histories diverged
    with pytest.raises(Conflict, match="diverged"):
        mf.accept_delta(m, record(2, epoch=2), (1, 2), 2)


def test_replica_needs_every_disk_in_a_delta() -> None:
    rec = GenerationRecord(1, 1, 0.0, 1.0, 0, (DiskDelta("data", generation_file(1), 1, SHA),))
    with pytest.raises(InvalidInput, match="every disk"):
        mf.accept_delta(replica(), rec, (0, 0), 1)


def test_replica_merge_pair_and_pending_rename() -> None:
    m = replica()
    for g in (1, 2):
        m = mf.accept_delta(m, record(g), (g - 1, 1 if g > 1 else 0), 1)
    assert mf.begin_merge(m, "data") == (generation_file(0), generation_file(1))
    m2 = mf.merged_on_replica(m, "data", generation_file(0), generation_file(1))
    assert m2.chain("data").files == (generation_file(1), generation_file(2))
    assert m2.pending_renames[0].source == generation_file(0)
    assert mf.rename_done(m2, "data").pending_renames == ()
    assert Manifest.from_json(m2.to_json()) == m2


def test_primary_never_merges_its_active_overlay() -> None:
    m = primary()
    assert mf.begin_merge(m, "data") is None
    m = mf.freeze_primary(m, 1, 12.0, 0)
    assert mf.begin_merge(m, "data") == (generation_file(0), generation_file(1))


def test_promote_puts_an_active_overlay_on_top() -> None:
    m = mf.accept_delta(replica(), record(1), (0, 0), 1)
    p = mf.promote(m, 2, 50.0)
    assert p.role == Role.PRIMARY and p.epoch == 2
    assert p.chain("data").top == generation_file(2)
    p = mf.freeze_primary(p, 2, 51.0, 0)
    assert p.lineage == ((1, 1), (2, 2))


def test_demote_drops_the_active_overlay() -> None:
    m = mf.freeze_primary(primary(), 1, 12.0, 0)
    d = mf.demote(m, 2)
    assert d.role == Role.REPLICA and d.chain("data").top == generation_file(1)


@pytest.mark.parametrize(
    "a, gen_a, b, gen_b, common",
    [
        (((1, 1),), 10, ((1, 1),), 8, 8),
        (((1, 1),), 12, ((1, 1), (2, 11)), 13, 10),  # old primary wrote 11, 12 under epoch 1
        (((1, 1), (2, 11)), 13, ((1, 1),), 12, 10),
        (((1, 1),), 0, ((1, 1),), 5, 0),
        (((1, 1), (3, 4)), 9, ((1, 1), (3, 4)), 9, 9),
        (((2, 1),), 5, ((1, 1),), 5, 0),
    ],
)
def test_last_common_generation(a, gen_a, b, gen_b, common) -> None:
    assert last_common_generation(a, gen_a, b, gen_b) == common


def test_history_keeps_unacknowledged_generations_up_to_a_bound() -> None:
    m = mf.acknowledge(primary(), "rack-2", 0)
    for g in range(1, mf.HISTORY_KEEP + 10):
        m = mf.freeze_primary(m, 1, 10.0 + g, 0)
    assert len(m.history) == mf.HISTORY_KEEP + 9  # rack-2 still needs all of them
    for g in range(mf.HISTORY_KEEP + 10, mf.HISTORY_MAX + 20):
        m = mf.freeze_primary(m, 1, 10.0 + g, 0)
    assert len(m.history) == mf.HISTORY_MAX
    assert m.history[-1].generation == m.generation


def test_history_keeps_recent_records_when_replicas_are_current() -> None:
    m = primary()
    for g in range(1, 100):
        m = mf.freeze_primary(m, 1, 10.0 + g, 0)
        m = mf.acknowledge(m, "rack-2", g)
    assert len(m.history) == mf.HISTORY_KEEP


def test_record_checksums() -> None:
    m = mf.freeze_primary(primary(), 1, 12.0, 0)
    deltas = [
        DiskDelta("root", generation_file(1), 5, SHA),
        DiskDelta("data", generation_file(1), 5, SHA),
    ]
    m = mf.record_checksums(m, 1, deltas)
    rec = m.record(1)
    assert rec is not None and [d.disk for d in rec.deltas] == ["data", "root"]


def test_bad_checksum_is_refused() -> None:
    with pytest.raises(InvalidInput, match="xxh128:<32 hex> or sha1"):
        DiskDelta("data", generation_file(1), 5, "md5:abc")
    with pytest.raises(InvalidInput):
        DiskDelta("data", generation_file(1), 5, "xxh128:" + "ab" * 20)  # wrong length
    assert DiskDelta("data", generation_file(1), 5, "xxh128:" + "ab" * 16).checksum
