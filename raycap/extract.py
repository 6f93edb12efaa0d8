"""The extract pipeline: images -> InceptionV3 region features -> feature Parquet shards (Ray Data)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from raycap import pipeline, schema, stages
from raycap.config import ExtractConfig
from raycap.encoder import EncoderWeights, FeatureExtractor, resolve_precision, resolve_weights


class FeatureModel(stages.ShardModel):
    """Actor: holds InceptionV3 on its device; decoded uint8 shards in, feature rows out."""

    def __init__(
        self, weights: ray.ObjectRef | EncoderWeights | str, precision: str, feature_dtype: str, **stage: Any
    ) -> None:
        super().__init__(**stage)
        self.extractor = FeatureExtractor(pipeline.resolved(weights), precision=precision, batch_size=self.batch_size)
        self.device = self.extractor.device
        self.feature_dtype = feature_dtype

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        features = self.extractor(pixels).to(getattr(torch, self.feature_dtype)).cpu().numpy()  # (N, 64, 2048)
        return pa.table(
            [
                meta[schema.IMAGE_ID],
                meta[schema.PATH],
                schema.features_to_arrow(features, self.feature_dtype),
                meta[schema.WIDTH],
                meta[schema.HEIGHT],
            ],
            schema=schema.features_schema(self.feature_dtype),
        )


def prepare(config: ExtractConfig) -> EncoderWeights:
    """What the job needs before any actor starts, found on the driver without Ray: the encoder's weights,
    resolved once (a failed download or an unreadable file is one line)."""
    config.validate()
    return resolve_weights(config.encoder_weights, config.storage_options)


def run(config: ExtractConfig, prepared: EncoderWeights | None = None, **job: Any) -> dict:
    """Extract features for every image under `config.input` into `config.output`; returns the manifest.
    `job` sets pipeline.ShardJob fields a config does not carry (benches: decode_tasks)."""
    weights = ray.put(prepared or prepare(config))
    job = pipeline.ShardJob.from_config(
        config,
        rows_dir=schema.FEATURES_DIR,
        model_cls=FeatureModel,
        model_kwargs={
            "weights": weights,
            "precision": config.precision,
            "feature_dtype": config.feature_dtype,
        },
        compression=config.compression,
        row_bytes=schema.NUM_REGIONS * schema.FEATURE_DIM * np.dtype(config.feature_dtype).itemsize,
        manifest={
            "job": "extract",
            "encoder_weights": config.encoder_weights,
            "feature_dtype": config.feature_dtype,
            "precision": config.precision,
            "precision_on_cpu": resolve_precision(config.precision, torch.device("cpu")),
            "preprocessing": "resize 299x299 bilinear, pixels/127.5 - 1",
        },
        **job,
    )
    return pipeline.run(job)
