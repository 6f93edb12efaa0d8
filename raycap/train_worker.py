"""One Ray Train DDP worker: its typed config, the epoch loop, validation on rank 0, checkpoints and resume."""

from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch

from raycap import modeldir, schema
from raycap.config import TrainConfig
from raycap.encoder import autocast, resolve_precision
from raycap.ingest import caption_batch
from raycap.metrics import caption_scores
from raycap.model import Captioner, ModelConfig, adam, caption_loss, greedy_search
from raycap.pieces import Piece, WorkerFeatures, feature_array, read_piece, training_rows
from raycap.text import Vocabulary
from raycap.trainset import CAPTIONS, ValImage


@dataclass
class WorkerConfig:
    """Everything a worker needs, built once by the driver and shipped with the training function."""

    settings: TrainConfig  # the user's hyper-parameters (epochs, batch size, learning rate, seed, ...)
    model: ModelConfig  # captioner sizes (vocabulary size from the built vocabulary)
    vocab_json: str  # the vocabulary, serialised (saved in every checkpoint)
    feature_mean: list[float]  # (2048,) per-channel mean of the train features
    feature_std: list[float]  # (2048,) per-channel std of the train features
    total_steps: int  # optimizer steps over all epochs, for the cosine decay
    threads: int  # torch threads of a CPU worker
    resume: str | None = None  # URI of an earlier run's newest checkpoint; None: start fresh
    init_from: str | None = None  # a model directory to start from (fine-tuning) when there is no checkpoint
    pin: dict[str, str] = field(default_factory=dict)  # digests of vocabulary, split, captions (in each checkpoint)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for features and `resume`
    pieces: list[Piece] = field(default_factory=list)  # the feature shards' pieces, dealt out afresh each epoch
    files: list[tuple[str, str]] = field(default_factory=list)  # (feature file, captions file) by index
    val_sample: list[ValImage] = field(default_factory=list)  # what validation scores (rank r: every world-th)
    held_out: tuple[str, ...] = ()  # training images moved to val (a set too small for the hash to pick one)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _features(batch: pa.Table, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(feature_array(batch).astype(np.float32)).to(device)  # (B, 64, C)


def encoded(batch: pa.Table, vocab: Vocabulary, length: int) -> dict[str, list[list[int]]]:
    """A batch's captions as token ids by image id (the captions travel with the features, as text)."""
    ids, caps = batch[schema.IMAGE_ID].to_pylist(), batch[CAPTIONS].to_pylist()
    return {i: [vocab.encode(c, length) for c in cs] for i, cs in zip(ids, caps) if cs}


def val_share(sample: list[ValImage], rank: int, world: int) -> list[ValImage]:
    """The val images a rank holds and decodes: every world-th of the sample, so no rank waits on another's."""
    return sample[rank::world]


def read_val(cfg: WorkerConfig, share: list[ValImage]) -> list[pa.Table]:
    """This rank's val images (image_id, features, split, captions) in batches of 64, read once."""
    wanted: dict[tuple[int, int], list[int]] = {}
    for image in share:
        wanted.setdefault((image.file, image.row_group), []).append(image.row)
    tables = []
    for (file, group), rows in sorted(wanted.items()):
        path, captions = cfg.files[file]
        piece = Piece(path, captions, group, 0, max(rows) + 1)
        columns = [schema.IMAGE_ID, schema.FEATURES]
        tables.append(read_piece(piece, columns, cfg.storage_options).take(pa.array(sorted(rows))))
    table = pa.concat_tables(tables) if tables else None
    return [] if table is None else [table.slice(i, 64) for i in range(0, len(table), 64)]


