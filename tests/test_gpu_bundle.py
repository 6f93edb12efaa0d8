"""The GPU machine's carried bundle (bench/gpu_bundle.py): which distributions it carries."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

_spec = importlib.util.spec_from_file_location("gpu_bundle", Path(__file__).parent.parent / "bench" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bundle)


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
