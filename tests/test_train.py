"""Training: caption batching, splits, caption inputs, optimiser state; DDP, resume and a killed worker on Ray."""

from __future__ import annotations

import heapq
import json
import os
import signal
import threading
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import train as train_job
from raycap import ingest, modeldir, schema, synth, train, train_worker, trainset
from raycap.config import TrainConfig
from raycap.model import Captioner, ModelConfig
from raycap.text import Vocabulary


def test_caption_batch_sorts_by_length_and_indexes_images():
    caps = {"a": [[2, 5, 3], [2, 5, 6, 7, 3], [2, 5, 3]], "b": [[2, 9, 9, 3]], "c": []}
    rows, padded, index, weights = ingest.caption_batch(["c", "a", "b", "x"], caps)
    assert rows.tolist() == [1, 2]  # images without captions are dropped
    assert padded.tolist() == [[2, 5, 6, 7, 3], [2, 9, 9, 3, 0], [2, 5, 3, 0, 0]]
    assert index.tolist() == [0, 1, 0]
    assert weights.tolist() == [1, 1, 2]  # the repeated caption is decoded once, counted twice


def _feature_store(root: Path, files: int, rows: int) -> list[str]:
    """`files` feature files of `rows` images each (tiny features: only the ids matter to the join)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        ids = [f"img_{f * rows + k}.jpg" for k in range(rows)]
        pq.write_table(pa.table({schema.IMAGE_ID: ids}), root / f"{f:05d}.parquet", row_group_size=max(1, rows // 3))
        paths.append(str(root / f"{f:05d}.parquet"))
    return paths


def _join(paths: list[str], captions: str, out: Path, buckets: int, split_file: str | None = None, sample: int = 8):
    """trainset.py's scatter, join and gather in this process, as train.py runs them in Ray tasks."""
    files = [(p, trainset.captions_path(str(out), p)) for p in paths]
    indexed = list(enumerate(paths))
    scattered = [trainset.scatter_features(g, buckets) for g in trainset.scatter_groups(indexed)]
    for batch in trainset.scatter_captions(ingest.caption_chunks(captions), buckets):
        scattered.append(batch)
    if split_file:
        scattered.append(trainset.scatter_split(split_file, buckets))
    joined = [
        trainset.join_bucket([s[k] for s in scattered], 0, bool(split_file), 1.0, buckets) for k in range(buckets)
    ]
    results = [
        trainset.gather_files([j[g] for j in joined], {i: files[i] for i in range(g, len(files), buckets)}, sample, 0)
        for g in range(buckets)
    ]
    return trainset.merge(results, files, sample)


def _sides(joined: trainset.TrainSet) -> dict[str, int]:
    tables = [pq.read_table(captions) for _, captions in joined.files]
    return {i: s for t in tables for i, s in zip(t[schema.IMAGE_ID].to_pylist(), t[trainset.SPLIT].to_pylist())}


def test_the_split_is_data_stable_across_task_counts_and_a_split_file_is_reproduced_exactly(tmp_path):
    paths = _feature_store(tmp_path / "features", files=3, rows=40)
    csv = tmp_path / "captions.csv"
    csv.write_text("file_name,caption\n" + "".join(f"img_{k}.jpg,a red circle {k % 7}\n" for k in range(120)))
    one = _join(paths, str(csv), tmp_path / "one", buckets=1)
    three = _join(paths, str(csv), tmp_path / "three", buckets=3)
    assert _sides(one) == _sides(three)  # the same split, captions files and counts whatever the tasks
    assert one.digests == three.digests and one.words == three.words and one.val_sample == three.val_sample
    assert one.train_images + one.val_images == 120 and 0 < one.val_images < 20
    sides = _sides(one)
    assert all(s == ingest.hash_side(i, 0) for i, s in sides.items())  # each image's own hash, nothing else
    assert [pq.ParquetFile(c).metadata.num_rows for _, c in one.files] == [40, 40, 40]  # row for row
    assert one.groups == [[13, 13, 13, 1]] * 3  # the feature files' row groups, from the join itself
    splits = tmp_path / "splits.json"
    train_ids, val_ids = [f"img_{k}.jpg" for k in range(0, 60)], [f"img_{k}.jpg" for k in range(100, 110)]
    splits.write_text(json.dumps({"train": [*train_ids, "unknown.jpg"], "val": val_ids}))
    given = _sides(_join(paths, str(csv), tmp_path / "given", buckets=2, split_file=str(splits)))
    assert sorted(i for i, s in given.items() if s == ingest.TRAIN) == sorted(train_ids)
    assert sorted(i for i, s in given.items() if s == ingest.VAL) == sorted(val_ids)
    assert sum(s == ingest.EXCLUDED for s in given.values()) == 50  # images the file does not name


