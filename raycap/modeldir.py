"""The model directory and the training checkpoint formats, on any URI; a model appears whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from raycap import storage
from raycap.model import Captioner, ModelConfig
from raycap.text import Vocabulary

WEIGHTS = "model.safetensors"  # the captioner's state dict (model directory and checkpoints)
VOCAB = "vocab.json"  # the vocabulary (model directory and checkpoints)
CONFIG = "config.json"  # model sizes, encoder weights, preprocessing, feature dtype, training summary
METRICS = "metrics.jsonl"  # one line of metrics per epoch
COMMIT = "commit.json"  # written last: the model id and every file's size and hash; readers require it
STATE = "state.json"  # checkpoint: epoch, step and the metrics history so far
OPTIMIZER = "optimizer.safetensors"  # checkpoint: Adam state (tensors) with its param groups as metadata
CHECKPOINT_FILES = (WEIGHTS, OPTIMIZER, STATE, VOCAB)


@dataclass
class LoadedModel:
    model: Captioner
    vocab: Vocabulary
    config: dict[str, Any]  # everything in config.json: model sizes, encoder weights, preprocessing
    model_id: str  # short hash of the weights and vocabulary


def model_id(weights: bytes, vocab: bytes) -> str:
    return hashlib.sha256(weights + vocab).hexdigest()[:16]


def _state_bytes(model: torch.nn.Module) -> bytes:
    return save_tensors({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()})


def write_model_dir(
    location: str,
    model: Captioner,
    vocab: Vocabulary,
    extra: dict[str, Any],
    metrics: list[dict[str, Any]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write weights, vocabulary, config (and metrics) to a local path or URI, then the commit file; returns the id.

    Locally the files go to a temporary sibling that is swapped into place. Elsewhere (S3 has no rename)
    an existing commit file is removed first, the files are written, and the commit file comes last, so a
    reader (`load_model_dir`) sees the old model, an error, or the new model, never a mix.
    """
    files = {
        WEIGHTS: _state_bytes(model),
        VOCAB: vocab.to_json().encode(),
        CONFIG: (json.dumps({"model": model.config.to_dict(), **extra}, indent=2, sort_keys=True) + "\n").encode(),
    }
    if metrics is not None:
        files[METRICS] = "".join(json.dumps(m) + "\n" for m in metrics).encode()
    mid = model_id(files[WEIGHTS], files[VOCAB])
    commit = {
        "model_id": mid,
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        },
    }
    commit_bytes = (json.dumps(commit, indent=2, sort_keys=True) + "\n").encode()
    fs, path = storage.filesystem(location, storage_options)
    if storage.is_local(fs):
        _swap_local(path, {**files, COMMIT: commit_bytes})
        return mid
    commit_path = storage.join(path, COMMIT)
    fs.invalidate_cache(path)  # a listing cached earlier in this process must not hide the old commit file
    if fs.exists(commit_path):
        fs.rm_file(commit_path)
    for name, data in files.items():
        fs.pipe_file(storage.join(path, name), data)
    fs.pipe_file(commit_path, commit_bytes)
    return mid


def _swap_local(path: str, files: dict[str, bytes]) -> None:
    """Write `files` into a temporary sibling of `path`, then rename it into place (replacing an older one)."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    if os.path.isdir(path):
        old = tempfile.mkdtemp(prefix=".old-model-", dir=parent)
        os.replace(path, os.path.join(old, "m"))
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def load_model_dir(
    location: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a committed model directory from a local path or URI; anything else is one ValueError line."""
    fs, path = storage.filesystem(location, storage_options)
    fs.invalidate_cache(path)
    try:
        commit = json.loads(fs.cat_file(storage.join(path, COMMIT)))
    except FileNotFoundError:
        if not fs.exists(path):
            raise ValueError(f"--model {location}: no such model directory") from None
        raise ValueError(
            f"--model {location} is not a raycap model directory, or not a complete one (no {COMMIT}: "
            "still being written, interrupted, or not written by `raycap train`)"
        ) from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the URI
        raise ValueError(f"--model {location}: cannot read ({type(e).__name__}: {storage.one_line(e)})") from None
    files = {}
    for name in (WEIGHTS, VOCAB, CONFIG):
        data = storage.read_bytes(storage.join(location, name), storage_options, "--model")
        expected = commit["files"].get(name, {})
        if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise ValueError(f"--model {location}: {name} does not match {COMMIT} (rewritten while being read?)")
        files[name] = data
    try:
        config = json.loads(files[CONFIG])
        vocab = Vocabulary.from_json(files[VOCAB].decode())
        model = Captioner(ModelConfig(**config["model"]))
        model.load_state_dict(load_tensors(files[WEIGHTS]))
    except Exception as e:  # noqa: BLE001 - one clear line for a user-supplied path
        raise ValueError(f"--model {location} cannot be loaded: {type(e).__name__}: {e}") from None
    return LoadedModel(model.to(device).eval(), vocab, config, model_id(files[WEIGHTS], files[VOCAB]))


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """Adam state as safetensors (tensors) + JSON metadata (hyper-parameters): no pickle in checkpoints."""
    state = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v.detach().cpu().contiguous() for pid, s in state["state"].items() for k, v in s.items()}
    return save_tensors(tensors, metadata={"param_groups": json.dumps(state["param_groups"])})


