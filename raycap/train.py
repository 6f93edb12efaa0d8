"""The training job's driver: inputs from any URI, Ray Train DDP with checkpoints under the output, the model dir."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from raycap import modeldir, schema, storage
from raycap.config import TrainConfig, verbose
from raycap.ingest import load_captions, split_images
from raycap.model import Captioner, ModelConfig
from raycap.pieces import Piece, RowGroup, feature_statistics, plan_pieces, row_groups
from raycap.resources import node_shapes, plan_train_workers
from raycap.text import Vocabulary
from raycap.train_worker import WorkerConfig, train_loop_per_worker

RUNS_SUFFIX = ".runs"  # Ray Train's runs and checkpoints live beside the model directory: MODEL.runs/
# How often Ray Train's controller polls its workers (Ray propagates the variable from the driver to the controller).
# Its default, 2 s, is paid a few times at a run's start and end: 4-5 s of every run here, 1 s at this value.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


@dataclass
class Inputs:
    """The training inputs, read and checked on the driver before any Ray Data or Ray Train work."""

    fs: fsspec.AbstractFileSystem  # the features' filesystem
    features_dir: str  # path of the feature shards inside `fs`
    groups: list[RowGroup]  # every row group of the feature shards, with its image ids
    captions: dict[str, list[str]]  # image id -> its captions (only images that have features)
    train_ids: list[str]
    val_ids: list[str]
    manifest: dict[str, Any]  # the extract manifest (encoder weights, feature dtype, preprocessing)


def read_inputs(config: TrainConfig) -> Inputs:
    """Captions, split and the ids of the extracted images, from local paths or URIs; one ValueError line on a fault."""
    fs, features_root = storage.filesystem(config.features, config.storage_options)
    features_dir = storage.join(features_root, schema.FEATURES_DIR)  # its existence checked by config.validate
    out_fs, out_path = storage.filesystem(config.output, config.storage_options)
    if type(out_fs) is type(fs) and (out_path + "/").startswith(features_root.rstrip("/") + "/"):
        raise ValueError("--output must not be inside --features")
    captions = load_captions(
        config.captions, config.max_captions, config.seed, config.storage_options, config.caption_column
    )
    groups = row_groups(fs, features_dir)  # only the image_id column is read, a column chunk per row group
    available = {i for g in groups for i in g.ids}
    paired = {i: c for i, c in captions.items() if i in available}
    if not paired:
        raise ValueError(f"no image in --captions has features in {config.features} (ids must match file names)")
    train_ids, val_ids = split_images(list(paired), config.split_file, config.seed, config.storage_options)
    if not train_ids:
        raise ValueError("the training split is empty")
    manifest_path = storage.join(features_root, schema.MANIFEST_FILE)
    manifest = storage.read_json(fs, manifest_path) if fs.exists(manifest_path) else {}
    return Inputs(fs, features_dir, groups, paired, train_ids, val_ids, manifest)


def input_pin(
    vocab: Vocabulary, captions: dict[str, list[str]], train_ids: list[str], val_ids: list[str]
) -> dict[str, str]:
    """Digests of what a run's checkpoints mean: the vocabulary, the split and the captions (stored in each)."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    return {
        "vocabulary": digest(vocab.to_json()),
        "split": digest([sorted(train_ids), sorted(val_ids)]),
        "captions": digest(captions),
    }


def val_sample(val_ids: list[str], images: int, seed: int) -> list[str]:
    """At most `images` val ids, a seeded sample: validation costs the same each epoch whatever the split's size."""
    ids = sorted(val_ids)
    return sorted(random.Random(seed).sample(ids, images)) if len(ids) > images else ids


def val_pieces(groups: list[RowGroup], scored: list[str]) -> list[Piece]:
    """The row groups that hold the images validation scores: rank 0 reads only these, once."""
    wanted = set(scored)
    return [Piece(g.path, g.index, 0, len(g.ids)) for g in groups if wanted.intersection(g.ids)]


