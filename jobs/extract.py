r"""Images -> InceptionV3 feature Parquet shards: `raycap extract` as a Ray job script, with the same flags.

Local, on an embedded Ray:
    python jobs/extract.py --input photos --output work/features

Local, with the data on S3 (endpoint and keys from the AWS_* variables, or --storage-options):
    python jobs/extract.py --input s3://bucket/photos --output s3://bucket/work/features

On a Ray cluster (the code travels with --working-dir; the nodes share no disk, so every path is on S3):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/extract.py --input s3://bucket/photos --output s3://bucket/work/features
"""

import sys

from raycap.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("extract", argv)


if __name__ == "__main__":
    sys.exit(main())