def load_optimizer(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 length + JSON header
    state: dict[int, dict[str, torch.Tensor]] = {}
    tensors = load_tensors(data)  # in file order: sorted back into parameter order below
    for key in sorted(tensors, key=lambda k: (int(k.split(".", 1)[0]), k)):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = tensors[key]
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["__metadata__"]["param_groups"])})


def write_checkpoint(
    directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], vocab_json: str
) -> None:
    """A training checkpoint in a local folder (Ray Train uploads it to the run's storage)."""
    files = {
        WEIGHTS: _state_bytes(model),
        OPTIMIZER: optimizer_bytes(optimizer),
        STATE: json.dumps(state).encode(),
        VOCAB: vocab_json.encode(),
    }
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def read_checkpoint_state(location: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state of a checkpoint at a local path or URI: {"epoch", "step", "history"}."""
    return json.loads(storage.read_bytes(storage.join(location, STATE), storage_options, "checkpoint"))


def read_checkpoint_weights(location: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    return load_tensors(storage.read_bytes(storage.join(location, WEIGHTS), storage_options, "checkpoint"))


@dataclass
class TrainingCheckpoint:
    """A checkpoint read into memory, to apply in the order training needs (weights, device move, optimizer)."""

    weights: dict[str, torch.Tensor]  # the captioner's state dict (on the CPU)
    optimizer: bytes  # Adam's state, as `optimizer_bytes` wrote it (load with `load_optimizer`)
    state: dict[str, Any]  # {"epoch", "step", "history"}


def read_checkpoint(location: str, storage_options: dict[str, Any] | None = None) -> TrainingCheckpoint:
    """A checkpoint at a local path or URI, read whole: usable after a temporary checkpoint folder is gone."""
    return TrainingCheckpoint(
        read_checkpoint_weights(location, storage_options),
        storage.read_bytes(storage.join(location, OPTIMIZER), storage_options, "checkpoint"),
        read_checkpoint_state(location, storage_options),
    )


def run_checkpoints(run_root: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Every complete checkpoint of every run under `run_root`, as (URI, state), oldest epoch first."""
    fs, root = storage.filesystem(run_root, storage_options)
    fs.invalidate_cache()  # listings cached earlier in this process would hide newer checkpoints
    found: dict[str, set[str]] = {}
    for path in fs.glob(storage.join(root, "*", "checkpoint_*", "*")):
        folder, name = path.rsplit("/", 1)
        found.setdefault(folder, set()).add(name)
    complete = [folder for folder, names in found.items() if set(CHECKPOINT_FILES) <= names]  # not cut short
    states = [(storage.uri(fs, f), json.loads(fs.cat_file(storage.join(f, STATE)))) for f in sorted(complete)]
    return sorted(states, key=lambda cs: cs[1]["epoch"])


def latest_checkpoint(run_root: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The URI of the newest complete checkpoint (highest epoch) of any run under `run_root`, on any filesystem."""
    found = run_checkpoints(run_root, storage_options)
    return found[-1][0] if found else None


def best_checkpoint(run_root: str, pin: dict[str, str], storage_options: dict[str, Any] | None = None) -> str | None:
    """The URI of the checkpoint with the highest val CIDEr among every run under `run_root` trained with `pin`."""
    scored = []
    for uri, state in run_checkpoints(run_root, storage_options):
        if state.get("pin") != pin:
            continue  # trained on other inputs (a rerun on them is refused): never the model of these
        epochs = [m for m in state.get("history", []) if m.get("epoch") == state["epoch"]]
        cider = epochs[-1].get("val_cider", float("-inf")) if epochs else float("-inf")
        scored.append((cider, state["epoch"], uri))
    return max(scored)[2] if scored else None


def pin_mismatch(state: dict[str, Any], pin: dict[str, str]) -> list[str]:
    """What differs between the inputs a checkpoint was trained on (its state's pin) and `pin`: [] when they match."""
    stored = state.get("pin") or {}
    return [name for name in pin if stored.get(name) != pin[name]]
