"""Progress lines for logs: one every 30 s or 10% of the shards, with images/s and an ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Progress:
    """One line whenever `every_seconds` have passed or another `every_fraction` of the shards finished.

    `images` is None where the images are known only once read (a tar or Parquet file per shard): the ETA then
    comes from the shards' rate."""

    def __init__(
        self,
        shards: int,
        images: int | None,
        done: dict[int, tuple[int, int]],
        say: Callable[[str], None],
        every_seconds: float = 30.0,
        every_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shards, self.images, self.say, self.clock = shards, images, say, clock
        self.every_seconds, self.step = every_seconds, max(1, math.ceil(every_fraction * shards))
        self.done = len(done)
        self.images_done = sum(r + e for r, e in done.values())
        self.errors = sum(e for _, e in done.values())
        self.this_run = 0
        self.shards_this_run = 0
        self.started = self.last_time = clock()
        self.last_done = self.done

    def shard_finished(self, rows: int, errors: int) -> None:
        self.done += 1
        self.images_done += rows + errors
        self.errors += errors
        self.this_run += rows + errors
        self.shards_this_run += 1
        now = self.clock()
        if (
            now - self.last_time >= self.every_seconds
            or self.done - self.last_done >= self.step
            or self.done == self.shards
        ):
            self.last_time, self.last_done = now, self.done
            self.say(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.this_run / elapsed
        if self.images is None:
            left = (self.shards - self.done) * elapsed / self.shards_this_run if self.shards_this_run else None
        else:
            left = (self.images - self.images_done) / rate if rate > 0 else None
        eta = "?" if left is None else f"{left:.0f}s"
        return (
            f"progress: {self.done}/{self.shards} shards, {self.images_done} images, {self.errors} errors, "
            f"{rate:.1f} images/s, ETA {eta}"
        )
