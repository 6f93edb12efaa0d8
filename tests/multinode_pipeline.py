"""Run by test_cluster.py in its own process: on a ray.cluster_utils.Cluster shaped like cluster.yaml's (a 0-CPU
head, 1-CPU workers) with every image and output on S3: a job on nodes too small for any actor fails fast, then
extract and caption each lose a worker node in the middle of the run; caption's model directory is on S3 too.

S3 endpoint and credentials come from the AWS_* variables, as on AWS, so every node's tasks find them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable

import ray
import torch
from ray.cluster_utils import Cluster

from raycap import caption, extract, storage
from raycap.config import CaptionConfig, ExtractConfig
from raycap.markers import any_committed
from raycap.model import Captioner, ModelConfig
from raycap.modeldir import write_model_dir
from raycap.resources import Unschedulable
from raycap.text import Vocabulary

SMALL_NODE_MEMORY = 256 * 2**20  # too little for an InceptionV3 actor


def run_losing_a_node(cluster: Cluster, run: Callable[[], dict], output: str) -> dict:
    """Run a job in a thread; once its first shard is committed, remove one worker node."""
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(manifest=run()))
    job.start()
    fs, root = storage.filesystem(output)
    removed = False
    while job.is_alive():
        job.join(timeout=0.5)  # wakes to look for the first finished shard
        if not removed and any_committed(fs, root):  # a marker, not the attempts/ folder
            cluster.remove_node(doomed)  # kills its decode tasks, writers and perhaps a model actor
            removed = True
    return {"removed": removed, "manifest": result.get("manifest")}


def too_small(cluster: Cluster, images: str, output: str) -> dict:
    """Workers of 1 CPU and 256 MiB: no actor fits anywhere; the job must say so at once, having written nothing."""
    small = [cluster.add_node(num_cpus=1, memory=SMALL_NODE_MEMORY) for _ in range(2)]
    cluster.wait_for_nodes()
    started = time.monotonic()
    try:
        extract.run(ExtractConfig(input=images, output=output, encoder_weights="random", shard_size=4))
        message = None
    except Unschedulable as e:
        message = str(e)
    seconds = time.monotonic() - started
    fs, root = storage.filesystem(output)
    fs.invalidate_cache()
    wrote = fs.exists(root) and bool(fs.find(root))
    for node in small:
        cluster.remove_node(node)
    return {"message": message, "seconds": seconds, "wrote": wrote}


def main(images: str, output: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    report = {"too_small": too_small(cluster, images, f"{output}/too-small")}
    cluster.add_node(num_cpus=1)  # the worker that stays
    features = f"{output}/features"
    report["extract"] = run_losing_a_node(
        cluster,
        lambda: extract.run(ExtractConfig(input=images, output=features, encoder_weights="random", shard_size=4)),
        features,
    )
    torch.manual_seed(0)  # an untrained captioner: node loss does not care what it says
    vocab = Vocabulary.build(["a red circle on the left and a blue square on the right"])
    model_dir = f"{output}/model"  # read by every caption actor, on whichever node it lands
    write_model_dir(
        model_dir,
        Captioner(ModelConfig(vocab_size=len(vocab))),
        vocab,
        {"encoder_weights": "random", "feature_dtype": "float16"},
    )
    captions = f"{output}/captions"
    report["caption"] = run_losing_a_node(
        cluster,
        lambda: caption.run(CaptionConfig(input=images, output=captions, model=model_dir, shard_size=4, max_length=5)),
        captions,
    )
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0 if all(r["removed"] and r["manifest"] for k, r in report.items() if k != "too_small") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
