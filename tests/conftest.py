"""Shared fixtures: one local Ray per test session, a tiny synthetic dataset."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def random_trunk_cache(tmp_path_factory):
    """The random encoder's cache file (raycap.encoder.random_cache_path) in this session's own folder, not the
    user's: built by the first test that needs it, read by every later command of the session."""
    from raycap.encoder import CACHE_ENV

    folder = str(tmp_path_factory.mktemp("cache"))
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = folder
    yield folder
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for every test that needs one (started on first use)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A 40-image synthetic dataset shared by the integration tests."""
    from raycap import synth

    root = tmp_path_factory.mktemp("synth")
    synth.generate(str(root), num_images=40, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_features(ray_session, tiny_synth, tmp_path_factory):
    """The tiny dataset's features in 3 shards, extracted once through jobs/extract.py."""
    from tests.helpers import extract

    out = tmp_path_factory.mktemp("features")
    assert extract(str(tiny_synth / "images"), str(out), "--shard-size", "16") == 0
    return out


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback (a real HTTP endpoint, as s3fs tests itself) and its s3fs options."""
    from moto.server import ThreadedMotoServer

    # botocore would otherwise spend ~10 s asking an EC2 metadata endpoint for a region on the first S3 call.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    yield options
    server.stop()
