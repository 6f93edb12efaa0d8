"""Benchmark: peak object-store use while `raycap extract` runs over 5,000 images on 2 CPUs.

By default the shards go as on GPU nodes: decode tasks in front of the model actor, so every decoded shard
travels through the object store and decoding (far faster than the model on a CPU) runs ahead until Ray
Data's budget holds it back: the case the bound is for. `--actor-reads` runs the CPU nodes' topology
instead, where pixels never enter the store.

A sampler thread asks the raylet for its store stats (what `ray memory --stats-only` prints) twice a
second while the extraction runs in this process on an embedded Ray. Prints the peak bytes in the
store and the bytes spilled to disk, and checks them against the bound we state: Ray Data's executor
budget (half the object store; RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION changes it), with nothing
spilled. It also prints the peak against the pipeline's working-set estimate (pipeline.inflight_bytes), which
with `--actor-reads` is in the actors' memory: there the store holds little more than the encoder's weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from raycap import extract, synth
from raycap.config import ExtractConfig


class StoreSampler(threading.Thread):
    """Polls the object store's used and spilled bytes until stopped; keeps the peaks."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_used, self.spilled = interval, 0, 0
        self._stop_event = threading.Event()
        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            stats = get_memory_info_reply(self._state).store_stats
            self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workdir", default="bench-output/memory")
    parser.add_argument("--actor-reads", action="store_true", help="CPU nodes' topology: no decode tasks")
    args = parser.parse_args(argv)
    data = os.path.join(args.workdir, f"data-{args.images}")
    if not os.path.exists(os.path.join(data, synth.CAPTIONS_FILE)):
        synth.generate(data, args.images, seed=5)
    ray.init(num_cpus=2, include_dashboard=False)
    config = ExtractConfig(
        input=os.path.join(data, synth.IMAGES_DIR),
        output=os.path.join(args.workdir, f"features-{int(time.time())}"),
        encoder_weights="random",
    )
    sampler = StoreSampler()
    sampler.start()
    started = time.perf_counter()
    manifest = extract.run(config, decode_tasks=not args.actor_reads)
    seconds = time.perf_counter() - started
    sampler.stop()
    store = ray.cluster_resources()["object_store_memory"]
    bound = store * float(os.environ.get("RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION", 0.5))
    estimate = manifest["resources"]["inflight_bytes"]
    mib = 1024 * 1024
    print(
        f"extracted {manifest['rows']} rows in {seconds:.0f}s ({manifest['images_per_second']} images/s), "
        f"{manifest['shards']} shards of {manifest['shard_size']}, "
        + ("decode tasks in front of the actors" if manifest["resources"]["decode_tasks"] else "actors reading")
    )
    where = "in the store" if manifest["resources"]["decode_tasks"] else "in the actors' own memory, not the store"
    print(
        f"object store: peak {sampler.peak_used / mib:.0f} MiB of {store / mib:.0f} MiB, "
        f"spilled {sampler.spilled / mib:.0f} MiB; bound (Ray Data's budget) {bound / mib:.0f} MiB; "
        f"working-set estimate {estimate / mib:.0f} MiB {where} (store peak / estimate = "
        f"{sampler.peak_used / estimate:.2f})"
    )
    ok = sampler.peak_used <= bound and sampler.spilled == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
