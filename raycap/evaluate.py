"""`raycap evaluate`: caption predictions scored against references (and the synthetic benchmark's objects)."""

from __future__ import annotations

from typing import Any

from raycap import schema
from raycap.metrics import Result, caption_scores
from raycap.predictions import (
    attention_matrices,
    load_references,
    name_matcher,
    open_predictions,
    read_json,
    require_columns,
)
from raycap.shapes_eval import ObjectTally


def evaluate(
    predictions: str,
    references: str,
    objects: str | None = None,
    *,
    java: bool | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Result:
    """Score caption predictions against COCO-format references (and synthetic objects when given).

    Every location is a local path or URI. Keys: "images" scored, "unmatched" predictions without references,
    "tokenizer" ("ptb" | "standardize"), "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "METEOR" (java only); with
    `objects`: "object_images", "object_accuracy", "grounded_objects" and, when any object was measured,
    "grounding". `java=None` uses java when it is on PATH; False forces the pure-Python path.
    """
    refs = load_references(references, storage_options)
    match_ref = name_matcher(refs)
    truth: dict[str, list[dict]] = {}
    if objects is not None:
        truth = read_json(objects, "--objects", storage_options)
        if not isinstance(truth, dict):
            raise ValueError(f"--objects {objects}: expected a JSON object of file name -> objects")
    match_obj = name_matcher(truth)
    columns = [schema.IMAGE_ID, schema.CAPTION]
    if objects is not None:
        columns += [schema.TOKENS, schema.ATTENTION]
    dataset = open_predictions(predictions, storage_options)
    require_columns(dataset, columns, predictions)

    res: dict[str, str] = {}
    rows = unmatched = 0
    tally = ObjectTally()
    for batch in dataset.to_batches(columns=columns):
        ids = batch.column(schema.IMAGE_ID).to_pylist()
        captions = batch.column(schema.CAPTION).to_pylist()
        rows += len(ids)
        tokens: list[list[str]] = []
        attention: list = []  # one (T, 64) float32 array per row, with objects
        if objects is not None:
            tokens = batch.column(schema.TOKENS).to_pylist()
            attention = attention_matrices(batch.column(schema.ATTENTION))
        for k, (image_id, caption) in enumerate(zip(ids, captions, strict=True)):
            key = match_ref(image_id)
            if key is None:
                unmatched += 1
                continue
            if key in res:
                continue  # a duplicate row: the first one counts
            res[key] = caption
            obj_key = match_obj(image_id)
            if obj_key is not None:
                tally.add(caption, tokens[k], attention[k], truth[obj_key])
    if rows == 0:
        raise ValueError(f"no predictions in {predictions}")
    if not res:
        raise ValueError(f"none of the {rows} predictions matches an image in {references}")

    out = caption_scores({k: refs[k] for k in res}, res, java=java)
    out["unmatched"] = unmatched
    if objects is not None:
        if tally.objects == 0:
            raise ValueError(f"no scored prediction matches an image with objects in {objects}")
        out.update(tally.result())
    return out
