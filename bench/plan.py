"""Bulk inputs: planning time, driver peak RSS and plan bytes for simulated 1 M / 10 M listings, nested and flat,
the resume check of a finished run, a flat prefix planned from a moto S3 server, and parallel prefix listing vs
`fs.find` on moto.

    python bench/plan.py                     # 1 M and 10 M ids, nested and flat, each planned in a child process;
                                             # then 20,000 keys in one prefix planned from moto
    python bench/plan.py --sizes 100000      # quicker
    python bench/plan.py --listing 100000    # moto: 100k keys in nested prefixes, find vs parallel listing

Targets: 10 M ids planned in <= 60 s with <= 1 GB driver peak RSS, flat from 1 M to 10 M (the ratio printed, <= 1.2x
for one flat prefix); deciding that a finished 10 M run has nothing left <= 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import fsspec
from fsspec.spec import AbstractFileSystem

from raycap import listing, markers, plan, schema, storage

FILES_PER_FOLDER = 1000  # leaf prefix size of the simulated listings


class SimulatedListing(AbstractFileSystem):
    """A read-only bucket of `n` empty images in two prefix levels (a/bbb/cccccc.jpg), generated on `ls`."""

    protocol = "simlist"
    cachable = False

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.leaves = -(-n // FILES_PER_FOLDER)

    def ls(self, path: str, detail: bool = True, **kwargs):
        parts = path.strip("/").split("/")[1:]  # below the bucket
        if len(parts) == 0:
            names = sorted({f"{leaf // 100:04d}" for leaf in range(self.leaves)})
            kind = "directory"
        elif len(parts) == 1:
            top = int(parts[0])
            names = [f"{leaf % 100:02d}" for leaf in range(top * 100, min(self.leaves, top * 100 + 100))]
            kind = "directory"
        else:
            leaf = int(parts[0]) * 100 + int(parts[1])
            first = leaf * FILES_PER_FOLDER
            names = [f"{i:08d}.jpg" for i in range(first, min(self.n, first + FILES_PER_FOLDER))]
            kind = "file"
        base = path.rstrip("/")
        return [{"name": f"{base}/{n}", "type": kind, "size": 0} for n in names]


class FlatBucket(AbstractFileSystem):
    """A read-only bucket of `n` empty images in ONE prefix (hash-length names), answering S3's ListObjectsV2 a
    page of 1,000 keys at a time (generated from the continuation token), as s3fs's `call_s3` does; no `ls`."""

    protocol = "flatlist"
    cachable = False

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def ls(self, path: str, detail: bool = True, **kwargs):
        raise AssertionError("a whole level was asked for")

    def call_s3(self, method: str, **kw) -> dict:
        first = int(kw.get("ContinuationToken", 0))
        last = min(self.n, first + 1000)
        keys = [{"Key": f"{kw['Prefix']}{i:032x}.jpg", "Size": 0} for i in range(first, last)]
        return {"Contents": keys, "IsTruncated": last < self.n, "NextContinuationToken": str(last)}