def run_storage(config: TrainConfig) -> tuple[str, str, pyarrow.fs.FileSystem | None]:
    """Where Ray Train keeps runs and checkpoints: (run root URI, its path for Ray, the filesystem for Ray).

    The filesystem carries the same endpoint and credentials as every other path (AWS_* and --storage-options);
    None for a local root, which Ray then opens itself.
    """
    fs, path = storage.filesystem(config.output, config.storage_options)
    root = path + RUNS_SUFFIX
    if storage.is_local(fs):
        return root, root, None
    if "/" not in path.strip("/"):
        raise ValueError(f"--output {config.output} must be a folder inside a bucket, not the bucket itself")
    return storage.uri(fs, root), root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) and write the model directory; returns the final metrics."""
    config.validate()
    inputs = read_inputs(config)
    captions, train_ids, val_ids = inputs.captions, inputs.train_ids, inputs.val_ids
    source = modeldir.load_model_dir(config.init_from, config.storage_options) if config.init_from else None
    vocab = source.vocab if source else Vocabulary.build((c for i in train_ids for c in captions[i]), config.vocab_size)
    length = config.max_caption_length + 2
    world = config.workers
    pieces = plan_pieces(inputs.groups, world)
    mean, std = feature_statistics(inputs.fs, pieces, set(train_ids), config.seed)
    model_cfg = (
        source.model.config
        if source
        else ModelConfig(
            vocab_size=len(vocab), embedding_dim=config.embedding_dim, units=config.units, init_state=config.init_state
        )
    )
    run_root, storage_path, storage_filesystem = run_storage(config)
    pin = input_pin(vocab, captions, train_ids, val_ids)
    scored = val_sample(val_ids, config.val_images, config.seed)  # what rank 0 holds and scores each epoch
    resume = modeldir.latest_checkpoint(run_root, config.storage_options)
    if resume:
        changed = modeldir.pin_mismatch(modeldir.read_checkpoint_state(resume, config.storage_options), pin)
        if changed:
            raise ValueError(
                f"--output {config.output} has checkpoints trained on other inputs ({', '.join(changed)} changed: "
                f"an edited --captions, new features or another --split-file?); resuming would mix them: "
                f"use a new --output, or remove {run_root} to start over"
            )
    resources = ray.cluster_resources()
    worker_cfg = WorkerConfig(
        settings=config,
        model=model_cfg,
        vocab_json=vocab.to_json(),
        captions={i: [vocab.encode(c, length) for c in captions[i]] for i in train_ids},
        val_captions={i: [vocab.encode(c, length) for c in captions[i]] for i in scored},
        val_refs={i: captions[i] for i in scored},
        feature_mean=mean.tolist(),
        feature_std=std.tolist(),
        total_steps=math.ceil(len(train_ids) / world / config.batch_size) * config.epochs,
        threads=max(1, int(resources.get("CPU", 1)) // world),
        resume=resume,
        init_from=config.init_from,
        pin=pin,
        storage_options=config.storage_options,
        pieces=pieces,
        val_pieces=val_pieces(inputs.groups, scored),
    )
    use_gpu, worker_cpus = plan_train_workers(node_shapes(), world, config.use_gpu)
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)  # a user's own setting wins
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, worker_cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, use_gpu=use_gpu, resources_per_worker={"CPU": worker_cpus}
        ),
        run_config=ray.train.RunConfig(
            name=time.strftime("run-%Y%m%d-%H%M%S"),
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # The best checkpoint by val CIDEr is kept (and becomes MODEL/), and Ray always keeps the latest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_cider", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "ERROR"),  # see cli.quiet_ray
        ),
    )
    result = trainer.fit()
    to_uri = functools.partial(storage.uri, storage.filesystem(config.output, config.storage_options)[0])
    best = modeldir.best_checkpoint(run_root, pin, config.storage_options)  # of every run, this one included
    latest = to_uri(result.checkpoint.path) if result.checkpoint else None
    best, latest = best or latest or resume, latest or best or resume
    if best is None or latest is None:
        raise RuntimeError("training produced no checkpoint")
    history = modeldir.read_checkpoint_state(latest, config.storage_options)["history"]  # every epoch's metrics
    model = Captioner(model_cfg)
    model.load_state_dict(modeldir.read_checkpoint_weights(best, config.storage_options))
    modeldir.write_model_dir(
        config.output,
        model,
        vocab,
        {
            "encoder_weights": inputs.manifest.get("encoder_weights", "imagenet"),
            "feature_dtype": inputs.manifest.get("feature_dtype", "float16"),
            "preprocessing": inputs.manifest.get("preprocessing", "resize 299x299 bilinear, pixels/127.5 - 1"),
            "epochs": len(history),
            "train_images": len(train_ids),
            "val_images": len(val_ids),
        },
        metrics=history,
        storage_options=config.storage_options,
    )
    return history[-1] if history else {}
