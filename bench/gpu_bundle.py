"""Ray and exactly the packages a GPU machine lacks, stripped of what raycap never imports, as one carried file.

The GPU machine lent for bench/gpu.py has Python, torch, torchvision, pyarrow and the packages in GPU_MACHINE,
but no Ray and no network. This script resolves `ray[data,train]` (and raycap's own pure-Python needs) against
that list, requirement by requirement, and packs what is missing into one `tar.xz` (at most --max-mib):

    python bench/gpu_bundle.py                      # downloads cp312 manylinux x86_64 wheels (make gpu-bundle)
    python bench/gpu_bundle.py --from-installed     # no download: this interpreter's installed Ray (the tests)

`bench/gpu.py --bundle FILE` unpacks it and puts it on the path of the check, its commands and their Ray workers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

RAY = "ray[data,train]==2.60.0"  # the Ray raycap is built and tested on
# raycap's own needs beyond Ray that the GPU machine lacks, and the only parts raycap imports of each:
# training's validation scores BLEU-4 and CIDEr with pycocoevalcap's pure-Python scorers (its jars, 100 MB, and
# pycocotools serve its COCOEvalCap, which raycap does not use).
RAYCAP_EXTRA = {"pycocoevalcap": ("pycocoevalcap/bleu/", "pycocoevalcap/cider/", "pycocoevalcap/rouge/")}
# What the GPU machine has (as lent: Python 3.12, torch 2.11 + CUDA 13), with the packages those bring along.
GPU_MACHINE = frozenset(
    canonicalize_name(n)
    for n in (  # noqa: SIM905 - one word per package, commented by group
        "torch torchvision pyarrow pandas fsspec safetensors pillow numpy aiohttp grpcio protobuf msgpack click "
        "filelock pyyaml requests "
        # brought by torch: typing-extensions, sympy, networkx, jinja2; by aiohttp: attrs, yarl, multidict, ...;
        # by requests: urllib3, idna, certifi, charset-normalizer; by pandas: python-dateutil, tzdata
        "typing-extensions sympy mpmath networkx jinja2 markupsafe setuptools attrs yarl multidict frozenlist "
        "aiosignal aiohappyeyeballs propcache idna urllib3 certifi charset-normalizer python-dateutil six tzdata"
    ).split()
)
# Parts of the bundled packages raycap never imports (Java, the dashboard's web client, RLlib, Serve, LLM serving,
# the C++ API and Cython headers), and every package's tests and compiled caches.
STRIP = re.compile(
    r"^ray/(jars|dashboard/client|rllib|serve|llm|cpp|includes)/|(^|/)(tests?|__pycache__)/|\.data/|/RECORD$"
)
ROOTS = [Requirement(RAY), *(Requirement(n) for n in RAYCAP_EXTRA)]
MANIFEST = "BUNDLE.json"  # at the bundle's root: target, packages and versions, what was stripped


def target_environment(python_version: str | None) -> dict[str, str]:
    """Marker environment of the target interpreter (Linux x86_64 CPython), or this one's when None."""
    env = default_environment()
    if python_version:
        env |= {"python_version": python_version, "python_full_version": f"{python_version}.0",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "os_name": "posix", "implementation_name": "cpython",
                "platform_python_implementation": "CPython"}  # fmt: skip
    return env


def requirements_of(metadata: str, extras: set[str], env: dict[str, str]) -> list[Requirement]:
    """The Requires-Dist lines of a METADATA text that apply to this environment with these extras."""
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate(env | {"extra": e}) for e in (extras or {""})):
            out.append(req)
    return out


