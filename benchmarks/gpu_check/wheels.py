"""Stage 1: install the packages the GPU machine lacks from carried wheels, and say what is missing.

    python3 benchmarks/gpu_check/wheels.py --wheels .whl --target DIR

For each file of the wheel folder: ``NAME-....whl`` is installed with ``pip install --no-index
--no-deps --target DIR`` unless its module already imports; ``NAME-....whl.tar.xz`` (a wheel's
unpacked files, tarred to fit the carry limit: see benchmarks/README.md) is first zipped back
into the wheel of that name. Nothing is installed into the machine's own environment: the caller
puts DIR on PYTHONPATH. Then every module the check can use is reported as present or missing,
with what its absence skips. Exit status 1 when an install failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Distribution (as in a wheel's file name) -> the module it provides.
MODULE_OF = {"cupy_cuda13x": "cupy", "cupy_cuda12x": "cupy", "pytest_benchmark": "pytest_benchmark",
             "py_cpuinfo2": "cpuinfo", "py_cpuinfo": "cpuinfo", "cuda_pathfinder": "cuda.pathfinder"}
# What the check loses without a module.
NEEDED_FOR = {
    "triton": "the Triton backend (its smoke, correctness and benchmark rows)",
    "cupy": "the CUDA C++ backend (its smoke, correctness and benchmark rows)",
    "pytest": "stage 2's GPU tests",
    "pytest_benchmark": "nothing in this check (only `pytest benchmarks --benchmark-only`)",
}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def distribution(path: Path) -> str:
    return path.name.split("-", 1)[0].lower().replace(".", "_")


def rebuild_wheel(archive: Path, directory: Path) -> Path:
    """The wheel ``archive`` (``X.whl.tar.xz``, a tar of the wheel's files) zipped back as X.whl.
    Stored uncompressed: pip checks the files against the wheel's RECORD, not the zip."""
    wheel = directory / archive.name.removesuffix(".tar.xz")
    unpacked = directory / (wheel.name + ".d")
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for file in sorted(p for p in unpacked.rglob("*") if p.is_file()):
            zf.write(file, file.relative_to(unpacked).as_posix())
    return wheel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, required=True, help="folder of carried wheels")
    ap.add_argument("--target", type=Path, required=True, help="install folder (on PYTHONPATH)")
    args = ap.parse_args(argv)
    status = 0
    files = sorted(list(args.wheels.glob("*.whl")) + list(args.wheels.glob("*.whl.tar.xz"))) \
        if args.wheels.is_dir() else []
    if not files:
        print(f"wheels: no {args.wheels}/ folder or no wheels in it: nothing to install")
    with tempfile.TemporaryDirectory() as scratch:
        to_install = []
        for path in files:
            module = MODULE_OF.get(distribution(path), distribution(path))
            if importable(module):
                print(f"wheels: {path.name}: module {module!r} is already installed; not installing")
                continue
            try:
                wheel = rebuild_wheel(path, Path(scratch)) if path.name.endswith(".tar.xz") else path
            except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
                print(f"wheels: FAILED to unpack {path.name}: {exc}")
                status = 1
                continue
            to_install.append(wheel)
        if to_install:
            command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                       "--disable-pip-version-check", "--target", str(args.target),
                       *map(str, to_install)]
            print("wheels: " + " ".join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                print("wheels: FAILED: pip could not install them (is pip there? "
                      f"`{sys.executable} -m pip --version`)")
                status = 1
    sys.path.insert(0, str(args.target))
    importlib.invalidate_caches()
    for module, use in NEEDED_FOR.items():
        print(f"module {module}: " + ("present" if importable(module) else f"MISSING: skips {use}"))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