def validate(
    model: Captioner, val_batches: list[pa.Table], vocab: Vocabulary, length: int, device: torch.device, world: int
) -> dict[str, float]:
    """Teacher-forced val loss, and BLEU-4 / CIDEr of free-running greedy captions of the val sample.

    Each rank decodes its own share; the captions (a few KB) are gathered to every rank, and every rank scores
    them alike: no rank idles at a collective while another scores.
    """
    model.eval()
    total, count, res, refs = 0.0, 0.0, {}, {}
    with torch.no_grad():
        for batch in val_batches:
            ids = batch[schema.IMAGE_ID].to_pylist()
            feats = _features(batch, device)  # (B, 64, C)
            rows, caps, index, weights = caption_batch(ids, encoded(batch, vocab, length))
            if len(rows):
                logits, alphas = model(feats[rows.to(device)], caps.to(device), index.to(device))
                n = float(((caps[:, 1:] != 0).sum(1) * weights).sum())
                total += float(caption_loss(logits, alphas, caps.to(device), weights=weights.to(device))) * n
                count += n
            gen = greedy_search(model, feats, vocab.start_id, vocab.end_id, max_length=20)
            for image_id, n_words, toks in zip(ids, gen.lengths.tolist(), gen.tokens.tolist()):
                res[image_id] = " ".join(vocab.decode(toks[:n_words]))
            refs.update(zip(ids, batch[CAPTIONS].to_pylist()))
    held = len(res)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (total, count, res, refs))
        total, count = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
        res = {k: v for g in gathered for k, v in g[2].items()}
        refs = {k: v for g in gathered for k, v in g[3].items()}
    metrics = {"val_loss": total / max(1.0, count), "val_images_held": held, "val_images_scored": len(res)}
    if res:
        scores = caption_scores(refs, res, java=False)
        metrics.update({"val_bleu4": scores["BLEU-4"], "val_cider": scores["CIDEr"]})
    return metrics


def peak_rss_mb(world: int, device: torch.device) -> float:
    """The largest peak resident memory of any worker so far, in MB."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], device=device)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return round(float(peak.item()), 1)


def more_batches(have: bool, world: int, device: torch.device) -> bool:
    """Whether every worker still has a batch: DDP needs the same number of steps on each (they stop together)."""
    if world == 1:
        return have
    flag = torch.tensor([1 if have else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _checkpoint(cfg: WorkerConfig) -> modeldir.TrainingCheckpoint | None:
    """The checkpoint to continue from, read into memory; None: start fresh.

    Within a run Ray Train hands back the last reported checkpoint after a failure; a rerun of the same
    command starts from the newest checkpoint of the earlier runs (Train V2 has no resume_from_checkpoint).
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            return modeldir.read_checkpoint(d)
    if cfg.resume:
        return modeldir.read_checkpoint(cfg.resume, cfg.storage_options)
    return None


def build_model_and_optimizer(
    cfg: WorkerConfig,
    checkpoint: modeldir.TrainingCheckpoint | None,
    place: Callable[[torch.nn.Module], torch.nn.Module],
) -> tuple[torch.nn.Module, Captioner, torch.optim.Optimizer]:
    """The placed model (`place`: device move and DDP wrap), its bare Captioner, and Adam over the placed parameters.

    The order matters: weights, then `place`, then Adam and its restored state, which load_state_dict casts to
    each parameter's device. Adam restored before the move keeps its state on the CPU, and the first step on a GPU
    after a resume fails on mixed devices.
    """
    model = Captioner(cfg.model)
    model.encoder.set_normalization(torch.tensor(cfg.feature_mean), torch.tensor(cfg.feature_std))
    if checkpoint:
        model.load_state_dict(checkpoint.weights)
    elif cfg.init_from:  # its weights and feature normalisation; its vocabulary is the run's (see train.run)
        model.load_state_dict(modeldir.load_model_dir(cfg.init_from, cfg.storage_options).model.state_dict())
    placed = place(model)
    core: Captioner = placed.module if hasattr(placed, "module") else placed
    optimizer = adam(placed.parameters(), cfg.settings.learning_rate)
    if checkpoint:
        modeldir.load_optimizer(optimizer, checkpoint.optimizer)
    return placed, core, optimizer


