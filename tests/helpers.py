"""Helpers shared by the integration tests."""

from __future__ import annotations

from jobs import extract as extract_job


def extract(images, output, *extra: str) -> int:
    """`jobs/extract.py` with the offline encoder: the way every test extracts features."""
    return extract_job.main(["--input", str(images), "--output", str(output), "--encoder-weights", "random", *extra])
