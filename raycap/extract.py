"""The extract pipeline: images -> InceptionV3 region features -> feature Parquet shards (Ray Data)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raycap import pipeline, schema
from raycap.config import ExtractConfig
from raycap.encoder import FeatureExtractor, resolve_precision


class FeatureModel(pipeline.ShardModel):
    """Actor: holds InceptionV3 on its device; decoded uint8 shards in, feature rows out."""

    def __init__(self, weights: str, precision: str, batch_size: int | None, feature_dtype: str,
                 threads: int | None = None) -> None:
        super().__init__(threads)
        self.extractor = FeatureExtractor(weights, precision=precision, batch_size=batch_size or 16)
        if batch_size is None and self.extractor.device.type == "cuda":
            self.extractor.batch_size = 128
        self.feature_dtype = feature_dtype

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        features = self.extractor(pixels).to(getattr(torch, self.feature_dtype)).cpu().numpy()  # (N, 64, 2048)
        return pa.table(
            [meta[schema.IMAGE_ID], meta[schema.PATH], schema.features_to_arrow(features, self.feature_dtype),
             meta[schema.WIDTH], meta[schema.HEIGHT]],
            schema=schema.features_schema(self.feature_dtype),
        )


def run(config: ExtractConfig) -> dict:
    """Extract features for every image under `config.input` into `config.output`; returns the manifest."""
    config.validate()
    job = pipeline.ShardJob(
        input=config.input,
        output=config.output,
        rows_dir=schema.FEATURES_DIR,
        model_cls=FeatureModel,
        model_kwargs={"weights": config.encoder_weights, "precision": config.precision,
                      "batch_size": config.batch_size, "feature_dtype": config.feature_dtype},
        shard_size=config.shard_size,
        max_pixels=config.max_pixels,
        max_errors=config.max_errors,
        actors=config.actors,
        gpus_per_actor=config.gpus_per_actor,
        compression=config.compression,
        row_bytes=schema.NUM_REGIONS * schema.FEATURE_DIM * np.dtype(config.feature_dtype).itemsize,
        storage_options=config.storage_options,
        incremental=config.incremental,
        manifest={"job": "extract", "encoder_weights": config.encoder_weights, "feature_dtype": config.feature_dtype,
                  "precision": config.precision,
                  "precision_on_cpu": resolve_precision(config.precision, torch.device("cpu")),
                  "preprocessing": "resize 299x299 bilinear, pixels/127.5 - 1"},
    )
    return pipeline.run(job)