def resolve(
    roots: list[Requirement], metadata_of: Callable[[list[Requirement]], dict[str, str]], env: dict[str, str]
) -> list[str]:
    """Canonical names of every distribution reachable from `roots` that the GPU machine lacks, checking each
    requirement of each (metadata_of: requirement -> its METADATA text, fetched a round at a time)."""
    needed: dict[str, str] = {}
    wanted = [r for r in roots if canonicalize_name(r.name) not in GPU_MACHINE]
    while wanted:
        texts = metadata_of(wanted)
        following = []
        for req in wanted:
            name = canonicalize_name(req.name)
            needed[name] = texts[name]
            if name in RAYCAP_EXTRA:
                continue  # only its scorers are carried; they import nothing beyond the standard library
            for dep in requirements_of(texts[name], set(req.extras), env):
                dep_name = canonicalize_name(dep.name)
                if (
                    dep_name not in GPU_MACHINE
                    and dep_name not in needed
                    and dep_name not in {canonicalize_name(f.name) for f in following}
                ):
                    following.append(dep)
        wanted = following
    return sorted(needed)


def keep(distribution: str, path: str) -> bool:
    """Whether a file of a bundled distribution goes into the bundle."""
    if STRIP.search(path):
        return False
    parts = RAYCAP_EXTRA.get(distribution)
    return parts is None or path.startswith(parts) or ".dist-info/" in path


# --- where the files come from: downloaded wheels, or the distributions installed for this interpreter ---


def download(reqs: list[Requirement], wheels: Path, python_version: str, platforms: list[str]) -> dict[str, Path]:
    """pip-download each requirement's wheel (no dependencies: resolve() walks them) for the target."""
    tag = python_version.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
               "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none", "-d", str(wheels)]  # fmt: skip
    for platform in platforms:
        command += ["--platform", platform]
    # Without markers: they were evaluated for the target (pip would evaluate `extra` here, and drop the line).
    subprocess.run([*command, *(f"{r.name}{r.specifier}" for r in reqs)], check=True)
    found = {}
    for wheel in wheels.glob("*.whl"):
        name = canonicalize_name(wheel.name.split("-")[0])
        if any(canonicalize_name(r.name) == name for r in reqs):
            found[name] = wheel
    missing = [r.name for r in reqs if canonicalize_name(r.name) not in found]
    if missing:
        raise SystemExit(f"gpu_bundle: pip downloaded no wheel for {', '.join(missing)}")
    return found


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def wheel_files(wheel: Path) -> Iterator[tuple[str, Callable[[], bytes], int]]:
    """(path, read, mode) of each file in a wheel."""
    z = zipfile.ZipFile(wheel)
    for info in z.infolist():
        if not info.is_dir():
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            yield info.filename, (lambda i=info: z.read(i)), mode


def installed_metadata(reqs: list[Requirement]) -> dict[str, str]:
    return {canonicalize_name(r.name): importlib.metadata.distribution(r.name).read_text("METADATA") for r in reqs}


def resolve_names_installed() -> list[str]:
    """What the bundle carries when built from this interpreter's installed distributions."""
    return resolve(ROOTS, installed_metadata, target_environment(None))


def installed_files(name: str) -> Iterator[tuple[str, Callable[[], bytes], int]]:
    """(path, read, mode) of each file of an installed distribution inside its site-packages."""
    dist = importlib.metadata.distribution(name)
    for f in dist.files or []:
        path = str(f)
        if path.startswith("..") or os.path.isabs(path):
            continue  # console scripts, outside site-packages
        source = Path(dist.locate_file(f))
        if source.is_file():
            yield path, source.read_bytes, source.stat().st_mode & 0o777


# --- building ---


