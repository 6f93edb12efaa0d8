"""`ray job submit -- python jobs/extract.py …`: the same flags as `raycap extract`."""

import sys

from raycap.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("extract", argv)


if __name__ == "__main__":
    sys.exit(main())
