"""The `raycap` command: argument parsing shared with jobs/*.py, Ray start-up, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from raycap import plan
from raycap.config import CaptionConfig, ExtractConfig, TrainConfig, parse_storage_options
from raycap.images import DEFAULT_MAX_PIXELS


def _actors(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: start an embedded local Ray)")
    p.add_argument("--storage-options", help="JSON of extra s3fs/fsspec options, e.g. '{\"anon\": true}'")


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder or s3:// prefix of images (recursive)")
    p.add_argument("--output", required=True, help="output root; rerunning into it resumes")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per output shard (default: about 8 shards per model actor, 32 to 256 images)")
    p.add_argument("--batch-size", type=int, help="images per model forward (default 16 on CPU, 128 on GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="model precision (auto: bf16 on GPUs and CPUs with native bf16)")
    p.add_argument("--actors", type=_actors, help="model actors: N or MIN:MAX (default: one per GPU, or by CPUs)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per model actor (default 1 when GPUs exist)")
    p.add_argument("--max-errors", type=int, help="fail once more images than this are unreadable")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images undecoded")
    p.add_argument("--plan-only", action="store_true", help="list the input, write the plan, print its size, exit")
    p.add_argument("--incremental", action="store_true",
                   help="on a rerun, relist the input and plan new shards for the files added since")
    _add_ray(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic shapes benchmark (images, captions, objects, splits)")
    p.add_argument("--output", required=True)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("extract", help="images -> InceptionV3 feature Parquet shards")
    _add_pipeline(p)
    p.add_argument("--encoder-weights", default="imagenet", help="imagenet | random | PATH to a state dict")
    p.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])

    p = sub.add_parser("train", help="train the captioner with Ray Train (DDP)")
    p.add_argument("--features", required=True, help="output root of `raycap extract`")
    p.add_argument("--captions", required=True, help="COCO captions JSON or CSV/Parquet (file_name, caption)")
    p.add_argument("--output", required=True, help="model directory; rerunning resumes from its checkpoints")
    p.add_argument("--split-file", help="splits.json with train/val file names (default: seeded 95/5)")
    defaults = TrainConfig("", "", "")
    for name in ("epochs", "workers", "batch_size", "learning_rate", "attention_penalty", "vocab_size",
                 "max_captions", "max_failures", "seed", "grad_clip", "warmup_steps", "units", "embedding_dim",
                 "cache_gb"):
        kind = float if isinstance(getattr(defaults, name), float) else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                       help=f"default {getattr(defaults, name)}")
    p.add_argument("--init-state", action="store_true",
                   help="start the GRU from the mean region, as Show, Attend and Tell (default: zeros, the tutorial)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="insist on GPUs (default: when present)")
    _add_ray(p)

    p = sub.add_parser("caption", help="images -> captions, scores and attention Parquet")
    _add_pipeline(p)
    p.add_argument("--model", required=True, help="model directory written by `raycap train`")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--length-penalty", type=float, default=1.0)

    p = sub.add_parser("evaluate", help="BLEU/ROUGE-L/CIDEr(/METEOR), object accuracy and attention grounding")
    p.add_argument("--predictions", required=True, help="output root of `raycap caption`")
    p.add_argument("--references", required=True, help="COCO captions JSON")
    p.add_argument("--objects", help="objects.json of the synthetic benchmark")
    p.add_argument("--output", help="write the metrics as JSON here")

    p = sub.add_parser("show", help="one image with each word's attention, a panel per word (PNG)")
    p.add_argument("--predictions", required=True)
    p.add_argument("--image", required=True, help="image id, file name or path")
    p.add_argument("--output", required=True)

    p = sub.add_parser("report", help="a self-contained HTML gallery of captions and attention")
    p.add_argument("--predictions", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--n", type=int, default=50)
    return parser


def _pipeline_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {"input": a.input, "output": a.output, "shard_size": a.shard_size, "batch_size": a.batch_size,
            "precision": a.precision, "actors": a.actors, "gpus_per_actor": a.gpus_per_actor,
            "max_errors": a.max_errors, "max_pixels": a.max_pixels,
            "storage_options": parse_storage_options(a.storage_options), "address": a.address,
            "plan_only": a.plan_only, "incremental": a.incremental}


def init_ray(address: str | None) -> None:
    """Connect to `address`, or start an embedded local Ray (quietly, without usage reporting)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # inside `ray job submit`
    ray.init(address=address, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}} if address is None else None)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def _summary(kind: str, manifest: dict[str, Any]) -> str:
    return (f"{kind}: {manifest['rows']} rows, {manifest['errors']} errors, {manifest['images_per_second']} images/s "
            f"({manifest['shards_this_run']} of {manifest['shards']} shards this run) -> {manifest['output']}")


