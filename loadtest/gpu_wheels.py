"""Download the wheels that `loadtest/gpu_check.sh` installs on a GPU machine that cannot download anything
(`make gpu-wheels`): the server's HTTP stack (FastAPI, uvicorn, pydantic, ...) and the transformers that
this checkout is tested with, with what they import, for CPython 3.12 on manylinux x86-64.

Each package is pinned to the version installed in this checkout's virtual environment (which satisfies
pyproject.toml's ranges), so the GPU machine runs what the tests here ran. The GPU machine's own torch,
numpy, safetensors and accelerate stay as they are (torch is multi-GB; the others are compatible).
Prints each wheel's size and the total, and fails if the total is over the limit (what travels with the
repository to that machine is capped near 64 MiB).

    python -m loadtest.gpu_wheels --dest .gpu-wheels
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The server's own needs beyond torch (pyproject.toml's dependencies) and what they need at import, minus
# what the GPU image has in a compatible version (torch, numpy, safetensors 0.8, accelerate 1.15,
# jinja2, rich, pygments, ninja, psutil). transformers: the image's (5.17) predates what the engine calls
# (>= 5.20, `cache=` keyword), so this checkout's comes along with huggingface-hub 2.x and its needs.
PACKAGES = [
    # HTTP stack
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "typing-inspection",
    "annotated-types",
    "annotated-doc",
    "typing-extensions",
    "opentelemetry-api",
    "uvicorn",
    "click",
    "h11",
    "python-multipart",
    "anyio",
    "idna",
    "httpx",
    "httpcore",
    "certifi",
    "prometheus-client",
    "filelock",
    # transformers and what it checks or imports at start
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "httpx2",
    "httpcore2",
    "truststore",
    "hf-xet",
    "kernels",
    "tomlkit",
    "typer",
    "shellingham",
    "regex",
    "fsspec",
    "packaging",
    "pyyaml",
    "tqdm",
]

PLATFORMS = [
    "manylinux1_x86_64",
    "manylinux2010_x86_64",
    "manylinux2014_x86_64",
    *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35)),
]
LIMIT_MB = 60.0


def pins(packages: list[str]) -> list[str]:
    """name==version for each package, as installed here; SystemExit naming those that are not."""
    out, missing = [], []
    for name in packages:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"gpu_wheels: not installed here: {', '.join(missing)} (run `make install` first)")
    return out


def download(dest: Path, requirements: list[str]) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        *platform_args,
        "-d",
        str(dest),
        *requirements,
    ]
    subprocess.run(cmd, check=True)


def prune(dest: Path, requirements: list[str]) -> None:
    """Remove wheels in `dest` that are not of the pinned versions (two versions of one package stop a
    `pip install --no-deps` of the folder)."""
    wanted = {r.split("==")[0].replace("-", "_").lower(): r.split("==")[1] for r in requirements}
    for wheel in dest.glob("*.whl"):
        name, ver = wheel.name.split("-")[:2]
        if wanted.get(name.lower()) != ver:
            print(f"removing {wheel.name} (not pinned)")
            wheel.unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=Path(".gpu-wheels"))
    ap.add_argument("--limit-mb", type=float, default=LIMIT_MB)
    args = ap.parse_args(argv)
    requirements = pins(PACKAGES)
    args.dest.mkdir(parents=True, exist_ok=True)
    download(args.dest, requirements)
    prune(args.dest, requirements)
    wheels = sorted(args.dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 1e6:8.2f} MB  {w.name}")
    print(f"{total / 1e6:8.2f} MB  total, {len(wheels)} wheels in {args.dest}/")
    if total / 1e6 > args.limit_mb:
        raise SystemExit(f"gpu_wheels: {total / 1e6:.1f} MB is over the {args.limit_mb:g} MB limit")


if __name__ == "__main__":
    main()
