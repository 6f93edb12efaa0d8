"""The feature shards as pieces: planned from footers, dealt out once per epoch, read with a shuffle, cached."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycap import pieces, schema


def _store(root, files: int, rows: int, group: int) -> list[pieces.RowGroup]:
    """`files` feature files of `rows` images in row groups of `group`, stored sorted by class (one class a file)."""
    root.mkdir(exist_ok=True)
    for f in range(files):
        ids = [f"class{f}/img{k:04d}" for k in range(rows)]
        table = pa.table({schema.IMAGE_ID: ids, schema.FEATURES: pa.array([bytes([f]) * 256] * rows)})
        pq.write_table(table, root / f"{f:05d}.parquet", row_group_size=group)
    return pieces.row_groups(fsspec.filesystem("file"), str(root))


def test_row_groups_come_from_the_image_id_column_in_path_order(tmp_path):
    groups = _store(tmp_path / "f", files=2, rows=10, group=4)
    assert [(g.path.rsplit("/", 1)[1], g.index, len(g.ids)) for g in groups] == [
        ("00000.parquet", 0, 4), ("00000.parquet", 1, 4), ("00000.parquet", 2, 2),
        ("00001.parquet", 0, 4), ("00001.parquet", 1, 4), ("00001.parquet", 2, 2)]  # fmt: skip
    assert groups[4].ids == ("class1/img0004", "class1/img0005", "class1/img0006", "class1/img0007")


def test_a_large_input_is_dealt_in_whole_row_groups_a_small_one_in_slices():
    big = [pieces.RowGroup(f"f{k}", 0, tuple(range(256))) for k in range(100)]
    assert pieces.plan_pieces(big, world=4) == [pieces.Piece(f"f{k}", 0, 0, 256) for k in range(100)]
    small = pieces.plan_pieces([pieces.RowGroup("f", 0, tuple(range(40)))], world=2)
    assert len(small) >= 2 * pieces.PIECES_PER_WORKER - 2 and sum(p.rows for p in small) == 40
    assert [(p.start, p.stop) for p in small] == sorted((p.start, p.stop) for p in small)  # contiguous slices
    assert all(a.stop == b.start for a, b in zip(small, small[1:]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_piece_goes_to_exactly_one_worker_each_epoch_and_the_deal_changes(world):
    plan = [pieces.Piece("f", g, 0, 8) for g in range(30)]
    hands = {epoch: [pieces.deal(plan, epoch, 7, rank, world) for rank in range(world)] for epoch in range(3)}
    for epoch, dealt in hands.items():
        assert sorted(p.row_group for hand in dealt for p in hand) == list(range(30)), epoch
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1  # shares differ by a piece at most
    assert hands[0] != hands[1] != hands[2]
    assert hands[1] == [pieces.deal(plan, 1, 7, rank, world) for rank in range(world)]  # seeded: a restart agrees


def _worker(groups, rank=0, world=1, cache_bytes=0, keep=lambda t: t, batch_size=8):
    plan = pieces.plan_pieces(groups, world)
    return pieces.WorkerFeatures(fsspec.filesystem("file"), plan, keep, rank, world, batch_size, 0, cache_bytes)


@pytest.mark.parametrize("cache_bytes, reads_after_epoch_0", [(1 << 30, 0), (1000, 1), (0, 1)])
def test_a_share_that_fits_is_read_once_and_reshuffled_one_that_does_not_is_read_every_epoch(
    tmp_path, cache_bytes, reads_after_epoch_0
):
    groups = _store(tmp_path / "f", files=2, rows=25, group=25)
    workers = [_worker(groups, rank, 2, cache_bytes) for rank in range(2)]
    orders = []
    for epoch in range(3):
        reads = [w.reads for w in workers]
        batches = [list(w.batches(epoch)) for w in workers]
        assert all(0 < len(b) <= 8 for hand in batches for b in hand)
        seen = [[i for b in hand for i in b[schema.IMAGE_ID].to_pylist()] for hand in batches]
        assert sorted(seen[0] + seen[1]) == sorted(i for g in groups for i in g.ids)  # every image once
        if epoch:
            grew = [w.reads - r for w, r in zip(workers, reads)]
            assert all((g > 0) == bool(reads_after_epoch_0) for g in grew), grew
        orders.append(seen[0])
    assert orders[1] != orders[2]  # reshuffled each epoch, from the cache too


def test_rows_outside_the_training_side_are_never_batched(tmp_path):
    groups = _store(tmp_path / "f", files=2, rows=20, group=10)
    train = {i for g in groups for i in g.ids if int(i[-1]) % 2 == 0}
    worker = _worker(groups, keep=lambda t: pieces.keep_ids(t, train))
    seen = [i for b in worker.batches(0) for i in b[schema.IMAGE_ID].to_pylist()]
    assert sorted(seen) == sorted(train)


def test_a_store_sorted_by_class_reaches_a_worker_shuffled(tmp_path):
    """Eight files of one class each (a store written one source or one day at a time): the worker's first
    batches already mix classes, and the class sequence over its epoch is not sorted in any direction."""
    groups = _store(tmp_path / "f", files=8, rows=64, group=16)
    worker = _worker(groups, rank=0, world=2, batch_size=16)
    classes = [[int(i.split("/")[0][5:]) for i in b[schema.IMAGE_ID].to_pylist()] for b in worker.batches(0)]
    assert len(set(classes[0])) >= 3  # the buffer mixes SHUFFLE_PIECES pieces of different files
    sequence = [c for batch in classes for c in batch]
    assert sequence != sorted(sequence) and sequence != sorted(sequence, reverse=True)
    runs = sum(1 for a, b in zip(sequence, sequence[1:]) if a != b)
    assert runs > len(sequence) / 4  # classes change often: not blocks of one class
