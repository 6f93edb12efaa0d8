"""Per-node resource plans: actors and decode tasks fit wherever Ray places them; no plan is one line."""

from __future__ import annotations

import itertools
import time

import pytest

from raycap.resources import (
    SIDE_TASK_CPUS,
    NodeShape,
    Unschedulable,
    pending_demands,
    plan_actors,
    plan_train_workers,
    watched,
)

GIB = 2**30
HEAD = NodeShape(0, 0, 8 * GIB)


def _nodes(shapes: list[NodeShape]) -> list[tuple[float, float]]:
    return [(s.cpus, s.gpus) for s in shapes for _ in range(s.count)]


def _starving_placement_exists(shapes: list[NodeShape], n: int, cpus: float, gpus: float, room: float) -> bool:
    """Brute force: can n actors be placed (each where it fits) so that no node keeps `room` CPUs free?"""
    nodes = _nodes(shapes)
    for counts in itertools.product(*(range(n + 1) for _ in nodes)):
        if sum(counts) != n:
            continue
        free = [(c - k * cpus, g - k * gpus) for (c, g), k in zip(nodes, counts)]
        if all(fc >= -1e-9 and fg >= -1e-9 for fc, fg in free) and all(fc < room - 1e-9 for fc, _ in free):
            return True
    return False


SHAPES = {
    "one 2-CPU machine": [NodeShape(2, 0, 8 * GIB)],
    "0-CPU head + two 1-CPU workers": [HEAD, NodeShape(1, 0, 4 * GIB, 2)],
    "0-CPU head + one 1-CPU worker": [HEAD, NodeShape(1, 0, 4 * GIB)],
    "0-CPU head + 1-CPU and 3-CPU workers": [HEAD, NodeShape(1, 0, 4 * GIB), NodeShape(3, 0, 8 * GIB)],
    "GPU workers with 4 vCPUs": [HEAD, NodeShape(4, 1, 16 * GIB, 2)],
    "GPU worker with 1 vCPU + CPU worker": [HEAD, NodeShape(1, 1, 16 * GIB), NodeShape(2, 0, 4 * GIB)],
}


@pytest.mark.parametrize("name", [n for n, shapes in SHAPES.items() if any(s.gpus for s in shapes)])
def test_no_placement_of_the_planned_gpu_actors_starves_decoding(name):
    shapes = SHAPES[name]
    plan = plan_actors(shapes, None, None)
    n = plan["actors"][1]
    assert n >= 1 and plan["num_gpus"] == 1
    room = max(plan["decode_cpus"], SIDE_TASK_CPUS)
    assert not _starving_placement_exists(shapes, n, plan["actor_cpus"], plan["num_gpus"], room), plan
    assert plan["decode_cpus"] >= 0.25


@pytest.mark.parametrize("name", [n for n, shapes in SHAPES.items() if not any(s.gpus for s in shapes)])
def test_cpu_actors_take_whole_cores_and_every_core(name):
    """CPU actors read and decode their own shards: a core per thread, no room kept for tasks beside them, so
    however Ray places them each node runs at most as many threads as it has cores, and all of them are used."""
    shapes = SHAPES[name]
    plan = plan_actors(shapes, None, None)
    assert plan["num_gpus"] == 0 and plan["actor_cpus"] == plan["threads"]
    assert plan["actors"][1] == sum(s.count * int(s.cpus // plan["threads"]) for s in shapes)


def test_the_issues_cluster_gets_an_actor_on_each_node():
    """0-CPU head + two 1-CPU workers: 0.75-CPU actors once left 0.25 per node and 0.5-CPU decode tasks waited
    forever; now each worker runs one actor that decodes its own shards."""
    plan = plan_actors(SHAPES["0-CPU head + two 1-CPU workers"], None, None)
    assert plan["actors"] == (2, 2) and plan["actor_cpus"] == 1.0
    single = plan_actors(SHAPES["one 2-CPU machine"], None, None)
    assert single["actors"] == (2, 2) and single["actor_cpus"] == 1.0
    autoscaled = plan_actors([HEAD, NodeShape(16, 0, 32 * GIB, 8)], None, None, alive=[HEAD])
    assert autoscaled["actors"] == (1, 64) and autoscaled["actor_cpus"] == 2.0  # grows as c6i.4xlarge nodes join
    gpu = plan_actors(SHAPES["GPU workers with 4 vCPUs"], None, None)
    assert gpu["actors"] == (1, 2) and gpu["num_gpus"] == 1 and gpu["threads"] is None


@pytest.mark.parametrize(
    ("shapes", "gpus_per_actor", "actors", "message"),
    [
        ([HEAD, NodeShape(1, 0, 256 * 2**20, 2)], None, None, "no node can hold a model actor"),
        ([HEAD, NodeShape(0, 0, 4 * GIB, 2)], None, None, "no node can hold a model actor"),
        ([HEAD, NodeShape(2, 0, 4 * GIB, 2)], 1.0, None, "no node has 1 GPU for a model actor"),
        ([HEAD, NodeShape(1, 0, 4 * GIB, 2)], None, (3, 3), "--actors 3:3 needs 3 model actors"),
    ],
)
def test_a_job_no_node_can_run_is_one_line_naming_what_is_missing(shapes, gpus_per_actor, actors, message):
    with pytest.raises(Unschedulable, match=message) as e:
        plan_actors(shapes, gpus_per_actor, actors)
    assert "\n" not in str(e.value) and "nodes: " in str(e.value)


def test_training_workers_pack_and_leave_a_cpu_for_reading():
    assert plan_train_workers([NodeShape(2, 0, 8 * GIB)], 2, None) == (False, 1.0)
    assert plan_train_workers([NodeShape(1, 0, 8 * GIB)], 2, None) == (False, 0.5)
    assert plan_train_workers([NodeShape(2, 0, 8 * GIB)], 1, None) == (False, 1.0)
    assert plan_train_workers(SHAPES["0-CPU head + two 1-CPU workers"], 2, None) == (False, 1.0)
    assert plan_train_workers(SHAPES["GPU workers with 4 vCPUs"], 2, None) == (True, 1.0)
    with pytest.raises(Unschedulable, match="needs 2 nodes' GPUs"):
        plan_train_workers(SHAPES["GPU workers with 4 vCPUs"][:1] + [NodeShape(4, 1, GIB)], 2, True)
    with pytest.raises(Unschedulable, match="do not fit"):
        plan_train_workers([HEAD], 1, None)


def test_watchdog_ends_a_run_whose_demand_ray_cannot_place(ray_session):
    """A stalled iterator while Ray holds an unplaceable demand: Unschedulable within the stall limit."""

    @ray_session.remote(num_cpus=64)
    def too_big() -> int:
        return 1

    ref = too_big.remote()

    def stuck():
        yield ray_session.get(ref)

    started = time.monotonic()
    with pytest.raises(Unschedulable, match=r"no shard finished in 2s and Ray cannot place .*'CPU': 64"):
        list(watched(stuck(), 2.0, "shard"))
    # The message proves the watchdog fired after its 2 s limit; the bound (~30x the normal 2-4 s) only proves
    # that it fired at all rather than waiting on Ray forever.
    assert time.monotonic() - started < 120
    ray_session.cancel(ref, force=True)
    assert list(watched(iter(range(3)), 2.0, "shard")) == [0, 1, 2]
    assert pending_demands() is not None
