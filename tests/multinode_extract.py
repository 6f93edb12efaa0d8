"""Run by test_cluster.py in its own process: extract on a 3-node ray.cluster_utils.Cluster, losing a node."""

from __future__ import annotations

import json
import os
import sys
import threading

import ray
from ray.cluster_utils import Cluster

from raycap import extract, schema
from raycap.config import ExtractConfig


def main(images: str, output: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = ExtractConfig(input=images, output=output, encoder_weights="random", shard_size=4, actors=(1, 2))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(manifest=extract.run(config)))
    job.start()
    markers = f"{output}/{schema.SHARDS_DIR}"
    removed = False
    while job.is_alive():
        job.join(timeout=0.2)  # wakes to look for the first finished shard
        if not removed and os.path.isdir(markers) and os.listdir(markers):
            cluster.remove_node(doomed)  # kills its decode tasks, writers and perhaps the model actor
            removed = True
    print("RESULT " + json.dumps({"removed": removed, "manifest": result.get("manifest")}), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0 if removed and result.get("manifest") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
