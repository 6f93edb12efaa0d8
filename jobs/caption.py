"""`ray job submit -- python jobs/caption.py …`: the same flags as `raycap caption`."""

import sys

from raycap.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("caption", argv)


if __name__ == "__main__":
    sys.exit(main())
