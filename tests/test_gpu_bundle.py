"""The GPU machine's carried bundle (bench/gpu_bundle.py), built from this venv's Ray: a fresh interpreter that has
only the GPU machine's packages and the bundle runs Ray Data and a one-worker TorchTrainer with it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from raycap.train import CONTROLLER_POLL_ENV, CONTROLLER_POLL_S

_spec = importlib.util.spec_from_file_location("gpu_bundle", Path(__file__).parent.parent / "bench" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bundle)

# Run by the fresh interpreter: everything it imports must come from the bundle or the GPU machine's packages.
CHECK = textwrap.dedent(
    """
    import os, sys, tempfile
    bundle, machine = sys.argv[1], sys.argv[2]
    import ray, ray.data, ray.train.torch, pydantic, jsonschema, tensorboardX
    from pycocoevalcap.cider.cider import Cider
    for module in (ray, pydantic, jsonschema, tensorboardX):
        assert module.__file__.startswith(bundle), module.__file__
    import torch, pyarrow
    assert torch.__file__.startswith(machine) and pyarrow.__file__.startswith(machine)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def where():
        import ray
        return ray.__file__
    assert ray.get(where.remote()).startswith(bundle)  # the workers' path too
    total = ray.data.range(40, override_num_blocks=4).map_batches(lambda b: {"id": b["id"] * 2}).sum("id")
    assert total == 2 * sum(range(40)), total

    def loop(config):
        import ray.train, ray.train.torch, torch
        model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(torch.ones(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        # Train V2 keeps the metrics of reports that carry a checkpoint, as raycap's training reports them.
        with tempfile.TemporaryDirectory() as d:
            torch.save(model.state_dict(), os.path.join(d, "model.pt"))
            metrics = {"loss": float(loss.detach()), "world": ray.train.get_context().get_world_size()}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    result = ray.train.torch.TorchTrainer(
        loop, scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=sys.argv[3]),
    ).fit()
    assert result.error is None and result.metrics["world"] == 1, result
    print("BUNDLE OK", total, result.metrics["loss"])
    """
)


def _gpu_machine(into: Path) -> Path:
    """A folder with links to this venv's copies of the GPU machine's packages (and what they depend on), and
    nothing of Ray or of what the bundle carries."""
    into.mkdir()
    carried = set(gpu_bundle.resolve_names_installed())
    todo, seen = [n for n in gpu_bundle.GPU_MACHINE], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in carried:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # on the GPU machine, not needed here (e.g. setuptools)
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for f in dist.files or []:
            top = str(f).split("/")[0]
            if top != ".." and not (into / top).exists():
                source = Path(dist.locate_file(top))
                if source.exists():
                    (into / top).symlink_to(source)
    return into


@pytest.mark.slow
def test_a_fresh_interpreter_with_only_the_bundle_runs_ray_data_and_a_torch_trainer(tmp_path):
    bundle = tmp_path / "bundle"
    assert gpu_bundle.main(["--from-installed", "--no-compress", "--output", str(bundle)]) == 0
    assert (bundle / "ray" / "_raylet.so").exists() and (bundle / "pydantic_core").is_dir()
    for stripped in ("ray/jars", "ray/dashboard/client", "ray/rllib", "ray/serve", "ray/llm", "pycocoevalcap/meteor"):
        assert not (bundle / stripped).exists(), stripped
    machine = _gpu_machine(tmp_path / "machine")
    assert (machine / "torch").exists() and not (machine / "ray").exists() and not (machine / "pydantic").exists()
    # A venv without pip and without the system's packages: the GPU machine's interpreter, with nothing installed.
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_ADDRESS", "VIRTUAL_ENV"))}
    env |= {"PYTHONPATH": f"{bundle}{os.pathsep}{machine}", "PYTHONNOUSERSITE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            CONTROLLER_POLL_ENV: CONTROLLER_POLL_S}  # fmt: skip
    done = subprocess.run(
        [str(tmp_path / "env" / "bin" / "python"), "-c", CHECK, str(bundle), str(machine), str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "BUNDLE OK 1560" in done.stdout


def test_resolution_walks_every_requirement_and_stops_at_the_gpu_machine():
    metadata = {
        "ray": "Requires-Dist: click\nRequires-Dist: jsonschema\nRequires-Dist: pydantic; extra == 'train'\n"
        "Requires-Dist: opencensus; extra == 'default'\n",
        "jsonschema": "Requires-Dist: attrs\nRequires-Dist: rpds-py\n",
        "pydantic": "Requires-Dist: pydantic-core==2.0\nRequires-Dist: typing-extensions\n",
        "rpds-py": "",
        "pydantic-core": "Requires-Dist: typing-extensions\n",
    }
    asked = []

    def metadata_of(reqs):
        asked.append(sorted(r.name for r in reqs))
        return {canonicalize_name(r.name): metadata[canonicalize_name(r.name)] for r in reqs}

    names = gpu_bundle.resolve([Requirement("ray[train]")], metadata_of, gpu_bundle.target_environment("3.12"))
    assert names == ["jsonschema", "pydantic", "pydantic-core", "ray", "rpds-py"]  # no opencensus, attrs, click
    assert asked == [["ray"], ["jsonschema", "pydantic"], ["pydantic-core", "rpds-py"]]
