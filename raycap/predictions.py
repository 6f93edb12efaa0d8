"""Reading what evaluation and figures consume: caption Parquet, attention matrices, COCO references, id matching."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from raycap import schema, storage


def open_predictions(predictions: str, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """The caption Parquet at `predictions`: one file, a captions folder, or a job output root with captions/.

    Files and folders whose names start with '_' or '.' (commit markers, temporary files) are skipped.
    """
    fs, root = storage.filesystem(predictions, storage_options)
    if not fs.exists(root):
        raise ValueError(f"--predictions {predictions}: not found")
    if fs.isdir(root) and fs.isdir(storage.join(root, schema.CAPTIONS_DIR)):
        root = storage.join(root, schema.CAPTIONS_DIR)
    dataset = ds.dataset(root, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    if not dataset.files:
        raise ValueError(f"--predictions {predictions}: no caption Parquet files")
    missing = [name for name in (schema.IMAGE_ID, schema.CAPTION) if name not in dataset.schema.names]
    if missing:
        raise ValueError(f"--predictions {predictions}: not a captions table (no column {', '.join(missing)})")
    return dataset


def require_columns(dataset: ds.Dataset, columns: Sequence[str], predictions: str) -> None:
    """A one-line ValueError when the captions table lacks any of `columns`."""
    missing = [name for name in columns if name not in dataset.schema.names]
    if missing:
        raise ValueError(f"--predictions {predictions}: no column {', '.join(missing)}")


def load_predictions(
    predictions: str,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Read caption predictions (all of `schema.CAPTIONS_SCHEMA`'s columns unless `columns` names some)."""
    dataset = open_predictions(predictions, storage_options)
    wanted = list(columns) if columns is not None else list(schema.CAPTIONS_SCHEMA.names)
    require_columns(dataset, wanted, predictions)
    return dataset.to_table(columns=wanted, filter=filter)


def attention_matrices(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """The attention column as one float32 ``(T, 64)`` array per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    values = column.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    values = values.reshape(-1, schema.NUM_REGIONS)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _normalise_name(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def name_matcher(names: Iterable[str]) -> Callable[[str], str | None]:
    """A lookup from a prediction's image id to one of `names`: exact match first, then a unique basename."""
    exact = {_normalise_name(n): n for n in names}
    by_base: dict[str, str | None] = {}
    for norm, name in exact.items():
        base = posixpath.basename(norm)
        by_base[base] = None if base in by_base else name  # an ambiguous basename matches nothing

    def match(image_id: str) -> str | None:
        norm = _normalise_name(image_id)
        if norm in exact:
            return exact[norm]
        return by_base.get(posixpath.basename(norm))

    return match


def read_json(location: str, flag: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The JSON document at a path or URI; a missing, unreadable or non-JSON file is one line naming `flag`."""
    text = storage.read_bytes(location, storage_options, what=flag)
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {location}: not a JSON file ({e})") from None


def load_references(references: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """COCO captions JSON as ``{file_name: [caption, ...]}``."""
    data = read_json(references, "--references", storage_options)
    try:
        names = {image["id"]: image["file_name"] for image in data.get("images", [])}
        refs: dict[str, list[str]] = {}
        for ann in data.get("annotations", []):
            name = names.get(ann["image_id"])
            if name is not None:
                refs.setdefault(name, []).append(str(ann["caption"]))
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"--references {references}: not COCO captions JSON (bad entry: {e!r})") from None
    if not refs:
        raise ValueError(f"--references {references}: no reference captions")
    return refs
