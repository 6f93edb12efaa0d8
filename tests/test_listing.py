"""Listing streams at every level: S3 prefixes page by page, huge local folders in spilled sorted runs, one order."""

from __future__ import annotations

import bisect
import uuid
from pathlib import Path

import pytest
from fsspec.spec import AbstractFileSystem

from raycap import listing, plan, storage

# Names whose characters sort below '/' next to a folder of the same stem, and past ASCII: where comparing path
# components and comparing whole keys (S3's order) disagree.
AWKWARD = ["a.jpg", "a-1.jpg", "a 2.jpg", "a!.jpg", "a/z.jpg", "a/b/c.jpg", "a0.jpg", "A.jpg", "_DSC0001.JPG",
           "_raw/y.jpg", "é.jpg", "！.jpg", "😀.jpg", "photo [1].jpg", "b/.k/q", ".hidden.jpg", "_plan/x"]  # fmt: skip
HIDDEN = {".hidden.jpg", "b/.k/q", "_plan/x"}  # a dot-file, a dot-folder, raycap's own plan folder
VISIBLE = sorted(set(AWKWARD) - HIDDEN)


class PagedBucket(AbstractFileSystem):
    """A bucket answering ListObjectsV2 as S3 does (byte order, '/' delimiter, pages of `page_size` keys and
    prefixes, continuation tokens) through s3fs's `call_s3`; records every page it returned."""

    protocol = "pagedbucket"
    cachable = False

    def __init__(self, keys: list[str], page_size: int = 1000) -> None:
        super().__init__()
        self.keys, self.page_size = sorted(keys), page_size
        self.pages: list[int] = []  # names returned by each ListObjectsV2 call, in call order

    def ls(self, path, detail=True, **kwargs):
        raise AssertionError(f"a whole level was asked for: ls({path!r})")

    def call_s3(self, method: str, **kw) -> dict:
        assert method == "list_objects_v2" and kw["Delimiter"] == "/", (method, kw)
        prefix = kw["Prefix"]
        token = kw.get("ContinuationToken")  # opaque to the walker, as S3's: here the index of the next key
        i = int(token) if token is not None else bisect.bisect_left(self.keys, prefix)
        contents, prefixes = [], []
        while i < len(self.keys) and self.keys[i].startswith(prefix) and len(contents) + len(prefixes) < self.page_size:
            rest = self.keys[i][len(prefix) :]
            if "/" in rest:
                common = prefix + rest[: rest.index("/") + 1]
                prefixes.append({"Prefix": common})
                i = bisect.bisect_left(self.keys, common[:-1] + "0")  # '0' follows '/': past every key below it
            else:
                contents.append({"Key": self.keys[i], "Size": 0})
                i += 1
        self.pages.append(len(contents) + len(prefixes))
        more = i < len(self.keys) and self.keys[i].startswith(prefix)
        return {"Contents": contents, "CommonPrefixes": prefixes, "IsTruncated": more, "NextContinuationToken": str(i)}

    def isfile(self, path):
        return path.strip("/").partition("/")[2] in self.keys


