"""Run by test_cluster.py in its own process: extract, then caption, on a multi-node ray.cluster_utils.Cluster,
losing a worker node in the middle of each job."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable

import ray
import torch
from ray.cluster_utils import Cluster

from raycap import caption, extract, schema
from raycap.config import CaptionConfig, ExtractConfig
from raycap.model import Captioner, ModelConfig
from raycap.modeldir import write_model_dir
from raycap.text import Vocabulary


def run_losing_a_node(cluster: Cluster, run: Callable[[], dict], output: str) -> dict:
    """Run a job in a thread; once its first shard is committed, remove one worker node and add a fresh one."""
    doomed = cluster.add_node(num_cpus=2)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(manifest=run()))
    job.start()
    markers = os.path.join(output, schema.SHARDS_DIR)
    removed = False
    while job.is_alive():
        job.join(timeout=0.2)  # wakes to look for the first finished shard
        if not removed and os.path.isdir(markers) and os.listdir(markers):
            cluster.remove_node(doomed)  # kills its decode tasks, writers and perhaps a model actor
            removed = True
    return {"removed": removed, "manifest": result.get("manifest")}


def main(images: str, output: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    features = os.path.join(output, "features")
    report = {"extract": run_losing_a_node(cluster, lambda: extract.run(ExtractConfig(
        input=images, output=features, encoder_weights="random", shard_size=4, actors=(1, 2))), features)}
    model_dir = os.path.join(output, "model")  # an untrained captioner: node loss does not care what it says
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a red circle on the left and a blue square on the right"])
    write_model_dir(model_dir, Captioner(ModelConfig(vocab_size=len(vocab))), vocab,
                    {"encoder_weights": "random", "feature_dtype": "float16"})
    captions = os.path.join(output, "captions")
    report["caption"] = run_losing_a_node(cluster, lambda: caption.run(CaptionConfig(
        input=images, output=captions, model=model_dir, shard_size=4, actors=(1, 2), max_length=5)), captions)
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0 if all(r["removed"] and r["manifest"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