def loss_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16, whose small gradients underflow to zero unscaled; a no-op for bf16 and fp32."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: torch.Tensor,
    grad_clip: float,
) -> None:
    """Backward (through the loss scale), clip the global norm of the true gradients, step (skipped on inf/NaN)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the gradients, not the scaled gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_loop_per_worker(cfg: WorkerConfig) -> None:
    """One DDP worker: stream its share of the train features with their captions, learn, validate its share."""
    s = cfg.settings
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(s.seed)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    vocab = Vocabulary.from_json(cfg.vocab_json)
    checkpoint = _checkpoint(cfg)
    model, core, optimizer = build_model_and_optimizer(cfg, checkpoint, ray.train.torch.prepare_model)
    state = checkpoint.state if checkpoint else None
    start_epoch, step = (state["epoch"] + 1, state["step"]) if state else (0, 0)
    history: list[dict[str, Any]] = state["history"] if state else []
    resumed_from = state["epoch"] if state else None
    precision = resolve_precision("auto", device)  # bf16 where native (GPUs, AVX512-BF16/AMX CPUs), else fp16/fp32
    scaler = loss_scaler(precision, device.type)
    world = ctx.get_world_size()
    length = s.max_caption_length + 2
    train_features = WorkerFeatures(  # the training side: images with train captions
        cfg.pieces,
        lambda t: training_rows(t, cfg.held_out),
        rank,
        world,
        s.batch_size,
        s.seed,
        int(s.cache_gb * 2**30),
        cfg.storage_options,
    )
    val_batches: list[pa.Table] | None = None  # this rank's share of the val sample: read once, kept
    setup_rss = peak_rss_mb(world, device)  # what a worker holds before its first step: the data's share of it
    run_started = time.time()  # for the ETA: the mean epoch of this run (validation included) times epochs left
    for epoch in range(start_epoch, s.epochs):
        model.train()
        started, samples, loss_sum, batches, waited = time.time(), 0, 0.0, 0, 0.0
        batches_iter = train_features.batches(epoch)
        while True:
            t = time.time()
            batch = next(batches_iter, None)
            waited += time.time() - t
            if not more_batches(batch is not None, world, device):
                break
            ids = batch[schema.IMAGE_ID].to_pylist()
            rows, caps, index, weights = caption_batch(ids, encoded(batch, vocab, length))
            feats = _features(batch, device)[rows.to(device)]  # (M, 64, 2048)
            caps, index, weights = caps.to(device), index.to(device), weights.to(device)
            for group in optimizer.param_groups:
                group["lr"] = s.learning_rate * lr_factor(step, s.warmup_steps, cfg.total_steps)
            with autocast(precision, device.type):
                logits, alphas = model(feats, caps, index, packed=True)  # (K, V): real tokens only
                loss = caption_loss(logits, alphas, caps, s.attention_penalty, weights)
            optimizer_step(model, optimizer, scaler, loss, s.grad_clip)
            step += 1
            batches += 1
            samples += int(weights.sum())
            loss_sum += float(loss.detach())
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(1, batches),
            "samples_per_second": samples * world / (time.time() - started),
            "input_wait_fraction": waited / max(1e-9, time.time() - started),
        }
        if resumed_from is not None:
            metrics["resumed_from_epoch"], resumed_from = resumed_from, None
        if val_batches is None:
            val_batches = read_val(cfg, val_share(cfg.val_sample, rank, world))
        metrics.update(validate(core, val_batches, vocab, length, device, world))
        metrics["worker_setup_rss_mb"], metrics["worker_peak_rss_mb"] = setup_rss, peak_rss_mb(world, device)
        if rank == 0:
            metrics["epoch_seconds"] = time.time() - started
            per_epoch = (time.time() - run_started) / (epoch - start_epoch + 1)
            metrics["eta_seconds"] = round(per_epoch * (s.epochs - epoch - 1))
            history.append(metrics)
            # Written, not printed: Ray Train's patched print would show the line twice (stdout and its logger).
            sys.stdout.write(
                "epoch "
                + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
                + "\n"
            )
            sys.stdout.flush()
            with tempfile.TemporaryDirectory() as d:
                saved = {"epoch": epoch, "step": step, "history": history, "pin": cfg.pin}
                modeldir.write_checkpoint(d, core, optimizer, saved, cfg.vocab_json)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
