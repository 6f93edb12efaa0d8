r"""The `raycap` command: argument parsing shared with jobs/*.py, Ray start-up, one-line errors.

Each command, run locally (extract, train and caption start an embedded Ray):
    raycap extract --input photos --output work/features
With the data on S3 (endpoint and keys from the AWS_* variables, or --storage-options):
    raycap evaluate --predictions s3://bucket/work/captioned --references s3://bucket/captions.json
On a Ray cluster (the code travels with --working-dir; jobs/*.py take the same flags):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m raycap.cli caption --input s3://bucket/photos --output s3://bucket/work/captioned --model s3://bucket/work/model
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from raycap import plan
from raycap.config import PRECISIONS, VERBOSE_ENV, CaptionConfig, ExtractConfig, TrainConfig, parse_storage_options
from raycap.images import DEFAULT_MAX_PIXELS
from raycap.session import exit_now, filter_driver_stderr, init_ray, init_ray_while, quiet_ray
from raycap.sources import FORMATS

# Every numeric TrainConfig field is a `raycap train` flag of the same name (--epochs, --batch-size, ...).
TRAIN_NUMBERS = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", "int | None")]


def _actors(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        help="JSON of extra s3fs/fsspec options, e.g. '{\"anon\": true}' (endpoint and keys: the AWS_* variables)",
    )


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: start an embedded local Ray)")
    _add_storage(p)


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="folder or s3:// prefix of images, WebDataset tars or Parquet files (recursive), or an index file of URIs",
    )
    p.add_argument("--output", required=True, help="output root; rerunning into it resumes")
    p.add_argument(
        "--input-format",
        default="auto",
        choices=list(FORMATS),
        help="files, webdataset (tars), parquet (image bytes), list (an index of URIs); auto: from the listing",
    )
    p.add_argument(
        "--keep-columns",
        type=_names,
        default=(),
        help="store fields copied into every output row, comma-separated (webdataset: txt and .json fields; "
        "parquet: columns; list: index columns)",
    )
    p.add_argument("--image-key", help="webdataset: the image member's extension (default: first of jpg, png, ...)")
    p.add_argument("--image-column", help="parquet: the image column (default: the struct<bytes, path> or binary one)")
    p.add_argument("--id-column", help="parquet: a column of image ids (default FILE/ROW)")
    p.add_argument("--path-column", default="path", help="list: the index's column of URIs (default path)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="images per output shard (default: about 8 shards per model actor, 32 to 256 images)",
    )
    p.add_argument("--batch-size", type=int, help="images per model forward (default 16 on CPU, 128 on GPU)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="model precision (auto: bf16 on GPUs and CPUs with native bf16, fp16 on GPUs without it: T4, V100)",
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=["cpu", "device", "auto"],
        help="where JPEGs are decoded: CPU tasks, or the model's device (auto: device on GPUs)",
    )
    p.add_argument("--actors", type=_actors, help="model actors: N or MIN:MAX (default: one per GPU, or by CPUs)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per model actor (default 1 when GPUs exist)")
    p.add_argument("--max-errors", type=int, help="fail once more images than this are unreadable")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images undecoded")
    p.add_argument("--plan-only", action="store_true", help="list the input, write the plan, print its size, exit")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="on a rerun, relist the input and plan new shards for the files added since",
    )
    _add_ray(p)


def build_parser() -> argparse.ArgumentParser:
    summary, _, examples = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="raycap", description=summary, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help=f"also show Ray's own log lines (or set {VERBOSE_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "synth", parents=[common], help="write the synthetic shapes benchmark (images, captions, objects, splits)"
    )
    p.add_argument("--output", required=True, help="folder or s3:// prefix to write the benchmark to")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage-options", help="JSON of extra s3fs/fsspec options, e.g. '{\"anon\": true}'")

    p = sub.add_parser("extract", parents=[common], help="images -> InceptionV3 feature Parquet shards")
    _add_pipeline(p)
    p.add_argument("--encoder-weights", default="imagenet", help="imagenet | random | PATH to a state dict")
    p.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])

    p = sub.add_parser("train", parents=[common], help="train the captioner with Ray Train (DDP)")
    p.add_argument("--features", required=True, help="output root of `raycap extract`")
    p.add_argument(
        "--captions",
        required=True,
        help="COCO captions JSON, CSV/Parquet (file_name, caption), or an extract output folder with kept text",
    )
    p.add_argument("--init-from", help="model directory to fine-tune from (its vocabulary and sizes are kept)")
    p.add_argument("--caption-column", default="txt", help="with --captions FOLDER: its text column (default txt)")
    p.add_argument("--output", required=True, help="model directory; rerunning resumes from its checkpoints")
    p.add_argument("--split-file", help="splits.json with train/val file names (default: seeded 95/5)")
    defaults = TrainConfig("", "", "")
    for name in TRAIN_NUMBERS:
        kind = float if isinstance(getattr(defaults, name), float) else int
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, name),
            help=f"default {getattr(defaults, name)}",
        )
    p.add_argument(
        "--init-state",
        action="store_true",
        help="start the GRU from the mean region, as Show, Attend and Tell (default: zeros, the tutorial)",
    )
    p.add_argument("--use-gpu", action="store_true", default=None, help="insist on GPUs (default: when present)")
    _add_ray(p)

    p = sub.add_parser("caption", parents=[common], help="images -> captions, scores and attention Parquet")
    _add_pipeline(p)
    p.add_argument("--model", required=True, help="model directory written by `raycap train`")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--length-penalty", type=float, default=1.0)

    p = sub.add_parser(
        "evaluate", parents=[common], help="BLEU/ROUGE-L/CIDEr(/METEOR), object accuracy and attention grounding"
    )
    p.add_argument("--predictions", required=True, help="output root of `raycap caption` (path or URI)")
    p.add_argument("--references", required=True, help="COCO captions JSON (path or URI)")
    p.add_argument("--objects", help="objects.json of the synthetic benchmark (path or URI)")
    p.add_argument("--output", help="write the metrics as JSON here (path or URI)")
    _add_storage(p)

    p = sub.add_parser("show", parents=[common], help="one image with each word's attention, a panel per word (PNG)")
    p.add_argument("--predictions", required=True, help="output root of `raycap caption` (path or URI)")
    p.add_argument("--image", required=True, help="image id, file name or path")
    p.add_argument("--output", required=True, help="the PNG to write (path or URI)")
    _add_storage(p)

    p = sub.add_parser("report", parents=[common], help="a self-contained HTML gallery of captions and attention")
    p.add_argument("--predictions", required=True, help="output root of `raycap caption` (path or URI)")
    p.add_argument("--output", required=True, help="the HTML page to write (path or URI)")
    p.add_argument("--n", type=int, default=50, help="images in the report, first by image id")
    _add_storage(p)
    return parser


def _pipeline_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "input": a.input,
        "output": a.output,
        "input_format": a.input_format,
        "keep_columns": a.keep_columns,
        "image_key": a.image_key,
        "image_column": a.image_column,
        "id_column": a.id_column,
        "path_column": a.path_column,
        "shard_size": a.shard_size,
        "batch_size": a.batch_size,
        "precision": a.precision,
        "decode": a.decode,
        "actors": a.actors,
        "gpus_per_actor": a.gpus_per_actor,
        "max_errors": a.max_errors,
        "max_pixels": a.max_pixels,
        "storage_options": parse_storage_options(a.storage_options),
        "address": a.address,
        "plan_only": a.plan_only,
        "incremental": a.incremental,
    }


def _summary(kind: str, manifest: dict[str, Any]) -> str:
    return (
        f"{kind}: {manifest['rows']} rows, {manifest['errors']} errors, {manifest['images_per_second']} images/s "
        f"({manifest['shards_this_run']} of {manifest['shards']} shards this run) -> {manifest['output']}"
    )


def _run_extract(a: argparse.Namespace) -> None:
    config = ExtractConfig(**_pipeline_kwargs(a), encoder_weights=a.encoder_weights, feature_dtype=a.feature_dtype)
    _run_pipeline("extract", config)


def _run_caption(a: argparse.Namespace) -> None:
    config = CaptionConfig(
        **_pipeline_kwargs(a),
        model=a.model,
        beam_size=a.beam_size,
        max_length=a.max_length,
        length_penalty=a.length_penalty,
    )
    _run_pipeline("caption", config)


def _run_pipeline(kind: str, config: ExtractConfig | CaptionConfig) -> None:
    """Validate before importing torch and Ray (a mistake is reported in a second), plan only, or run the job."""
    config.validate()
    if config.plan_only:
        print(f"{kind}: {plan.plan_only(config)}")
        return
    import importlib

    def prepare() -> tuple[Any, Any]:
        job = importlib.import_module(f"raycap.{kind}")
        return job, job.prepare(config)

    # Importing torch and resolving the weights take seconds, and so does starting Ray: they overlap.
    job, prepared = init_ray_while(config.address, prepare, dashboard=False)
    print(_summary(kind, job.run(config, prepared)))


def _run_train(a: argparse.Namespace) -> None:
    config = TrainConfig(
        a.features,
        a.captions,
        a.output,
        split_file=a.split_file,
        caption_column=a.caption_column,
        init_from=a.init_from,
        storage_options=parse_storage_options(a.storage_options),
        address=a.address,
        use_gpu=a.use_gpu,
        init_state=a.init_state,
        **{n: getattr(a, n) for n in TRAIN_NUMBERS},
    )
    config.validate()  # before importing torch and Ray: a mistake is reported in a second
    from raycap import train

    init_ray(config.address)
    started = time.time()
    metrics = train.run(config)
    print(f"train: {json.dumps(metrics)} in {time.time() - started:.0f}s -> {config.output}")


def _run_synth(a: argparse.Namespace) -> None:
    from raycap import synth

    if a.num_images < 1:
        raise ValueError("--num-images must be >= 1")
    summary = synth.generate(a.output, a.num_images, a.seed, parse_storage_options(a.storage_options))
    print(f"synth: {a.num_images} images -> {a.output} ({json.dumps(summary, default=str)[:200]})")


def _run_evaluate(a: argparse.Namespace) -> None:
    from raycap import evaluate, storage

    options = parse_storage_options(a.storage_options)
    metrics = evaluate.evaluate(a.predictions, a.references, a.objects, storage_options=options)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if a.output:
        storage.write_bytes(a.output, (text + "\n").encode(), options)
    print(text)


def _run_show(a: argparse.Namespace) -> None:
    from raycap import viz

    options = parse_storage_options(a.storage_options)
    print(f"show: {viz.show(a.predictions, a.image, a.output, options)}")


def _run_report(a: argparse.Namespace) -> None:
    from raycap import viz

    options = parse_storage_options(a.storage_options)
    print(f"report: {viz.write_report(a.predictions, a.output, a.n, options)}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "synth": _run_synth,
    "extract": _run_extract,
    "train": _run_train,
    "caption": _run_caption,
    "evaluate": _run_evaluate,
    "show": _run_show,
    "report": _run_report,
}


def _user_error(e: BaseException) -> str | None:
    """The one-line message of a user mistake or a full disk, also when Ray wrapped it in a task or actor error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        one_line = ("TooManyErrors", "StoreUnavailable", "ShardsFailed")
        if isinstance(e, ValueError | FileNotFoundError) or type(e).__name__ in one_line:
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full ({e.strerror}); free space, then rerun to resume"
        if type(e).__name__ == "OutOfDiskError":  # ray.exceptions: the store had to spill to a disk over 95% full
            return (
                "disk full: a node's object store had to spill to a disk over Ray's limit (95% full); free space "
                "under its Ray temp folder (`df`), then rerun to resume"
            )
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_ray()
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("raycap: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user mistakes become one line; anything else propagates
        message = _user_error(e)
        if message is None:
            raise
        print(f"raycap {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """The `raycap` command: main, then exit at once (session.exit_now)."""
    filter_driver_stderr()
    exit_now(main())


def run_job(command: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of jobs/<command>.py: the same flags as `raycap <command>`."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    entry()
