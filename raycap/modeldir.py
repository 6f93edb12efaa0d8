"""The model directory: safetensors weights, vocabulary and config, written atomically; its id."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raycap.model import Captioner, ModelConfig
from raycap.text import Vocabulary

WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"
CONFIG = "config.json"


@dataclass
class LoadedModel:
    model: Captioner
    vocab: Vocabulary
    config: dict[str, Any]  # everything in config.json: model sizes, encoder weights, preprocessing
    model_id: str  # short hash of the weights and vocabulary


def write_model_dir(path: str, model: Captioner, vocab: Vocabulary, extra: dict[str, Any]) -> None:
    """Write weights + vocabulary + config into a temporary sibling, then swap it into place."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, VOCAB), "w") as f:
        f.write(vocab.to_json())
    config = {"model": model.config.to_dict(), **extra}
    with open(os.path.join(tmp, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if os.path.isdir(path):
        old = tempfile.mkdtemp(prefix=".old-model-", dir=parent)
        os.replace(path, os.path.join(old, "m"))
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def model_id(path: str) -> str:
    h = hashlib.sha256()
    for name in (WEIGHTS, VOCAB):
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_model_dir(path: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model directory; a clear ValueError when it is missing or not a raycap model."""
    for name in (WEIGHTS, VOCAB, CONFIG):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"--model {path!r} is not a raycap model directory (missing {name})")
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
        with open(os.path.join(path, VOCAB)) as f:
            vocab = Vocabulary.from_json(f.read())
        model = Captioner(ModelConfig(**config["model"]))
        model.load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    except Exception as e:  # noqa: BLE001 - one clear line for a user-supplied path
        raise ValueError(f"--model {path!r} cannot be loaded: {type(e).__name__}: {e}") from None
    return LoadedModel(model.to(device).eval(), vocab, config, model_id(path))
