"""The training job's driver: inputs from any URI, Ray Train DDP with checkpoints under the output, the model dir."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs
import pyarrow.parquet as pq
import ray
import ray.train
from ray.train.torch import TorchTrainer

from raycap import modeldir, schema, storage
from raycap.config import TrainConfig, verbose
from raycap.joiner import build_trainset
from raycap.model import Captioner, ModelConfig
from raycap.pieces import feature_statistics, plan_pieces, training_rows
from raycap.resources import node_shapes, plan_train_workers
from raycap.text import Vocabulary
from raycap.train_worker import WorkerConfig, train_loop_per_worker
from raycap.trainset import TrainSet

RUNS_SUFFIX = ".runs"  # Ray Train's runs and checkpoints live beside the model directory: MODEL.runs/
TRAINSET_DIR = "trainset"  # under MODEL.runs/: a captions file per feature file, written at each run's start
# How often Ray Train's controller polls its workers (Ray propagates the variable from the driver to the controller).
# Its default, 2 s, is paid a few times at a run's start and end: 4-5 s of every run here, 1 s at this value.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


@dataclass
class Inputs:
    """The training inputs as the driver holds them: file names, counts and the val sample, never the captions."""

    trainset: TrainSet
    feature_dim: int  # channels of the stored features (2048; fewer only in reduced synthetic sets)
    manifest: dict[str, Any]  # the extract manifest (encoder weights, feature dtype, preprocessing)


def feature_files(config: TrainConfig) -> tuple[list[str], int, dict[str, Any]]:
    """The feature files' URIs in name order, their feature channels and the extract manifest; one ValueError line
    on a fault. Only a listing, one footer and the manifest are read."""
    fs, features_root = storage.filesystem(config.features, config.storage_options)
    features_dir = storage.join(features_root, schema.FEATURES_DIR)  # its existence checked by config.validate
    out_fs, out_path = storage.filesystem(config.output, config.storage_options)
    if type(out_fs) is type(fs) and (out_path + "/").startswith(features_root.rstrip("/") + "/"):
        raise ValueError("--output must not be inside --features")
    paths = sorted(p for p in fs.ls(features_dir, detail=False) if p.endswith(".parquet"))
    if not paths:
        raise ValueError(f"--features {config.features} has no feature files in {schema.FEATURES_DIR}/")
    _, dim = schema.feature_layout(pq.read_schema(paths[0], filesystem=fs).field(schema.FEATURES))
    manifest_path = storage.join(features_root, schema.MANIFEST_FILE)
    manifest = storage.read_json(fs, manifest_path) if fs.exists(manifest_path) else {}
    return [storage.uri(fs, p) for p in paths], dim, manifest


def read_inputs(config: TrainConfig, root: str) -> Inputs:
    """The joined training set (captions files under `root`), checked: one ValueError line on a fault."""
    features, dim, manifest = feature_files(config)
    joined = build_trainset(config, features, root)
    if not joined.train_images and not joined.val_images:
        raise ValueError(f"no image in --captions has features in {config.features} (ids must match file names)")
    if not joined.train_images:
        raise ValueError("the training split is empty")
    return Inputs(joined, dim, manifest)


def input_pin(vocab: Vocabulary, joined: TrainSet) -> dict[str, str]:
    """Digests of what a run's checkpoints mean: the vocabulary, the split and the captions (stored in each)."""
    return {
        "vocabulary": hashlib.sha256(vocab.to_json().encode()).hexdigest()[:16],
        "split": joined.digests["split"],
        "captions": joined.digests["captions"],
    }


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
    run_root, storage_path, storage_filesystem = run_storage(config)
    started = time.time()
    inputs = read_inputs(config, storage.join(run_root, TRAINSET_DIR))
    joined = inputs.trainset
    print(
        f"train: {joined.train_images:,} train and {joined.val_images:,} val images with captions "
        f"({len(joined.val_sample):,} val images scored each epoch), joined in {time.time() - started:.1f}s",
        flush=True,
    )
    source = modeldir.load_model_dir(config.init_from, config.storage_options) if config.init_from else None
    vocab = source.vocab if source else Vocabulary.from_counts(joined.words, config.vocab_size)
    world = config.workers
    pieces = plan_pieces(joined.files, joined.groups, world)
    mean, std = feature_statistics(
        pieces, lambda t: training_rows(t, joined.held_out), config.seed, storage_options=config.storage_options
    )
    model_cfg = (
        source.model.config
        if source
        else ModelConfig(
            vocab_size=len(vocab),
            feature_dim=inputs.feature_dim,
            embedding_dim=config.embedding_dim,
            units=config.units,
            init_state=config.init_state,
        )
    )
    pin = input_pin(vocab, joined)
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
        feature_mean=mean.tolist(),
        feature_std=std.tolist(),
        total_steps=math.ceil(joined.train_images / world / config.batch_size) * config.epochs,
        threads=max(1, int(resources.get("CPU", 1)) // world),
        resume=resume,
        init_from=config.init_from,
        pin=pin,
        storage_options=config.storage_options,
        pieces=pieces,
        files=joined.files,
        val_sample=joined.val_sample,
        held_out=joined.held_out,
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
            "train_images": joined.train_images,
            "val_images": joined.val_images,
        },
        metrics=history,
        storage_options=config.storage_options,
    )
    return history[-1] if history else {}
