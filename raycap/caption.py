"""The caption pipeline: images -> encoder + decoder in one actor -> captions, scores, attention Parquet."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from raycap import pipeline, schema, stages
from raycap.config import CaptionConfig
from raycap.encoder import EncoderWeights, FeatureExtractor, autocast, resolve_weights
from raycap.model import beam_search
from raycap.modeldir import LoadedModel, load_model_dir


class CaptionModel(stages.ShardModel):
    """Actor: InceptionV3 and the captioner on one device; features never leave the actor."""

    def __init__(
        self,
        model: str,
        weights: ray.ObjectRef | EncoderWeights | str,
        beam_size: int,
        max_length: int,
        length_penalty: float,
        precision: str,
        storage_options: dict | None = None,
        **stage: Any,
    ) -> None:
        super().__init__(**stage)
        loaded = load_model_dir(model, storage_options)  # from its URI, once per actor
        self.extractor = FeatureExtractor(pipeline.resolved(weights), precision=precision, batch_size=self.batch_size)
        self.device = self.extractor.device
        loaded.model.to(self.device)
        self.model, self.vocab, self.model_id = loaded.model, loaded.vocab, loaded.model_id
        self.feature_dtype = getattr(torch, loaded.config.get("feature_dtype", "float16"))
        self.beam_size, self.max_length, self.length_penalty = beam_size, max_length, length_penalty

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        captions, tokens, scores, attention = [], [], [], []
        step = self.extractor.batch_size
        for i in range(0, len(pixels), step):
            # Round through the stored feature dtype: the decoder sees what it saw in training.
            features = self.extractor(pixels[i : i + step]).to(self.feature_dtype).float()  # (b, 64, 2048)
            # The decoder autocasts on GPUs only (bf16, or fp16 where the GPU lacks bf16); on a CPU it runs in fp32.
            device_type = self.extractor.device.type
            with autocast(self.extractor.precision if device_type == "cuda" else "fp32", device_type):
                gen = beam_search(
                    self.model,
                    features,
                    self.vocab.start_id,
                    self.vocab.end_id,
                    beam_size=self.beam_size,
                    max_length=self.max_length,
                    length_penalty=self.length_penalty,
                )
            lengths = gen.lengths.tolist()
            ids = gen.tokens.cpu().numpy()
            att = gen.attention.to(torch.float16).cpu().numpy()  # (b, T, 64)
            for j, n in enumerate(lengths):
                words = [self.vocab.tokens[t] for t in ids[j, :n]]
                tokens.append(words)
                captions.append(" ".join(words))
                attention.append(att[j, :n])
            scores.extend(gen.scores.float().cpu().tolist())
        return pa.table(
            {
                schema.IMAGE_ID: meta[schema.IMAGE_ID],
                schema.PATH: meta[schema.PATH],
                schema.CAPTION: captions,
                schema.TOKENS: tokens,
                schema.SCORE: pa.array(scores, pa.float32()),
                schema.ATTENTION: _attention_column(attention),
                schema.WIDTH: meta[schema.WIDTH],
                schema.HEIGHT: meta[schema.HEIGHT],
                schema.MODEL_ID: [self.model_id] * len(captions),
            },
            schema=schema.CAPTIONS_SCHEMA,
        )


def _attention_column(rows: list[np.ndarray]) -> pa.Array:
    """(T_i, 64) float16 arrays -> list<fixed_size_list<float16, 64>> without Python-level loops over values."""
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(rows).reshape(-1) if len(rows) else np.zeros(0, np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), schema.NUM_REGIONS)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def prepare(config: CaptionConfig) -> tuple[LoadedModel, EncoderWeights]:
    """What the job needs before any actor starts, found on the driver without Ray: the model directory (one
    line if it is unreadable, not an error inside an actor) and the encoder it was trained on, resolved once."""
    config.validate()
    loaded = load_model_dir(config.model, config.storage_options)
    return loaded, resolve_weights(loaded.config.get("encoder_weights", "imagenet"), config.storage_options)


def run(config: CaptionConfig, prepared: tuple[LoadedModel, EncoderWeights] | None = None) -> dict:
    """Caption every image under `config.input` into `config.output`; returns the manifest."""
    loaded, weights = prepared or prepare(config)
    weights = ray.put(weights)
    job = pipeline.ShardJob.from_config(
        config,
        rows_dir=schema.CAPTIONS_DIR,
        model_cls=CaptionModel,
        model_kwargs={
            "model": config.model,
            "weights": weights,
            "beam_size": config.beam_size,
            "max_length": config.max_length,
            "length_penalty": config.length_penalty,
            "precision": config.precision,
            "storage_options": config.storage_options,
        },
        compression="zstd",
        row_bytes=(config.max_length + 1) * schema.NUM_REGIONS * 2 + 512,  # float16 attention + text
        manifest={
            "job": "caption",
            "model": config.model,
            "model_id": loaded.model_id,
            "encoder_weights": loaded.config.get("encoder_weights"),
            "beam_size": config.beam_size,
            "max_length": config.max_length,
            "precision": config.precision,
        },
    )
    return pipeline.run(job)