def test_load_captions_from_coco_csv_and_parquet(tmp_path):
    coco = tmp_path / "c.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg"}],
                "annotations": [{"image_id": 7, "caption": "A dog."}, {"image_id": 7, "caption": "x"}],
            }
        )
    )
    assert ingest.load_captions(str(coco)) == {"a.jpg": ["A dog.", "x"]}
    csv = tmp_path / "c.csv"
    csv.write_text("file_name,caption\nb.jpg,a cat\nb.jpg,two cats\n")
    assert ingest.load_captions(str(csv)) == {"b.jpg": ["a cat", "two cats"]}
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"path": ["d/e.jpg"] * 10, "caption": [str(i) for i in range(10)]}), parquet)
    assert len(ingest.load_captions(str(parquet))["d/e.jpg"]) == 10
    bad = tmp_path / "bad.csv"
    bad.write_text("name,text\nx,y\n")
    with pytest.raises(ValueError, match="needs columns"):
        ingest.load_captions(str(bad))


def test_max_captions_keeps_a_seeded_share_whatever_the_tasks():
    rows = pa.table([[f"i{k % 500}" for k in range(5000)], [f"c{k}" for k in range(5000)]], schema=ingest.CAPTION_ROWS)
    kept = trainset._kept(rows, seed=1, fraction=0.2)
    assert abs(len(kept) - 1000) < 4 * (5000 * 0.2 * 0.8) ** 0.5  # about the share asked for
    halves = [trainset._kept(rows.slice(0, 2500), 1, 0.2), trainset._kept(rows.slice(2500), 1, 0.2)]
    assert pa.concat_tables(halves).equals(kept)  # a caption's fate is its own: tasks cut anywhere agree
    assert not trainset._kept(rows, seed=2, fraction=0.2).equals(kept)


