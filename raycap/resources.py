"""Per-node resource planning for model actors, decode tasks and training workers; unschedulable jobs fail fast.

Ray places each actor and task on ONE node, so cluster totals say little: a 0-CPU head plus two 1-CPU
workers has 2 CPUs, yet an actor reserving 0.75 CPU on each worker leaves no node with room for a
0.5-CPU decode task, and the job waits forever. Plans here are made from each node's own CPUs and GPUs
(the alive nodes, plus the node types an autoscaler may add) and checked against the worst placement
Ray could choose; a job no plan fits is refused with one line before anything is submitted, and a
watchdog ends a run whose demands Ray has left pending for too long.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

SIDE_TASK_CPUS = 0.25  # the least room some node keeps beside GPU actors for a decode task
GPU_DECODE_CPUS = 1.0  # a decode task in front of GPU actors: one per core (see plan_actors)
ACTOR_MEMORY = 1 << 30  # host memory an InceptionV3 actor needs (weights, activations at batch 16, runtime)
STALL_SECONDS = 300.0  # default watchdog: no progress this long while Ray reports unplaceable demands
STALL_SECONDS_AUTOSCALING = 1200.0  # with an autoscaler, new nodes (GPU images) take minutes to join
_UNBOUNDED = 1 << 20  # "as many as needed" for an autoscaler node type without max_workers
T = TypeVar("T")


class Unschedulable(ValueError):
    """The job's actors or tasks fit on no node of this cluster (one line saying what is missing)."""


@dataclass(frozen=True)
class NodeShape:
    cpus: float  # Ray's CPU resource of one such node
    gpus: float  # Ray's GPU resource
    memory: float  # Ray's memory resource, bytes
    count: int = 1  # nodes of this shape: alive ones, or the most an autoscaler may start

    def __str__(self) -> str:
        gpus = f" {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.count}x({self.cpus:g} CPU{gpus} {self.memory / 2**30:.1f} GiB)"


def describe(shapes: Iterable[NodeShape]) -> str:
    return ", ".join(map(str, shapes)) or "none"


