"""`ray job submit -- python jobs/train.py …`: the same flags as `raycap train`."""

import sys

from raycap.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("train", argv)


if __name__ == "__main__":
    sys.exit(main())