def source(layout: str, n: int, where: str | None) -> tuple[AbstractFileSystem, str]:
    """The input of a child: `n` simulated ids nested or flat, the moto server's flat prefix at endpoint `where`,
    or the local folder `where`."""
    if layout == "moto":
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": where}}
        return fsspec.filesystem("s3", skip_instance_cache=True, **options), "bench/flat"
    if layout == "local":
        return storage.filesystem(where)
    return (FlatBucket(n) if layout == "flat" else SimulatedListing(n)), "/bucket"


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, workdir: str, layout: str, where: str | None) -> dict:
    """Plan `n` ids into `workdir`, then time the resume check of a run whose shards all finished."""
    out_fs, out = storage.filesystem(os.path.join(workdir, "out"))
    started = time.perf_counter()
    in_fs, in_root = source(layout, n, where)
    requests = []
    if hasattr(in_fs, "call_s3"):  # count the listing's requests
        call = in_fs.call_s3
        in_fs.call_s3 = lambda method, **kw: (requests.append(method), call(method, **kw))[1]
    made = plan.prepare(in_fs, in_root, out_fs, out, shard_size=256, actors=8, say=lambda _: None)
    assert made.files == n, made.files
    planning = time.perf_counter() - started
    plan_rss = peak_rss_mb()
    plan_bytes = sum(
        os.path.getsize(os.path.join(out, schema.PLAN_DIR, f)) for f in os.listdir(os.path.join(out, schema.PLAN_DIR))
    )
    marker_dir = os.path.join(out, schema.SHARDS_DIR)
    os.makedirs(marker_dir)
    for part in made.parts:  # simulate a finished run: one committed marker per shard
        for k in range(part["first_shard"], part["first_shard"] + part["shards"]):
            os.close(os.open(os.path.join(marker_dir, markers.marker_name(k, 250, 6)), os.O_CREAT | os.O_WRONLY))
    started = time.perf_counter()
    header = plan.prepare(*source(layout, 0, where), out_fs, out, None, 8, say=lambda _: None)
    done = markers.finished_shards(out_fs, out)
    left = plan.pending_parts(header, done)
    resume = time.perf_counter() - started
    assert not left and len(done) == made.shards
    return {
        "ids": n,
        "list_requests": len(requests),
        "shards": made.shards,
        "parts": len(made.parts),
        "planning_s": round(planning, 2),
        "plan_peak_rss_mb": round(plan_rss, 1),
        "plan_mb": round(plan_bytes / 2**20, 1),
        "resume_check_s": round(resume, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def planned_in_child(n: int, layout: str, where: str | None = None) -> dict:
    """`child` in a fresh process, with that process's peak RSS as the kernel counted it."""
    with tempfile.TemporaryDirectory(prefix="raycap-plan-") as workdir:
        command = [sys.executable, __file__, "--child", str(n), "--workdir", workdir, "--layout", layout]
        command += ["--where", where] if where else []
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child failed"
        result = json.loads(proc.stdout.read())
        result["child_maxrss_mb"] = round(usage.ru_maxrss / 1024, 1)
        return result


def run_sizes(sizes: list[int], layouts: list[str]) -> None:
    for layout in layouts:
        results = []
        for n in sizes:
            result = planned_in_child(n, layout)
            results.append(result)
            print(
                f"{layout:>6} {n:>11,} ids: planned in {result['planning_s']} s, {result['shards']} shards in "
                f"{result['parts']} parts, plan {result['plan_mb']} MB, driver peak RSS "
                f"{result['plan_peak_rss_mb']} MB planning, {result['child_maxrss_mb']} MB with the resume check; "
                f"finished run -> nothing to do in {result['resume_check_s']} s",
                flush=True,
            )
        if len(results) > 1:
            lo, hi = results[0], results[-1]
            print(
                f"{layout:>6} peak RSS {hi['ids']:,} / {lo['ids']:,} ids: planning "
                f"{hi['plan_peak_rss_mb'] / lo['plan_peak_rss_mb']:.2f}x, with the resume check "
                f"{hi['child_maxrss_mb'] / lo['child_maxrss_mb']:.2f}x (ids {hi['ids'] / lo['ids']:.0f}x)",
                flush=True,
            )


def moto_server(keys: int, latency_ms: float, flat: int) -> None:
    """Child process: a moto S3 server holding `keys` empty keys in 10 x 10 nested prefixes under `in/` and `flat`
    hash-named ones in the one prefix `flat/`; prints its endpoint and serves until stdin closes. Keys go straight
    into moto's backend (no HTTP), the fast bulk creation."""
    import hashlib
    import logging

    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if latency_ms:  # every request waits as long as an S3 round trip would (requests are served in threads)
        original = DomainDispatcherApplication.__call__

        def slow(self, environ, start_response):
            time.sleep(latency_ms / 1000)
            return original(self, environ, start_response)

        DomainDispatcherApplication.__call__ = slow
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = fsspec.filesystem("s3", key="bench", secret="bench", client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("bench")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    started = time.perf_counter()
    per_leaf = -(-keys // 100)
    for k in range(keys):
        leaf = k // per_leaf
        backend.put_object("bench", f"in/{leaf // 10:02d}/{leaf % 10:02d}/{k:07d}.jpg", b"")
    for k in range(flat):
        backend.put_object("bench", f"flat/{hashlib.md5(str(k).encode()).hexdigest()}.jpg", b"")
    print(json.dumps({"endpoint": endpoint, "create_s": round(time.perf_counter() - started, 1)}), flush=True)
    sys.stdin.read()
    server.stop()


@contextlib.contextmanager
def moto(keys: int, latency_ms: float, flat: int = 0) -> Iterator[dict]:
    """A moto server in its own process (see `moto_server`): its endpoint and how long the keys took to create."""
    command = [sys.executable, __file__, "--moto-server", str(keys), "--latency-ms", str(latency_ms), "--moto-flat"]
    server = subprocess.Popen(command + [str(flat)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        while not line.startswith("{"):  # moto announces itself first
            line = server.stdout.readline()
        yield json.loads(line)
    finally:
        server.stdin.close()
        server.wait()


def run_flat_moto(keys: int) -> None:
    """Plan one flat prefix of `keys` hash-named keys from a moto server, in a child process."""
    with moto(0, 0.0, flat=keys) as info:
        result = planned_in_child(keys, "moto", info["endpoint"])
    print(
        f"moto: {keys:,} keys in one prefix (created in {info['create_s']} s) planned in {result['planning_s']} s "
        f"with {result['list_requests']} ListObjectsV2 requests, driver peak RSS {result['plan_peak_rss_mb']} MB",
        flush=True,
    )


def run_local_flat(sizes: list[int]) -> None:
    """Plan one local folder of n empty files for each n, in a child process each (the folder sorted in runs of
    listing.LOCAL_RUN names, spilled to the temp folder)."""
    peaks = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="raycap-flat-") as folder:
            started = time.perf_counter()
            for k in range(n):
                os.close(
                    os.open(os.path.join(folder, f"{k * 2654435761 % 2**32:08x}-{k}.jpg"), os.O_CREAT | os.O_WRONLY)
                )
            create_s = time.perf_counter() - started
            result = planned_in_child(n, "local", folder)
        peaks.append(result["plan_peak_rss_mb"])
        print(
            f" local {n:>11,} files in one folder (created in {create_s:.1f} s): planned in {result['planning_s']} s, "
            f"driver peak RSS {result['plan_peak_rss_mb']} MB",
            flush=True,
        )
    if len(sizes) > 1:
        print(f" local peak RSS {sizes[-1]:,} / {sizes[0]:,} files: {peaks[-1] / peaks[0]:.2f}x", flush=True)


def run_listing(keys: int, latency_ms: float) -> None:
    """Compare `fs.find` with the parallel prefix listing against a moto server in its own process."""
    with moto(keys, latency_ms) as info:
        print(
            f"moto: {keys:,} keys in 100 nested prefixes created in {info['create_s']} s (in-process backend puts); "
            f"simulated request latency {latency_ms:g} ms",
            flush=True,
        )
        fs = fsspec.filesystem(
            "s3",
            key="bench",
            secret="bench",
            client_kwargs={"endpoint_url": info["endpoint"]},
            skip_instance_cache=True,
        )
        started = time.perf_counter()
        found = fs.find("bench/in")
        fs.invalidate_cache()
        find_s = time.perf_counter() - started
        started = time.perf_counter()
        listed = list(listing.iter_files(fs, "bench/in"))
        parallel_s = time.perf_counter() - started
        assert len(found) == len(listed) == keys
        print(
            f"fs.find {find_s:.2f} s, parallel prefix listing ({listing.LIST_THREADS} in flight) {parallel_s:.2f} s: "
            f"{find_s / parallel_s:.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    p.add_argument("--listing", type=int, default=0, help="keys for the moto listing comparison (0: skip)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated round trip per moto request")
    p.add_argument("--layouts", nargs="*", default=["nested", "flat"], choices=["nested", "flat"])
    p.add_argument("--local-flat", type=int, nargs="*", default=[], help="empty files in one local folder, planned")
    p.add_argument("--flat-moto", type=int, default=20_000, help="keys in one prefix planned from moto (0: skip)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--where", help=argparse.SUPPRESS)
    p.add_argument("--moto-flat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--moto-server", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.moto_server is not None:
        moto_server(a.moto_server, a.latency_ms, a.moto_flat)
        return
    if a.child is not None:
        print(json.dumps(child(a.child, a.workdir, a.layout, a.where)))
        return
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    flags = [f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in cpuinfo]
    print(f"CPU flags: {' '.join(flags) or 'none of avx2/avx512_bf16/amx_bf16'}; {os.cpu_count()} cores")
    if a.listing:
        run_listing(a.listing, a.latency_ms)
    if a.sizes:
        run_sizes(a.sizes, a.layouts)
    if a.flat_moto:
        run_flat_moto(a.flat_moto)
    if a.local_flat:
        run_local_flat(a.local_flat)


if __name__ == "__main__":
    main()
