"""The training job: features + captions -> a model directory, with Ray Train DDP, checkpoints and resume."""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from raycap import schema, storage
from raycap.config import TrainConfig, verbose
from raycap.evaluate import caption_scores
from raycap.ingest import (
    WorkerFeatures,
    caption_batch,
    feature_statistics,
    id_set,
    keep_ids,
    load_captions,
    split_images,
)
from raycap.model import Captioner, ModelConfig, caption_loss, greedy_search
from raycap.modeldir import write_model_dir
from raycap.text import Vocabulary

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _features(batch: pa.Table, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(schema.features_to_numpy(batch[schema.FEATURES]).astype(np.float32)).to(device)


def _validate(model: Captioner, val_batches: list[pa.Table], captions: dict[str, list[list[int]]],
              refs: dict[str, list[str]], vocab: Vocabulary, device: torch.device) -> dict[str, float]:
    """Teacher-forced val loss, and BLEU-4 / CIDEr of free-running greedy captions over the whole val split."""
    model.eval()
    total, count, res = 0.0, 0, {}
    with torch.no_grad():
        for batch in val_batches:
            ids = batch[schema.IMAGE_ID].to_pylist()
            feats = _features(batch, device)
            rows, caps, index, weights = caption_batch(ids, captions)
            if len(rows):
                logits, alphas = model(feats[rows.to(device)], caps.to(device), index.to(device))
                n = float(((caps[:, 1:] != 0).sum(1) * weights).sum())
                total += float(caption_loss(logits, alphas, caps.to(device), weights=weights.to(device))) * n
                count += n
            gen = greedy_search(model, feats, vocab.start_id, vocab.end_id, max_length=20)
            for image_id, toks, length in zip(ids, gen.tokens.tolist(), gen.lengths.tolist()):
                res[image_id] = " ".join(vocab.tokens[t] for t in toks[:length])
    metrics = {"val_loss": total / max(1, count)}
    res = {k: v for k, v in res.items() if k in refs}
    if res:
        scores = caption_scores({k: refs[k] for k in res}, res, java=False)
        metrics.update({"val_bleu4": scores["BLEU-4"], "val_cider": scores["CIDEr"]})
    return metrics


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One DDP worker: stream its share of the train features, pair them with their captions, learn."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    vocab = Vocabulary.from_json(cfg["vocab"])
    model = Captioner(ModelConfig(**cfg["model"]))
    model.encoder.set_normalization(torch.tensor(cfg["feature_mean"]), torch.tensor(cfg["feature_std"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"])
    start_epoch, step, history, resumed_from = 0, 0, [], None
    # Within a run Ray Train hands back the last reported checkpoint after a failure; a rerun of the same
    # command starts from the newest checkpoint of the earlier runs (Train V2 has no resume_from_checkpoint).
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(cfg["resume"]) if cfg["resume"] else None)
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            _load_optimizer(optimizer, os.path.join(d, OPTIMIZER))
            with open(os.path.join(d, STATE)) as f:
                state = json.load(f)
            start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
            resumed_from = state["epoch"]
    model = ray.train.torch.prepare_model(model)
    core: Captioner = model.module if hasattr(model, "module") else model
    captions = cfg["captions"]
    train_features = WorkerFeatures(ray.train.get_dataset_shard("train"), cfg["batch_size"], cfg["seed"],
                                    int(cfg["cache_gb"] * 2**30))
    val_shard = ray.train.get_dataset_shard("val")
    val_batches: list[pa.Table] | None = None  # the val split is small: read once, kept by rank 0
    autocast = device.type == "cuda"
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        started, samples, loss_sum, batches, waited = time.time(), 0, 0.0, 0, 0.0
        batches_iter = train_features.batches(epoch)
        while True:
            t = time.time()
            batch = next(batches_iter, None)
            waited += time.time() - t
            if batch is None:
                break
            rows, caps, index, weights = caption_batch(batch[schema.IMAGE_ID].to_pylist(), captions)
            feats = _features(batch, device)[rows.to(device)]  # (M, 64, 2048)
            caps, index, weights = caps.to(device), index.to(device), weights.to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg["learning_rate"] * lr_factor(step, cfg["warmup_steps"], cfg["total_steps"])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits, alphas = model(feats, caps, index)
                loss = caption_loss(logits, alphas, caps, cfg["attention_penalty"], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            step += 1
            batches += 1
            samples += int(weights.sum())
            loss_sum += float(loss.detach())
        metrics: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, batches),
                                   "samples_per_second": samples * ctx.get_world_size() / (time.time() - started),
                                   "input_wait_fraction": waited / max(1e-9, time.time() - started)}
        if resumed_from is not None:
            metrics["resumed_from_epoch"], resumed_from = resumed_from, None
        if rank == 0:
            if val_batches is None:
                val_batches = list(val_shard.iter_batches(batch_size=64, batch_format="pyarrow"))
            metrics.update(_validate(core, val_batches, cfg["val_captions"], cfg["val_refs"], vocab, device))
            history.append(metrics)
            # Written, not printed: Ray Train's patched print would show the line twice (stdout and its logger).
            sys.stdout.write("epoch " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in metrics.items()) + "\n")
            sys.stdout.flush()
            with tempfile.TemporaryDirectory() as d:
                save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()},
                          os.path.join(d, "model.safetensors"))
                _save_optimizer(optimizer, os.path.join(d, OPTIMIZER))
                with open(os.path.join(d, STATE), "w") as f:
                    json.dump({"epoch": epoch, "step": step, "history": history}, f)
                with open(os.path.join(d, "vocab.json"), "w") as f:
                    f.write(cfg["vocab"])
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _save_optimizer(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Adam state as safetensors (tensors) + JSON (hyper-parameters): no pickle in checkpoints."""
    state = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.detach().cpu().contiguous() for pid, s in state["state"].items()
               for k, v in s.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(state["param_groups"])})


def _load_optimizer(optimizer: torch.optim.Optimizer, path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = f.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _latest_checkpoint(run_root: str) -> str | None:
    """The newest checkpoint (highest epoch) of any earlier run into the same output: resume from it."""
    best, best_epoch = None, -1
    for state_path in glob.glob(os.path.join(run_root, "*", "checkpoint_*", STATE)):
        with open(state_path) as f:
            epoch = json.load(f)["epoch"]
        if epoch > best_epoch:
            best, best_epoch = os.path.dirname(state_path), epoch
    return best


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) and write the model directory; returns the final metrics."""
    config.validate()
    fs, features_root = storage.filesystem(config.features, config.storage_options)
    features_dir = storage.join(features_root, schema.FEATURES_DIR)
    if not fs.exists(features_dir):
        raise ValueError(f"--features {config.features!r} has no {schema.FEATURES_DIR}/ (run `raycap extract` first)")
    if os.path.abspath(config.output).startswith(os.path.abspath(features_root) + os.sep):
        raise ValueError("--output must not be inside --features")
    captions = load_captions(config.captions, config.max_captions, config.seed)
    available = set(pq.read_table(features_dir, columns=[schema.IMAGE_ID], filesystem=fs)[schema.IMAGE_ID]
                    .to_pylist()) if storage.is_local(fs) else set(captions)
    paired = [i for i in captions if i in available]
    if not paired:
        raise ValueError(f"no image in --captions has features in {config.features!r} (ids must match file names)")
    train_ids, val_ids = split_images(paired, config.split_file, config.seed)
    if not train_ids:
        raise ValueError("the training split is empty")
    vocab = Vocabulary.build((c for i in train_ids for c in captions[i]), config.vocab_size)
    encode = {i: [vocab.encode(c, config.max_caption_length + 2) for c in captions[i]] for i in train_ids}
    val_encode = {i: [vocab.encode(c, config.max_caption_length + 2) for c in captions[i]] for i in val_ids}
    manifest_path = storage.join(features_root, schema.MANIFEST_FILE)
    extract_manifest = storage.read_json(fs, manifest_path) if fs.exists(manifest_path) else {}
    mean, std = feature_statistics(fs, features_dir, set(train_ids))
    model_cfg = ModelConfig(vocab_size=len(vocab), embedding_dim=config.embedding_dim, units=config.units,
                            init_state=config.init_state)
    world = config.workers
    steps_per_epoch = math.ceil(len(train_ids) / world / config.batch_size)
    filesystem = None if storage.is_local(fs) else fs
    base = ray.data.read_parquet(features_dir, filesystem=filesystem).select_columns([schema.IMAGE_ID, schema.FEATURES])
    # Blocks of 64 images (16 MB) whatever the shard size, so the split hands both workers data early and evenly.
    train_ds = base.map_batches(keep_ids, fn_kwargs={"ids": id_set(train_ids)}, batch_format="pyarrow", batch_size=64)
    val_ds = base.map_batches(keep_ids, fn_kwargs={"ids": id_set(val_ids)}, batch_format="pyarrow", batch_size=64)
    run_root = os.path.join(os.path.abspath(config.output) + ".runs")
    resume = _latest_checkpoint(run_root)
    resources = ray.cluster_resources()
    use_gpu = config.use_gpu if config.use_gpu is not None else resources.get("GPU", 0) >= world
    # Workers must leave a CPU for Ray Data's read tasks, or the ingest waits forever for a free CPU.
    worker_cpus = 1.0 if use_gpu else max(0.25, min(1.0, (resources.get("CPU", 1) - 1) / world))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "seed": config.seed, "vocab": vocab.to_json(), "model": model_cfg.to_dict(), "captions": encode,
            "val_captions": val_encode, "val_refs": {i: captions[i] for i in val_ids},
            "epochs": config.epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "warmup_steps": config.warmup_steps, "total_steps": steps_per_epoch * config.epochs,
            "grad_clip": config.grad_clip, "attention_penalty": config.attention_penalty,
            "threads": max(1, int(resources.get("CPU", 1)) // world),
            "feature_mean": mean.tolist(), "feature_std": std.tolist(), "resume": resume,
            "cache_gb": config.cache_gb,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": worker_cpus}),
        run_config=ray.train.RunConfig(
            name=time.strftime("run-%Y%m%d-%H%M%S"),
            storage_path=run_root,
            # The best checkpoint by val CIDEr is kept (and becomes MODEL/), and Ray always keeps the latest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_cider", checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "ERROR"),  # see cli.quiet_ray
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_cider", float("-inf")))
    final = ranked[-1][0] if ranked else result.checkpoint or (ray.train.Checkpoint(resume) if resume else None)
    if final is None:
        raise RuntimeError("training produced no checkpoint")
    with (result.checkpoint or final).as_directory() as d, open(os.path.join(d, STATE)) as f:
        history = json.load(f)["history"]  # the latest checkpoint holds every epoch's metrics
    with final.as_directory() as d:
        model = Captioner(model_cfg)
        model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    write_model_dir(config.output, model, vocab, {
        "encoder_weights": extract_manifest.get("encoder_weights", "imagenet"),
        "feature_dtype": extract_manifest.get("feature_dtype", "float16"),
        "preprocessing": extract_manifest.get("preprocessing", "resize 299x299 bilinear, pixels/127.5 - 1"),
        "epochs": len(history), "train_images": len(train_ids), "val_images": len(val_ids),
    })
    with open(os.path.join(config.output, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in history)
    return history[-1] if history else {}