def _run_extract(a: argparse.Namespace) -> None:
    config = ExtractConfig(**_pipeline_kwargs(a), encoder_weights=a.encoder_weights, feature_dtype=a.feature_dtype)
    config.validate()
    if config.plan_only:
        print(f"extract: {plan.plan_only(config)}")
        return
    from raycap import extract

    init_ray(config.address)
    print(_summary("extract", extract.run(config)))


def _run_caption(a: argparse.Namespace) -> None:
    config = CaptionConfig(**_pipeline_kwargs(a), model=a.model, beam_size=a.beam_size, max_length=a.max_length,
                           length_penalty=a.length_penalty)
    config.validate()
    if config.plan_only:
        print(f"caption: {plan.plan_only(config)}")
        return
    from raycap import caption

    init_ray(config.address)
    print(_summary("caption", caption.run(config)))


def _run_train(a: argparse.Namespace) -> None:
    from raycap import train

    names = ("epochs", "workers", "batch_size", "learning_rate", "attention_penalty", "vocab_size", "max_captions",
             "max_failures", "seed", "grad_clip", "warmup_steps", "units", "embedding_dim", "use_gpu",
             "init_state", "cache_gb")
    config = TrainConfig(a.features, a.captions, a.output, split_file=a.split_file,
                         storage_options=parse_storage_options(a.storage_options), address=a.address,
                         **{n: getattr(a, n) for n in names})
    config.validate()
    init_ray(config.address)
    started = time.time()
    metrics = train.run(config)
    print(f"train: {json.dumps(metrics)} in {time.time() - started:.0f}s -> {config.output}")


def _run_synth(a: argparse.Namespace) -> None:
    from raycap import synth

    if a.num_images < 1:
        raise ValueError("--num-images must be >= 1")
    summary = synth.generate(a.output, a.num_images, a.seed)
    print(f"synth: {a.num_images} images -> {a.output} ({json.dumps(summary, default=str)[:200]})")


def _run_evaluate(a: argparse.Namespace) -> None:
    from raycap import evaluate

    metrics = evaluate.evaluate(a.predictions, a.references, a.objects)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        with open(a.output, "w") as f:
            f.write(text + "\n")
    print(text)


def _run_show(a: argparse.Namespace) -> None:
    from raycap import viz

    print(f"show: {viz.show(a.predictions, a.image, a.output)}")


def _run_report(a: argparse.Namespace) -> None:
    from raycap import viz

    print(f"report: {viz.write_report(a.predictions, a.output, a.n)}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "synth": _run_synth, "extract": _run_extract, "train": _run_train, "caption": _run_caption,
    "evaluate": _run_evaluate, "show": _run_show, "report": _run_report,
}


def _user_error(e: BaseException) -> str | None:
    """The one-line message of a user mistake, also when Ray wrapped it in a task or actor error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ValueError | FileNotFoundError) or type(e).__name__ == "TooManyErrors":
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


def run_job(command: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of jobs/<command>.py: the same flags as `raycap <command>`."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
