"""The feature shards as pieces: read beside their captions, dealt out once per epoch, shuffled, cached."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycap import pieces, schema, trainset
from raycap.ingest import EXCLUDED, TRAIN, VAL


def _store(root, files: int, rows: int, group: int, side=lambda image_id: TRAIN) -> tuple[list, list]:
    """`files` feature files of `rows` images in row groups of `group`, stored sorted by class (one class a file),
    each with its captions file as trainset.py writes it (`side`: each image's split): (files, row groups)."""
    root.mkdir(exist_ok=True)
    paths, groups = [], []
    for f in range(files):
        ids = [f"class{f}/img{k:04d}" for k in range(rows)]
        table = pa.table({schema.IMAGE_ID: ids, schema.FEATURES: pa.array([bytes([f]) * 256] * rows)})
        pq.write_table(table, root / f"{f:05d}.parquet", row_group_size=group)
        captions = pa.table(
            [ids, [side(i) for i in ids], [[f"a shape of class {f}"]] * rows], schema=trainset.CAPTIONS_FILE
        )
        pq.write_table(captions, root / f"{f:05d}.captions.parquet", row_group_size=group)
        paths.append((str(root / f"{f:05d}.parquet"), str(root / f"{f:05d}.captions.parquet")))
        groups.append([min(group, rows - start) for start in range(0, rows, group)])
    return paths, groups


def _ids(paths) -> list[str]:
    return [i for path, _ in paths for i in pq.read_table(path)[schema.IMAGE_ID].to_pylist()]


def test_a_piece_reads_its_rows_and_their_captions_side_by_side(tmp_path):
    paths, groups = _store(tmp_path / "f", files=2, rows=10, group=4)
    assert groups == [[4, 4, 2], [4, 4, 2]]
    piece = pieces.Piece(*paths[1], 1, 1, 3)
    table = pieces.read_piece(piece, [schema.IMAGE_ID])
    assert table[schema.IMAGE_ID].to_pylist() == ["class1/img0005", "class1/img0006"]
    assert table[trainset.CAPTIONS].to_pylist() == [["a shape of class 1"]] * 2 and table[
        trainset.SPLIT
    ].to_pylist() == [0, 0]


def test_a_large_input_is_dealt_in_whole_row_groups_a_small_one_in_slices():
    big = [(f"f{k}", f"c{k}") for k in range(100)]
    assert pieces.plan_pieces(big, [[256]] * 100, world=4) == [
        pieces.Piece(f"f{k}", f"c{k}", 0, 0, 256) for k in range(100)
    ]
    small = pieces.plan_pieces([("f", "c")], [[40]], world=2)
    assert len(small) >= 2 * pieces.PIECES_PER_WORKER - 2 and sum(p.rows for p in small) == 40
    assert [(p.start, p.stop) for p in small] == sorted((p.start, p.stop) for p in small)  # contiguous slices
    assert all(a.stop == b.start for a, b in zip(small, small[1:]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_piece_goes_to_exactly_one_worker_each_epoch_and_the_deal_changes(world):
    plan = [pieces.Piece("f", "c", g, 0, 8) for g in range(30)]
    hands = {epoch: [pieces.deal(plan, epoch, 7, rank, world) for rank in range(world)] for epoch in range(3)}
    for epoch, dealt in hands.items():
        assert sorted(p.row_group for hand in dealt for p in hand) == list(range(30)), epoch
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1  # shares differ by a piece at most
    assert hands[0] != hands[1] != hands[2]
    assert hands[1] == [pieces.deal(plan, 1, 7, rank, world) for rank in range(world)]  # seeded: a restart agrees


def _worker(store, rank=0, world=1, cache_bytes=0, keep=pieces.training_rows, batch_size=8):
    plan = pieces.plan_pieces(*store, world)
    return pieces.WorkerFeatures(plan, keep, rank, world, batch_size, 0, cache_bytes)


@pytest.mark.parametrize("cache_bytes, reads_after_epoch_0", [(1 << 30, 0), (1000, 1), (0, 1)])
def test_a_share_that_fits_is_read_once_and_reshuffled_one_that_does_not_is_read_every_epoch(
    tmp_path, cache_bytes, reads_after_epoch_0
):
    store = _store(tmp_path / "f", files=2, rows=25, group=25)
    workers = [_worker(store, rank, 2, cache_bytes) for rank in range(2)]
    orders = []
    for epoch in range(3):
        reads = [w.reads for w in workers]
        batches = [list(w.batches(epoch)) for w in workers]
        assert all(0 < len(b) <= 8 for hand in batches for b in hand)
        seen = [[i for b in hand for i in b[schema.IMAGE_ID].to_pylist()] for hand in batches]
        assert sorted(seen[0] + seen[1]) == sorted(_ids(store[0]))  # every image once
        if epoch:
            grew = [w.reads - r for w, r in zip(workers, reads)]
            assert all((g > 0) == bool(reads_after_epoch_0) for g in grew), grew
        orders.append(seen[0])
    assert orders[1] != orders[2]  # reshuffled each epoch, from the cache too


def test_rows_outside_the_training_side_are_never_batched(tmp_path):
    store = _store(tmp_path / "f", files=2, rows=20, group=10, side=lambda i: [TRAIN, VAL, EXCLUDED][int(i[-1]) % 3])
    train = [i for i in _ids(store[0]) if int(i[-1]) % 3 == 0]
    held = {train[0]}  # a training image moved to val
    worker = _worker(store, keep=lambda t: pieces.training_rows(t, held))
    seen = [i for b in worker.batches(0) for i in b[schema.IMAGE_ID].to_pylist()]
    assert sorted(seen) == sorted(train[1:])


def test_a_store_sorted_by_class_reaches_a_worker_shuffled(tmp_path):
    """Eight files of one class each (a store written one source or one day at a time): the worker's first
    batches already mix classes, and the class sequence over its epoch is not sorted in any direction."""
    store = _store(tmp_path / "f", files=8, rows=64, group=16)
    worker = _worker(store, rank=0, world=2, batch_size=16)
    classes = [[int(i.split("/")[0][5:]) for i in b[schema.IMAGE_ID].to_pylist()] for b in worker.batches(0)]
    assert len(set(classes[0])) >= 3  # the buffer mixes SHUFFLE_PIECES pieces of different files
    sequence = [c for batch in classes for c in batch]
    assert sequence != sorted(sequence) and sequence != sorted(sequence, reverse=True)
    runs = sum(1 for a, b in zip(sequence, sequence[1:]) if a != b)
    assert runs > len(sequence) / 4  # classes change often: not blocks of one class