def node_shapes(autoscaler: bool = True) -> list[NodeShape]:
    """The alive nodes of the connected Ray cluster, grouped by shape, plus (`autoscaler`) the node types its
    autoscaler may add."""
    import ray

    counts: dict[tuple[float, float, float], int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            key = (float(res.get("CPU", 0)), float(res.get("GPU", 0)), float(res.get("memory", 0)))
            counts[key] = counts.get(key, 0) + 1
    for group in _autoscaler_node_groups() if autoscaler else []:
        key = (
            float(group.resources.get("CPU", 0)),
            float(group.resources.get("GPU", 0)),
            float(group.resources.get("memory", 0)),
        )
        if group.max_count != 0:
            counts[key] = counts.get(key, 0) + (group.max_count if group.max_count > 0 else _UNBOUNDED)
    return [NodeShape(c, g, m, n) for (c, g, m), n in sorted(counts.items())]


def _autoscaler_node_groups() -> list[Any]:
    """The node types of the autoscaler's config (empty without an autoscaler, as on a laptop)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state: only the alive nodes count
        return []
    return list(config.node_group_configs) if config is not None else []


def autoscaling() -> bool:
    return bool(_autoscaler_node_groups())


def _slots(shape: NodeShape, cpus: float, gpus: float, cores: int = 0) -> int:
    """How many actors of (cpus, gpus) one node of this shape holds; CPU actors also no more than its cores
    (`cores` threads each: more would only share them)."""
    if shape.memory and shape.memory < ACTOR_MEMORY:
        return 0
    fits = [math.floor(shape.cpus / cpus + 1e-9)] if cpus else []
    if cores:
        fits.append(math.floor(shape.cpus / cores + 1e-9))
    if gpus:
        fits.append(math.floor(shape.gpus / gpus + 1e-9))
    return max(0, min(fits)) if fits else _UNBOUNDED


def safe_actor_count(shapes: list[NodeShape], cpus: float, gpus: float, room: float, cores: int = 0) -> int:
    """The most actors of (cpus, gpus) such that, however Ray places them, some node keeps `room` free CPUs.

    Ray is free to pack actors onto nodes as it likes. To leave every node with less than `room`, a
    placement needs at least m = floor((C - room) / cpus) + 1 actors on each node of C CPUs; a node that
    cannot hold m actors always keeps room. So up to sum(m) - 1 actors are safe, or all that fit when
    some node can never be filled.
    """
    total = sum(s.count * _slots(s, cpus, gpus, cores) for s in shapes)
    needed_to_block = 0
    for s in shapes:
        slots = _slots(s, cpus, gpus, cores)
        block = 0 if s.cpus < room else math.floor((s.cpus - room) / cpus + 1e-9) + 1 if cpus else _UNBOUNDED
        if block > slots:
            return total  # this node always has room for a decode task or a plan expansion
        needed_to_block += s.count * block
    return max(0, min(total, needed_to_block - 1))


def plan_actors(
    shapes: list[NodeShape],
    gpus_per_actor: float | None,
    actors: tuple[int, int] | None,
    alive: list[NodeShape] | None = None,
) -> dict[str, Any]:
    """Model actors (count, CPUs, GPUs, threads) and decode CPUs that fit these nodes; Unschedulable if none do.

    `shapes` may include nodes an autoscaler can add; the pool then starts with what the `alive` ones hold
    (at least one actor, for which the autoscaler starts a node) and grows to what all of them hold.
    """
    gpus = sum(s.gpus * s.count for s in shapes)
    gpus_per_actor = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_per_actor > 0:
        if not any(s.gpus >= gpus_per_actor for s in shapes):
            raise Unschedulable(
                f"no node has {gpus_per_actor:g} GPU for a model actor (--gpus-per-actor); nodes: {describe(shapes)}"
            )
        # One CPU per GPU actor (it writes the rows), half a CPU on nodes with fewer (a GPU node with 1 vCPU).
        # Decode tasks take a core each: two per core would fill Ray Data's ~30-100 ms gap between one task and
        # the next on a slot, but measured slower in all (bench/pipeline.py --decode-cpus 0.5: more contention,
        # and worker processes stopped and restarted above Ray's soft limit of one per CPU). Some node must
        # always keep room for a decode task, wherever Ray places the actors.
        choices = [(1.0, GPU_DECODE_CPUS), (0.5, GPU_DECODE_CPUS), (0.5, 0.25)]  # (actor CPUs, decode CPUs)
        candidates = [(cpus, 1, decode, max(decode, SIDE_TASK_CPUS)) for cpus, decode in choices]
    else:
        # CPU only: single-threaded actors use the cores better than one multi-threaded actor (figures in
        # docs/operations.md, "Pipeline throughput"), up to 8 threads per actor on large nodes. An actor reads
        # and decodes its own shards on its threads, so it reserves a whole core per thread and no room is kept
        # beside it (plan expansion reserves no CPU). decode_cpus is what a decode task would reserve in front
        # of CPU actors (ShardJob.decode_tasks, for benches and tests).
        largest = max((s.cpus for s in shapes if _slots(s, 0.5, 0)), default=0.0)
        threads = max(1, int(largest) // 8)
        candidates = [(float(threads), threads, 0.5, 0.0)]
    best = None
    for actor_cpus, threads, decode_cpus, room in candidates:
        cores = 0 if gpus_per_actor > 0 else threads
        n = safe_actor_count(shapes, actor_cpus, gpus_per_actor, room, cores)
        if n and (best is None or n > best[0]):
            best = (n, actor_cpus, threads, decode_cpus, room)
    if best is None:
        least_cpus, _, least_decode, least_room = candidates[-1]
        gpu = f", {gpus_per_actor:g} GPU" if gpus_per_actor else ""
        need = f"{least_cpus:g} CPU, {ACTOR_MEMORY / 2**30:g} GiB{gpu}"
        beside = f" with a decode task ({least_decode:g} CPU) beside it or on another node" if least_room else ""
        raise Unschedulable(f"no node can hold a model actor ({need}){beside}; nodes: {describe(shapes)}")
    most, actor_cpus, threads, decode_cpus, room = best
    if actors is not None:
        if actors[0] > most:
            raise Unschedulable(
                f"--actors {actors[0]}:{actors[1]} needs {actors[0]} model actors, these nodes hold "
                f"{most}{' with room to decode' if room else ''}; nodes: {describe(shapes)}"
            )
        chosen = (actors[0], min(actors[1], most))
    elif gpus_per_actor > 0:
        chosen = (1, most)
    else:
        cores = threads
        now = most if alive is None else safe_actor_count(alive, actor_cpus, 0, room, cores)
        chosen = (max(1, min(now, most)), most)
    return {
        "actors": chosen,
        "num_gpus": gpus_per_actor,
        "actor_cpus": actor_cpus,
        "threads": None if gpus_per_actor > 0 else threads,
        "decode_cpus": decode_cpus,
    }


def plan_train_workers(shapes: list[NodeShape], world: int, use_gpu: bool | None) -> tuple[bool, float]:
    """(use_gpu, CPUs per worker) for `world` DDP workers that Ray Train packs onto these nodes (each worker reads
    its own feature pieces: no other task needs a CPU); Unschedulable if no choice fits."""
    gpu_slots = sum(s.count * math.floor(s.gpus + 1e-9) for s in shapes if s.cpus >= 0.25)
    if use_gpu is None:
        use_gpu = gpu_slots >= world
    if use_gpu and gpu_slots < world:
        raise Unschedulable(
            f"--workers {world} needs {world} nodes' GPUs, these nodes have {gpu_slots}: {describe(shapes)}"
        )
    for cpus in (1.0, 0.5, 0.25):
        if _packs(shapes, world, cpus, 1.0 if use_gpu else 0.0):
            return use_gpu, cpus
    raise Unschedulable(f"--workers {world} do not fit these nodes: {describe(shapes)}")


def _packs(shapes: list[NodeShape], world: int, cpus: float, gpus: float) -> bool:
    """Whether `world` workers of `cpus` and `gpus` each fit placed largest-node-first (Ray Train's PACK)."""
    free = [[s.cpus, s.gpus] for s in shapes for _ in range(min(s.count, world + 1))]
    free.sort(key=lambda f: -f[0])
    for _ in range(world):
        node = next((f for f in free if f[0] >= cpus - 1e-9 and f[1] >= gpus - 1e-9), None)
        if node is None:
            return False
        node[0] -= cpus
        node[1] -= gpus
    return True


def pending_demands() -> list[str]:
    """Resource shapes Ray's scheduler cannot place right now, e.g. ["{'CPU': 0.5} x 3"] (empty when unknown)."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
    except Exception:  # noqa: BLE001 - the watchdog then only sees the lack of progress
        return []
    return [f"{dict(r.request.resources_bundle)} x {r.count}" for r in state.pending_resource_requests]


def stall_seconds() -> float:
    value = os.environ.get("RAYCAP_STALL_SECONDS")
    if value:
        return float(value)
    return STALL_SECONDS_AUTOSCALING if autoscaling() else STALL_SECONDS


def watched(items: Iterator[T], stall: float, what: str) -> Iterator[T]:
    """Yield from `items` (pulled in a daemon thread); raise Unschedulable when none has come for `stall`
    seconds while Ray reports demands it cannot place (a slow but progressing run is left alone)."""
    inbox: queue.Queue = queue.Queue(maxsize=1)
    done = object()

    def pull() -> None:
        try:
            for item in items:
                inbox.put((item, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            inbox.put((None, e))
            return
        inbox.put((done, None))

    threading.Thread(target=pull, daemon=True, name="raycap-watched").start()
    last = time.monotonic()
    while True:
        try:
            item, error = inbox.get(timeout=min(10.0, stall))
        except queue.Empty:
            if time.monotonic() - last < stall:
                continue
            demands = pending_demands()
            if not demands:
                last = time.monotonic()  # busy, not stuck
                continue
            raise Unschedulable(
                f"no {what} finished in {stall:g}s and Ray cannot place {'; '.join(demands)} on "
                f"these nodes: {describe(node_shapes())} (RAYCAP_STALL_SECONDS sets the limit)"
            ) from None
        if error is not None:
            raise error
        if item is done:
            return
        last = time.monotonic()
        yield item
