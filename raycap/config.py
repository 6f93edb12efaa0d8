"""Per-job configuration dataclasses with a comment on each default; `validate` raises ValueError early."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from raycap import schema, sources, storage
from raycap.images import DEFAULT_MAX_PIXELS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # --precision (what each resolves to: encoder.select_precision)

VERBOSE_ENV = "RAYCAP_VERBOSE"  # 1: show Ray's own log lines too (as --verbose does)


def verbose() -> bool:
    """Whether the user asked for Ray's own log lines (--verbose or RAYCAP_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return value


def require_exists(location: str, flag: str, storage_options: dict[str, Any] | None = None, missing: str = "") -> None:
    """One ValueError line naming `flag` when `location` (a path or URI) is missing (`missing`, if given) or
    cannot be checked."""
    try:
        found = storage.exists(location, storage_options)
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the URI
        raise ValueError(f"{flag} {location}: cannot read ({type(e).__name__}: {storage.one_line(e)})") from None
    if not found:
        raise ValueError(missing or f"{flag} does not exist: {location}")


def _check_weights(weights: str, storage_options: dict[str, Any]) -> None:
    if weights not in ("imagenet", "random"):
        require_exists(weights, "--encoder-weights (imagenet, random or a state dict file)", storage_options)


@dataclass
class PipelineConfig:
    """Settings shared by the two image pipelines (extract and caption)."""

    input: str  # folder or s3:// prefix of images, tars or Parquet files (recursive), or an index file of URIs
    output: str  # output root; rerunning into the same root resumes
    input_format: str = "auto"  # files | webdataset | parquet | list | auto (decided from what the listing finds)
    keep_columns: tuple[str, ...] = ()  # store fields carried into every output row (webdataset: txt, json fields)
    image_key: str | None = None  # webdataset: the image member's extension (default: first of jpg, png, ...)
    image_column: str | None = None  # parquet: the image column (default: the one struct<bytes, path> or binary)
    id_column: str | None = None  # parquet: the column of image ids (default FILE/ROW)
    path_column: str = "path"  # list: the index's column of URIs
    shard_size: int | None = None  # images per output shard (retry, resume, file); None: ~8 per actor, 32..256
    batch_size: int | None = None  # images per model forward; None: 16 on CPU, 128 on GPU
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs and CPUs that have it, fp16 on older GPUs)
    decode: str = "auto"  # cpu | device | auto: where JPEGs are decoded (auto: on the model's GPU when it has one)
    actors: tuple[int, int] | None = None  # (min, max) model actors; None: one per GPU, or sized to CPUs
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_errors: int | None = None  # fail fast after this many bad images (None: never)
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images before decoding (decompression bombs)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to s3fs/fsspec
    address: str | None = None  # Ray address; None starts an embedded local Ray
    plan_only: bool = False  # list the input, write the plan, print its size; no Ray, no model
    incremental: bool = False  # relist the input on a rerun and plan new shards for files added since

    def source(self) -> sources.SourceSpec:
        """The input store as the sources see it."""
        return sources.SourceSpec(
            self.input_format, self.image_key, self.image_column, self.id_column, self.path_column, self.keep_columns
        )

    def validate(self) -> None:
        if self.input_format not in sources.FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(sources.FORMATS)}, got {self.input_format!r}")
        reserved = set(schema.features_schema().names) | set(schema.CAPTIONS_SCHEMA.names)
        clash = [c for c in self.keep_columns if c in reserved or not c]
        if clash:
            raise ValueError(f"--keep-columns cannot name an output column: {clash[0]!r}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.decode not in ("cpu", "device", "auto"):
            raise ValueError(f"--decode must be cpu, device or auto, got {self.decode!r}")
        if self.actors is not None and not (1 <= self.actors[0] <= self.actors[1]):
            raise ValueError(f"--actors must be N or MIN:MAX with 1 <= MIN <= MAX, got {self.actors}")
        if self.max_errors is not None and self.max_errors < 0:
            raise ValueError("--max-errors must be >= 0")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if os.path.abspath(self.input) == os.path.abspath(self.output) and "://" not in self.input:
            raise ValueError("--output must differ from --input")
        require_exists(self.input, "--input", self.storage_options)


@dataclass
class ExtractConfig(PipelineConfig):
    encoder_weights: str = "imagenet"  # imagenet | random | PATH to a state dict
    feature_dtype: str = "float16"  # storage dtype of the 64x2048 tensors (float16 halves the bytes)
    compression: str = "none"  # Parquet compression of feature shards (features barely compress; see bench)

    def validate(self) -> None:
        super().validate()
        _check_weights(self.encoder_weights, self.storage_options)
        if self.feature_dtype not in ("float16", "float32"):
            raise ValueError(f"--feature-dtype must be float16 or float32, got {self.feature_dtype!r}")


@dataclass
class CaptionConfig(PipelineConfig):
    model: str = ""  # a model directory written by `raycap train`
    beam_size: int = 3  # beams per image; 1 is greedy decoding
    max_length: int = 20  # words per caption at most
    length_penalty: float = 1.0  # beam score = log-prob / length**penalty

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ValueError("--model is required")
        if self.beam_size < 1:
            raise ValueError(f"--beam-size must be >= 1, got {self.beam_size}")
        if self.max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {self.max_length}")
        require_exists(self.model, "--model", self.storage_options)


@dataclass
class TrainConfig:
    features: str  # output root of `raycap extract`
    captions: str  # COCO captions JSON, CSV/Parquet of (file_name or path, caption), or an extract output folder
    output: str  # model directory to write; rerunning with the same output resumes
    init_from: str | None = None  # a model directory to fine-tune (its vocabulary and sizes kept); None: fresh
    caption_column: str = "txt"  # with --captions FOLDER: the kept text column of its feature rows
    split_file: str | None = None  # splits.json with train/val file names; None: a seeded 95/5 split by image
    epochs: int = 5  # passes over the training images
    val_images: int = 2000  # val images scored each epoch at most (a seeded sample of the val split)
    workers: int = 2  # DDP workers (one GPU each when the cluster has GPUs)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    batch_size: int = 64  # images per worker per step (each brings all its captions)
    learning_rate: float = 2e-3  # Adam peak learning rate (after warm-up, cosine decay to 10%)
    warmup_steps: int = 50  # linear warm-up steps
    grad_clip: float = 5.0  # clip the global gradient norm
    attention_penalty: float = 0.0  # doubly stochastic attention λ (Show, Attend and Tell); 0 = tutorial
    init_state: bool = False  # GRU state starts from the mean region (Show, Attend and Tell); False = tutorial
    vocab_size: int = 5000  # top-k words incl. specials
    max_caption_length: int = 30  # words per training caption at most (longer ones are cut)
    max_captions: int | None = None  # keep a seeded share of about this many captions (the tutorial's subset)
    embedding_dim: int = 256  # E
    units: int = 512  # H
    cache_gb: float = 0.0  # >0: a worker keeps its share in memory after epoch 0 if it fits (0: stream each epoch)
    seed: int = 0  # shuffling, splits, init
    max_failures: int = 2  # restarts from the last checkpoint when a worker dies
    storage_options: dict[str, Any] = field(default_factory=dict)
    address: str | None = None  # Ray address; None starts an embedded local Ray

    def validate(self) -> None:
        for name in ("epochs", "workers", "batch_size", "vocab_size", "max_caption_length", "val_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError("--learning-rate must be > 0")
        if self.attention_penalty < 0:
            raise ValueError("--attention-penalty must be >= 0")
        if self.cache_gb < 0:
            raise ValueError("--cache-gb must be >= 0")
        require_exists(
            storage.join(self.features, schema.FEATURES_DIR),
            "--features",
            self.storage_options,
            f"--features {self.features} has no {schema.FEATURES_DIR}/ (run `raycap extract` first)",
        )
        require_exists(self.captions, "--captions", self.storage_options)
        if self.split_file:
            require_exists(self.split_file, "--split-file", self.storage_options)
        if self.init_from:
            require_exists(self.init_from, "--init-from", self.storage_options)