def test_optimizer_state_round_trips_through_safetensors():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    modeldir.load_optimizer(fresh, modeldir.optimizer_bytes(opt))
    assert fresh.param_groups[0]["lr"] == 0.1
    for a, b in zip(opt.state.values(), fresh.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert train_worker.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert train_worker.lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert train_worker.lr_factor(100, 10, 100) == pytest.approx(0.1)


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket on the moto server for one test, and a filesystem that never serves cached listings."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, use_listings_cache=False, skip_instance_cache=True)
    name = f"train-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return fs, name


@pytest.mark.parametrize("where", ["local", "s3"])
def test_model_dir_without_its_commit_file_is_refused(where, tmp_path, bucket, s3_server):
    fs, name = bucket
    location = str(tmp_path / "model") if where == "local" else f"s3://{name}/model"
    options = {} if where == "local" else s3_server
    vocab = Vocabulary.build(["a red circle", "a blue square"])
    model = Captioner(ModelConfig(vocab_size=len(vocab), embedding_dim=8, units=8))
    written = modeldir.write_model_dir(location, model, vocab, {"encoder_weights": "random"}, [{"epoch": 0}], options)
    assert modeldir.load_model_dir(location, options).model_id == written
    written_again = modeldir.write_model_dir(location, model, vocab, {"encoder_weights": "random"}, None, options)
    assert written_again == written  # overwriting an existing model: same bytes, same id
    commit = f"{location}/{modeldir.COMMIT}"
    if where == "local":
        os.remove(commit)
    else:
        fs.rm_file(commit)
    with pytest.raises(ValueError) as e:
        modeldir.load_model_dir(location, options)
    message = str(e.value)
    assert "\n" not in message and location in message and modeldir.COMMIT in message
    with pytest.raises(ValueError, match="no such model directory"):
        modeldir.load_model_dir(location + "-missing", options)


@pytest.mark.parametrize("flag", ["--features", "--captions", "--split-file"])
def test_missing_s3_input_fails_in_one_line_before_ray(flag, monkeypatch, capsys, tmp_path, bucket, s3_server):
    from raycap import cli

    monkeypatch.setattr(cli, "init_ray", lambda address: pytest.fail("Ray started before the inputs were checked"))
    fs, name = bucket
    fs.pipe_file(f"{name}/features/features/shard-000000.parquet", b"x")
    fs.pipe_file(f"{name}/captions.json", b"{}")
    paths = {
        "--features": f"s3://{name}/features",
        "--captions": f"s3://{name}/captions.json",
        "--split-file": f"s3://{name}/splits.json",
    }
    paths[flag] = missing = f"s3://{name}/missing"
    args = [a for f, p in paths.items() for a in (f, p)]
    code = train_job.main([*args, "--output", f"s3://{name}/model", "--storage-options", json.dumps(s3_server)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and missing in err[0] and flag in err[0]
    assert not fs.exists(f"{name}/model") and not fs.exists(f"{name}/model{train.RUNS_SUFFIX}")  # nothing written


def _train_args(tiny_synth, features, bucket, s3_server, epochs: int) -> list[str]:
    """The train command with captions, split file, model directory and checkpoints on the moto S3 server."""
    fs, name = bucket
    for file in ("captions.json", "splits.json"):
        fs.put_file(str(tiny_synth / file), f"{name}/{file}")
    return [
        "--features",
        str(features),
        "--captions",
        f"s3://{name}/captions.json",
        "--split-file",
        f"s3://{name}/splits.json",
        "--output",
        f"s3://{name}/model",
        "--epochs",
        str(epochs),
        "--workers",
        "2",
        "--batch-size",
        "4",
        "--storage-options",
        json.dumps(s3_server),
    ]


def _own_pids_of(title: str) -> list[int]:
    """Processes of this test's Ray (descendants of this process) whose command line mentions `title`.

    Ray sets a worker's command line to its actor class; other Ray clusters on the machine are left alone.
    """
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return sorted(pid for pid, cmd in titles.items() if title in cmd and ours(pid))


def _history(bucket) -> list[dict]:
    fs, name = bucket
    return [json.loads(line) for line in fs.cat_file(f"{name}/model/{modeldir.METRICS}").decode().splitlines()]


@pytest.mark.slow
def test_rerun_of_the_same_command_resumes_from_s3(ray_session, tiny_synth, tiny_features, bucket, s3_server):
    cached = ["--cache-gb", "1"]  # and the in-worker feature cache, through a real DDP run
    assert train_job.main([*_train_args(tiny_synth, tiny_features, bucket, s3_server, 1), *cached]) == 0
    first = _history(bucket)
    assert train_job.main([*_train_args(tiny_synth, tiny_features, bucket, s3_server, 3), *cached]) == 0
    history = _history(bucket)
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert history[0] == first[0]  # epoch 0 was not trained again
    assert history[1]["resumed_from_epoch"] == 0
    loaded = modeldir.load_model_dir(f"s3://{bucket[1]}/model", s3_server)
    assert loaded.config["epochs"] == 3 and loaded.config["encoder_weights"] == "random"
    assert float(loaded.model.encoder.feature_scale.mean()) != 1.0  # normalisation saved with the weights


@pytest.mark.slow
def test_killed_worker_resumes_from_its_s3_checkpoint(ray_session, tiny_synth, tiny_features, bucket, s3_server):
    runs = f"s3://{bucket[1]}/model{train.RUNS_SUFFIX}"
    result: dict = {}
    # Ten streamed epochs (--cache-gb 0) of 8 steps each: the kill, once epoch 1 is on S3, lands mid-training.
    epochs = 10
    args = [*_train_args(tiny_synth, tiny_features, bucket, s3_server, epochs), "--cache-gb", "0", "--batch-size", "2"]
    job = threading.Thread(target=lambda: result.update(code=train_job.main(args)))
    job.start()
    killed = False
    while job.is_alive() and not killed:
        job.join(timeout=0.5)  # wakes to check for the first checkpoints; not a sleep
        latest = modeldir.latest_checkpoint(runs, s3_server)
        # Once epoch 1's checkpoint is on S3, epoch 0's has surely been registered with the controller.
        if latest and modeldir.read_checkpoint_state(latest, s3_server)["epoch"] >= 1:
            workers = _own_pids_of("RayTrainWorker")
            assert workers, "no training worker process found"
            os.kill(workers[-1], signal.SIGKILL)
            killed = True
    job.join()
    assert killed and result["code"] == 0
    history = _history(bucket)
    assert [m["epoch"] for m in history] == list(range(epochs))  # each epoch exactly once
    # Restarted from a checkpoint, not from scratch: the only checkpoints of this run are on S3.
    resumed = [m["resumed_from_epoch"] for m in history if "resumed_from_epoch" in m]
    assert len(resumed) == 1 and resumed[0] < epochs - 1  # killed mid-training


def test_best_checkpoint_is_chosen_among_every_run_with_the_same_inputs(tmp_path):
    pin, other = {"vocabulary": "v", "split": "s", "captions": "c"}, {"vocabulary": "w", "split": "s", "captions": "c"}
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    for run, epoch, cider, p in [("run-a", 0, 0.9, pin), ("run-b", 1, 0.4, pin), ("run-c", 2, 2.0, other)]:
        folder = tmp_path / run / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        state = {"epoch": epoch, "step": epoch, "history": [{"epoch": epoch, "val_cider": cider}], "pin": p}
        modeldir.write_checkpoint(str(folder), model, opt, state, "{}")
    assert modeldir.latest_checkpoint(str(tmp_path)).endswith("run-c/checkpoint_000002")
    assert modeldir.best_checkpoint(str(tmp_path), pin).endswith("run-a/checkpoint_000000")  # an earlier run's
    assert modeldir.pin_mismatch({"pin": other}, pin) == ["vocabulary"] and modeldir.pin_mismatch({}, pin) == list(pin)


def test_captions_from_the_text_kept_in_feature_rows(tmp_path):
    folder = tmp_path / "out" / "features"
    folder.mkdir(parents=True)
    rows = {"a.jpg": "a red circle", "b.jpg": "two blue squares", "c.jpg": ""}
    for k, (image_id, text) in enumerate(rows.items()):
        table = pa.table({"image_id": [image_id], "features": [b"\0" * 8], "txt": [text], "alt": [[text, "x"]]})
        pq.write_table(table, folder / f"shard-{k:06d}.parquet")
    csv = tmp_path / "c.csv"
    csv.write_text("file_name,caption\na.jpg,a red circle\nb.jpg,two blue squares\n")
    from_features = ingest.load_captions(str(tmp_path / "out"))
    assert from_features == ingest.load_captions(str(csv)) == {"a.jpg": ["a red circle"], "b.jpg": ["two blue squares"]}
    assert ingest.load_captions(str(tmp_path / "out"), caption_column="alt")["a.jpg"] == ["a red circle", "x"]
    with pytest.raises(ValueError, match="no 'caption' column") as e:
        ingest.load_captions(str(tmp_path / "out"), caption_column="caption")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="without features/"):
        ingest.load_captions(str(tmp_path))


def test_hash_split_is_stable_as_images_are_added_disjoint_and_about_5_percent():
    ids = [f"shard-{k // 1000}/img_{k}.jpg" for k in range(20_000)]
    va = {i for i in ids if ingest.hash_side(i, 3) == ingest.VAL}
    assert abs(len(va) / len(ids) - ingest.VAL_FRACTION) < 0.006  # 4 standard deviations at n = 20,000
    assert {i for i in ids[::2] if ingest.hash_side(i, 3) == ingest.VAL} == va & set(ids[::2])  # images added later
    assert {i for i in ids if ingest.hash_side(i, 4) == ingest.VAL} != va  # seeded


def _gathered(val: int, train: int) -> trainset.GatherResult:
    images = [trainset.ValImage(ingest.sample_key(f"v{k}", 0), f"v{k}", 0, 0, k) for k in range(val)]
    summary = trainset.FileSummary(0, [val + train], train, val, {"split": "s", "captions": "c"})
    return trainset.GatherResult([summary], Counter(), heapq.nsmallest(64, images, key=lambda v: v.key), None)


def test_validation_holds_and_scores_a_bounded_sample_however_large_the_val_split():
    """--val-images 64: the driver keeps 64 images whether the split holds 1,000 or 10,000 (counted), the sample
    is the split's 64 smallest seeded keys, and each of 2 ranks holds and decodes its own half of it."""
    for n in (1_000, 10_000):
        joined = trainset.merge([_gathered(n // 2, 10), _gathered(n - n // 2, 10)], [("f", "c")], sample=64)
        assert len(joined.val_sample) == 64 and joined.val_images == n
        shares = [train_worker.val_share(joined.val_sample, rank, 2) for rank in range(2)]
        assert [len(s) for s in shares] == [32, 32] and {v.image_id for s in shares for v in s} == {
            v.image_id for v in joined.val_sample
        }
    small = trainset.merge([_gathered(40, 10)], [("f", "c")], sample=64)
    assert len(small.val_sample) == 40  # a small split is scored whole


@pytest.fixture(scope="module")
def store_models(ray_session, tiny_synth, tmp_path_factory) -> dict:
    """The synthetic benchmark written as a WebDataset store in img2dataset's layout (each image's first caption
    its `.txt` member), extracted with --keep-columns txt, then trained on the text kept in the feature rows
    (`--captions FEATURES_DIR`); also a captions file holding that text."""
    import webdataset as wds

    from tests.helpers import extract

    root = tmp_path_factory.mktemp("store-models")
    first = {name: caps[0] for name, caps in ingest.load_captions(str(tiny_synth / "captions.json")).items()}
    store, ids = root / "store", {}
    store.mkdir()
    for t, start in enumerate(range(0, len(first), 20)):  # 2 tars of 20 samples
        with wds.TarWriter(str(store / f"{t:05d}.tar")) as tar:
            for name in sorted(first)[start : start + 20]:
                key = name.rsplit(".", 1)[0]
                tar.write({"__key__": key, "jpg": (tiny_synth / "images" / name).read_bytes(), "txt": first[name]})
                ids[f"{t:05d}.tar/{key}"] = name
    features = root / "features"
    assert extract(store, features, "--keep-columns", "txt") == 0
    csv = root / "captions.csv"
    csv.write_text("file_name,caption\n" + "".join(f'{i},"{first[n]}"\n' for i, n in ids.items()))
    recipe = ["--features", str(features), *STORE_RECIPE]
    model = str(root / "model")
    assert train_job.main([*recipe, "--captions", str(features), "--output", model]) == 0
    return {"features": str(features), "csv": csv, "ids": ids, "first": first, "recipe": recipe, "model": model}


STORE_RECIPE = ["--epochs", "8", "--workers", "1", "--batch-size", "8", "--cache-gb", "1", "--seed", "3"]


def _object_accuracy(model_dir: str, features: str, objects: dict[str, list], ids: dict[str, str]) -> float:
    """Object accuracy of greedy captions of every extracted image (`ids`: image id -> its synth file name)."""
    from raycap.model import greedy_search
    from raycap.shapes_eval import ObjectTally

    loaded = modeldir.load_model_dir(model_dir)
    table = pq.read_table(os.path.join(features, "features"))
    feats = torch.from_numpy(schema.features_to_numpy(table[schema.FEATURES]).astype("float32"))  # (N, 64, 2048)
    with torch.no_grad():
        gen = greedy_search(loaded.model.eval(), feats, loaded.vocab.start_id, loaded.vocab.end_id, max_length=20)
    tally = ObjectTally()
    for k, image_id in enumerate(table[schema.IMAGE_ID].to_pylist()):
        length = int(gen.lengths[k])
        tokens = loaded.vocab.decode(gen.tokens[k, :length].tolist())
        tally.add(" ".join(tokens), tokens, gen.attention[k, :length].numpy(), objects[ids[image_id]])
    assert tally.images == len(ids)
    return float(tally.result()["object_accuracy"])


@pytest.mark.slow
def test_train_on_a_stores_own_text_learns_as_well_as_from_a_captions_file(store_models, tiny_synth):
    """`train --captions FEATURES_DIR` learns to name objects from the store's own text, and its run is the run a
    captions file holding that text gives: the same captions, split and vocabulary (the pin a checkpoint stores),
    so the same seeded training. (Trained once: a second, identical training would cost a minute of the suite.)"""
    ids, first = store_models["ids"], store_models["first"]
    expected = {i: [first[n]] for i, n in ids.items()}
    assert ingest.load_captions(store_models["features"]) == ingest.load_captions(str(store_models["csv"])) == expected
    pins = []
    for k, captions in enumerate((store_models["features"], str(store_models["csv"]))):
        config = TrainConfig(store_models["features"], captions, store_models["model"] + "-pin", seed=3)
        joined = train.read_inputs(config, store_models["model"] + f"-pin{k}").trainset
        pins.append(train.input_pin(Vocabulary.from_counts(joined.words, config.vocab_size), joined))
    assert (
        pins[0]
        == pins[1]
        == modeldir.read_checkpoint_state(modeldir.latest_checkpoint(store_models["model"] + train.RUNS_SUFFIX))["pin"]
    )
    objects = json.loads((tiny_synth / "objects.json").read_text())
    accuracy = _object_accuracy(store_models["model"], store_models["features"], objects, ids)
    assert accuracy > 0.0  # it learned to name objects from the store's own text


@pytest.mark.slow
def test_rerun_with_edited_captions_is_refused_in_one_line(store_models, tmp_path, capsys):
    model = Path(store_models["model"])
    model_before = (model / modeldir.COMMIT).read_bytes()
    edited = tmp_path / "edited.csv"
    lines = store_models["csv"].read_text().splitlines()
    lines[1] = lines[1].split(",", 1)[0] + ',"a zebra grazing beside a lighthouse"'  # new words: another vocabulary
    edited.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    args = [*store_models["recipe"], "--captions", str(edited), "--output", str(model)]
    assert train_job.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary" in err[0] and "captions" in err[0] and "--output" in err[0]
    assert (model / modeldir.COMMIT).read_bytes() == model_before  # not resumed, nothing rewritten
    # (That the same inputs resume, the pin matching: test_rerun_of_the_same_command_resumes_from_s3.)


@pytest.mark.slow
def test_init_from_keeps_the_source_vocabulary(store_models, tiny_synth, tmp_path):
    """Fine-tuning on other captions (the synth's five per image) keeps the source model's vocabulary."""
    by_name = ingest.load_captions(str(tiny_synth / "captions.json"))
    five = tmp_path / "five.csv"
    five.write_text("file_name,caption\n" + "".join(
        f'{i},"{c}"\n' for i, name in store_models["ids"].items() for c in by_name[name]))  # fmt: skip
    captions = str(five)
    rebuilt = Vocabulary.build(c for caps in ingest.load_captions(captions).values() for c in caps)
    source = modeldir.load_model_dir(store_models["model"])
    assert rebuilt.to_json() != source.vocab.to_json()  # what a rebuilt vocabulary would have been
    args = ["--features", store_models["features"], "--captions", captions, "--epochs", "1", "--workers", "1"]
    assert train_job.main([*args, "--output", str(tmp_path / "tuned"), "--init-from", store_models["model"]]) == 0
    tuned = modeldir.load_model_dir(str(tmp_path / "tuned"))
    assert tuned.vocab.to_json() == source.vocab.to_json()


def _encoded_table_bytes(captions_csv: Path) -> int:
    """What the old design shipped to every worker: each image's encoded captions in a dict (traced bytes)."""
    import tracemalloc

    captions = ingest.load_captions(str(captions_csv))
    vocab = Vocabulary.build(c for caps in captions.values() for c in caps)
    tracemalloc.start()
    table = {i: [vocab.encode(c) for c in caps] for i, caps in captions.items()}
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(table) == len(captions)
    return size


@pytest.mark.slow
def test_a_workers_memory_does_not_hold_the_caption_table(ray_session, tmp_path):
    """From 10,000 to 100,000 captions (2,000 to 20,000 images, 5 captions each, reduced 64 x 8 features), the
    peak memory of each worker before its first step grows by less than half of what the encoded caption table
    alone would add (~15 MB, measured below): the captions reach a worker a piece at a time, beside its features."""
    setup = {}
    for images in (2_000, 20_000):
        root = tmp_path / f"set{images}"
        synth.write_captioned_features(str(root), images, captions=5, row_group=100)
        args = [
            "--features",
            str(root),
            "--captions",
            str(root / "captions.csv"),
            "--output",
            str(tmp_path / f"model{images}"),
        ]
        sizes = ["--epochs", "1", "--workers", "2", "--batch-size", "256", "--units", "16", "--embedding-dim", "8"]
        assert train_job.main([*args, *sizes, "--val-images", "64"]) == 0
        metrics = json.loads((tmp_path / f"model{images}" / modeldir.METRICS).read_text().splitlines()[-1])
        assert metrics["val_images_scored"] == 64 and metrics["val_images_held"] == 32  # each rank its half
        setup[images] = metrics["worker_setup_rss_mb"]
    tables = [_encoded_table_bytes(tmp_path / f"set{n}" / "captions.csv") / 2**20 for n in (2_000, 20_000)]
    assert tables[1] - tables[0] > 12  # what a WorkerConfig carrying the captions would grow by (~15 MB)
    assert setup[20_000] - setup[2_000] < (tables[1] - tables[0]) / 2, (setup, tables)
