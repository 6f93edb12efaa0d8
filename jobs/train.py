r"""Features + captions -> a model directory (Ray Train, DDP): `raycap train` as a Ray job script, same flags.

Local, on an embedded Ray:
    python jobs/train.py --features work/features --captions captions.json --output work/model

Local, with the data on S3 (endpoint and keys from the AWS_* variables, or --storage-options):
    python jobs/train.py --features s3://bucket/work/features --captions s3://bucket/captions.json --output s3://bucket/work/model

On a Ray cluster (the code travels with --working-dir; the nodes share no disk, so every path is on S3):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --features s3://bucket/work/features --captions s3://bucket/captions.json --output s3://bucket/work/model
"""

import sys

from raycap.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("train", argv)


if __name__ == "__main__":
    sys.exit(main())
