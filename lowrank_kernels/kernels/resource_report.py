"""One report of what every kernel of the package uses on sm_90a and sm_80, without a GPU: the
Triton variants (``triton/aot.py``) and the CUDA C++ kernels as NVRTC compiles them at run time
(``cuda/nvrtc_check.py``), with the tool versions that produced it.

    python -m lowrank_kernels.kernels.resource_report --out benchmarks/results/kernel_resources.md

Each part runs where its compiler is present and says so where it is not. Exit status 1 when a
kernel fails to compile or breaks a rule (spills in a memory-bound kernel, no 128-bit accesses
where the launcher asserts alignment).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

from . import resources


def _triton_part() -> tuple[str, list[resources.KernelResources]]:
    try:
        import triton

        from .triton import aot
    except ImportError as error:
        return f"## Triton kernels\n\nskipped: {error}\n", []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "## Triton kernels\n\nskipped: TRITON_INTERPRET is set (unset it to compile)\n", []
    rows = aot.check_all()
    ptxas = {arch: _tool_version(resources.find_ptxas(arch)) for arch in aot.ARCHS}
    head = (f"## Triton kernels (Triton {triton.__version__})\n\n"
            f"Every variant the launchers emit (`python -m lowrank_kernels.kernels.triton.aot`); "
            f"ptxas: {', '.join(f'{a}: {p}' for a, p in ptxas.items())}. Scalar accesses in the "
            f"aligned step variants belong to the masked tail chunk and the table reads.\n")
    return head, rows


def _tool_version(path: str | None) -> str:
    """'ptxas-blackwell 13.4.x' rather than a path on this machine."""
    if path is None:
        return "not found"
    import subprocess

    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    release = next((line for line in out.splitlines() if "release" in line), out)
    return f"{Path(path).name} ({release.split(',')[-1].strip() or 'unknown version'})"


def _cuda_part() -> tuple[str, list[resources.KernelResources]]:
    from .cuda import compile as cuda_compile
    from .cuda import nvrtc, nvrtc_check

    try:
        major, minor = nvrtc.version()
    except nvrtc.NvrtcUnavailable as error:
        return f"## CUDA C++ kernels\n\nskipped: {error}\n", []
    rows = nvrtc_check.check_all()
    head = (f"## CUDA C++ kernels (NVRTC {major}.{minor})\n\n"
            f"Compiled as loaded at run time (`python -m lowrank_kernels.kernels.cuda.nvrtc_check`),"
            f" options `{' '.join(cuda_compile.OPTIONS)}`. Scalar accesses belong to the tail and "
            f"unaligned fallback paths.\n")
    return head, rows


def build_report() -> tuple[str, list[resources.KernelResources]]:
    import torch

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        "# Kernel resources, compiled ahead of time (no GPU)",
        "",
        f"{stamp}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.machine()}. Registers, spills and stack from `ptxas -v`; global access "
        f"widths counted in the PTX (static instruction counts, not executions). Nothing here "
        f"ran on a GPU.",
        "",
    ]
    every_row = []
    for part in (_triton_part, _cuda_part):
        head, rows = part()
        lines.append(head)
        if rows:
            lines += [resources.markdown_table(rows), ""]
        every_row += rows
    return "\n".join(lines), every_row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_kernels.kernels.resource_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="FILE", help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    text, rows = build_report()
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    defects = [r for r in rows if resources.is_defect(r)]
    for r in defects:
        print(f"{r.kernel} {r.variant} {r.arch}: {resources.verdict(r)}", file=sys.stderr)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
