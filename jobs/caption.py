r"""Images -> captions, scores and attention Parquet: `raycap caption` as a Ray job script, with the same flags.

Local, on an embedded Ray:
    python jobs/caption.py --input photos --output work/captioned --model work/model

Local, with the data on S3 (endpoint and keys from the AWS_* variables, or --storage-options):
    python jobs/caption.py --input s3://bucket/photos --output s3://bucket/work/captioned --model s3://bucket/work/model

On a Ray cluster (the code travels with --working-dir; the nodes share no disk, so every path is on S3):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/caption.py --input s3://bucket/photos --output s3://bucket/work/captioned --model s3://bucket/work/model
"""

import sys

from raycap.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("caption", argv)


if __name__ == "__main__":
    sys.exit(main())