def build(names: list[str], files_of: Callable[[str], Iterator[tuple[str, Callable[[], bytes], int]]],
          versions: dict[str, str], target: dict, folder: Path) -> dict:  # fmt: skip
    """Write the kept files of each distribution under `folder`; returns the bundle's manifest."""
    kept_bytes, stripped_bytes = 0, 0
    for name in names:
        for path, read, mode in files_of(name):
            if not keep(name, path):
                stripped_bytes += len(read()) if name == "ray" else 0
                continue
            data = read()
            out = folder / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            out.chmod(mode | 0o600)
            kept_bytes += len(data)
    manifest = {"target": target, "packages": {n: versions[n] for n in names}, "gpu_machine_has": sorted(GPU_MACHINE),
                "stripped": STRIP.pattern, "unpacked_bytes": kept_bytes,
                "ray_stripped_bytes": stripped_bytes}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def compress(folder: Path, archive: Path, preset: int) -> int:
    """folder -> archive (tar.xz, members relative to the folder, sorted); returns its size in bytes."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".tmp")
    with lzma.open(partial, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    partial.replace(archive)
    return archive.stat().st_size


def unpack(bundle: str, into: str) -> str:
    """A bundle (tar.xz, or a folder built with --no-compress) -> the folder to put on the path."""
    if os.path.isdir(bundle):
        return bundle
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(into, filter="data")
    return into


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12", help="target Python (download mode)")
    parser.add_argument("--platform", action="append", help="target wheel platforms (default: manylinux x86_64)")
    parser.add_argument("--from-installed", action="store_true", help="no download: this interpreter's Ray")
    parser.add_argument("--output", help="the bundle file (default gpu-bundle/raycap-gpu-<python>.tar.xz)")
    parser.add_argument("--no-compress", action="store_true", help="write the folder --output, no archive")
    parser.add_argument("--max-mib", type=float, default=40.0, help="fail when the bundle is larger")
    parser.add_argument("--xz-preset", type=int, default=9, help="xz level (9: 64 MiB dictionary)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    here = args.from_installed
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}" if here else args.python_version
    platforms = args.platform or ["manylinux2014_x86_64", "manylinux_2_28_x86_64"]
    tag = "cp" + python_version.replace(".", "")
    output = Path(args.output or f"gpu-bundle/raycap-gpu-{tag}{'' if args.no_compress else '.tar.xz'}")
    env = target_environment(None if here else python_version)
    wheels = Path("gpu-bundle") / f"wheels-{tag}"
    found: dict[str, Path] = {}
    if here:
        ray_version = importlib.metadata.version("ray")
        if ray_version not in Requirement(RAY).specifier:
            raise SystemExit(f"gpu_bundle: this interpreter has Ray {ray_version}, the bundle carries {RAY}")

        metadata_of = installed_metadata
        files_of = installed_files
    else:
        wheels.mkdir(parents=True, exist_ok=True)

        def metadata_of(reqs: list[Requirement]) -> dict[str, str]:
            found.update(download(reqs, wheels, python_version, platforms))
            return {canonicalize_name(r.name): wheel_metadata(found[canonicalize_name(r.name)]) for r in reqs}

        def files_of(name: str) -> Iterator[tuple[str, Callable[[], bytes], int]]:
            return wheel_files(found[name])

    texts: dict[str, str] = {}

    def remembered(reqs: list[Requirement]) -> dict[str, str]:
        got = metadata_of(reqs)
        texts.update(got)
        return got

    names = resolve(ROOTS, remembered, env)
    versions = {n: re.search(r"^Version: (.+)$", texts[n], re.M).group(1).strip() for n in names}
    target = {"python": python_version, "platforms": platforms if not here else [sys.platform], "ray": versions["ray"]}
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        folder = output if args.no_compress else Path(tmp) / "bundle"
        if args.no_compress and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        manifest = build(names, files_of, versions, target, folder)
        size = manifest["unpacked_bytes"] if args.no_compress else compress(folder, output, args.xz_preset)
    listed = ", ".join(f"{n} {v}" for n, v in versions.items())
    kind = "unpacked (not compressed)" if args.no_compress else "xz"
    print(f"{output}: {size / 2**20:.1f} MiB {kind}, {manifest['unpacked_bytes'] / 2**20:.0f} MiB unpacked; {listed}")
    if not args.no_compress and size > args.max_mib * 2**20:
        print(f"gpu_bundle: {output} is {size / 2**20:.1f} MiB, over --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