def _touch(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_a_flat_prefix_is_paged_through_never_listed_whole():
    flat = [f"in/{k:06d}.jpg" for k in range(20_500)]
    bucket = PagedBucket(flat + [f"in/{n}" for n in AWKWARD])
    skipped = listing.Skipped()
    ids, pages_when_yielded = [], []
    for image_id in listing.iter_files(bucket, "bucket/in", threads=4, skipped=skipped):
        ids.append(image_id)
        pages_when_yielded.append(len(bucket.pages))
    assert ids == sorted(VISIBLE + [f[3:] for f in flat]) and skipped.count == 3
    assert max(bucket.pages) == 1000 and len(bucket.pages) == 21 + 4  # the flat level's pages, a/ a/b/ _raw/ b/
    # Streamed: an id comes out with at most its own page and the next listed (of 21), and the 4 folders' pages.
    assert pages_when_yielded[0] <= 2
    assert all(pages <= k // 1000 + 2 + 4 for k, pages in enumerate(pages_when_yielded)), pages_when_yielded[::1000]


def test_s3_order_is_the_local_order_at_every_level(tmp_path):
    _touch(tmp_path, AWKWARD)
    local = list(listing.iter_files(*storage.filesystem(str(tmp_path))))
    paged = list(listing.iter_files(PagedBucket([f"in/{n}" for n in AWKWARD], page_size=2), "bucket/in"))
    assert local == paged == VISIBLE
    assert local.index("a.jpg") < local.index("a/z.jpg") < local.index("a0.jpg")  # whole ids in byte order


def test_a_huge_local_folder_is_sorted_in_spilled_runs_never_held_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "LOCAL_RUN", 10)
    monkeypatch.setattr(listing, "MERGE_FAN", 3)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spill))
    held: list[tuple[int, int]] = []  # (names sorted in memory, merge levels) at each spilled run
    add = listing._Runs.add
    monkeypatch.setattr(
        listing._Runs, "add", lambda self, keys: (held.append((len(keys), len(self.levels))), add(self, keys))[1]
    )
    root = tmp_path / "in"
    names = [f"{k:04d}.jpg" for k in range(337)] + AWKWARD + [f"a/{k:03d}.png" for k in range(25)]
    _touch(root, names)
    skipped = listing.Skipped()
    ids = list(listing.iter_files(*storage.filesystem(str(root)), skipped=skipped))
    assert ids == sorted(set(names) - HIDDEN) and skipped.count == 3
    assert max(n for n, _ in held) == 10 and max(levels for _, levels in held) >= 3  # 10 at a time, merged twice
    assert not list(spill.iterdir())  # the runs are gone once listed


def test_an_incremental_diff_refuses_a_plan_in_another_order():
    old = plan._Diff(iter(["a/z.jpg", "a.jpg"]), iter(["a.jpg", "a/z.jpg", "b.jpg"]))  # components compared
    with pytest.raises(ValueError, match="the plan is not in listing order .*choose a new --output"):
        list(old)
    new = plan._Diff(iter(["a.jpg", "a/z.jpg"]), iter(["a-1.jpg", "a.jpg", "a/b.jpg", "a/z.jpg", "a0.jpg"]))
    assert list(new) == ["a-1.jpg", "a/b.jpg", "a0.jpg"] and new.removed == 0


def test_incremental_plans_each_new_file_once_next_to_names_below_slash(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _touch(src, ["a.jpg", "a/z.jpg", "a0.jpg"])
    args = (*storage.filesystem(str(src)), *storage.filesystem(str(out)))
    plan.prepare(*args, shard_size=2, actors=1, say=lambda _: None)
    _touch(src, ["a-1.jpg", "a/b.jpg", "a.png"])
    grown = plan.prepare(*args, shard_size=2, actors=1, incremental=True, say=lambda _: None)
    assert (grown.files, grown.increments[-1]["files"], grown.increments[-1]["removed"]) == (6, 3, 0)


def test_a_flat_s3_prefix_of_several_pages_lists_in_order(s3_server, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, use_listings_cache=False, skip_instance_cache=True)
    bucket = f"listing-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    flat = [f"{uuid.UUID(int=k * 7919).hex}.jpg" for k in range(2_300)]  # hash-named, as flat buckets are
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]  # the server runs in this process: keys put in bulk, no HTTP
    for name in flat + AWKWARD:
        backend.put_object(bucket, f"in/{name}", b"")
    requests: list[dict] = []
    call = fs.call_s3
    monkeypatch.setattr(fs, "call_s3", lambda method, **kw: (requests.append(kw), call(method, **kw))[1])
    monkeypatch.setattr(fs, "ls", lambda *a, **kw: pytest.fail("a whole level was asked for"))
    skipped = listing.Skipped()
    ids = list(listing.iter_files(fs, f"{bucket}/in", threads=4, skipped=skipped))
    assert ids == sorted(flat + VISIBLE) and skipped.count == 3
    assert sum(1 for r in requests if r["Prefix"] == "in/") == 3  # the flat level came in pages of 1,000
