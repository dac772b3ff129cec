"""Compile every csrc/ kernel exactly as the run-time loader does, for sm_90a and sm_80, on a
machine without a GPU, and report what each kernel uses.

The program compiled per source and architecture is ``compile.compile_spec`` (the same inlined
text, options and kernel names the loader compiles) through the same ``nvrtc.compile_program``.
Registers, spills, stack and static shared memory come from the ptxas that NVRTC runs to make the
loaded cubin (``-Xptxas=-v`` is one of the loader's options); the widths of global loads and stores
are counted in the PTX of the same program.

    python -m lowrank_kernels.kernels.cuda.nvrtc_check --report

prints the table (exit status 1 when a kernel fails to compile or a memory-bound kernel spills or
lacks 128-bit accesses). Nothing here runs a kernel: timings need a GPU.
"""
from __future__ import annotations

import argparse
import re
import sys
from functools import lru_cache

from .. import resources
from . import compile as cuda_compile
from . import nvrtc

ARCHS = ("sm_90a", "sm_80")

# Kernels whose speed is set by memory traffic: they must not spill and must move 16 bytes per
# thread access where the data allows. sgd_step streams 2-3 tensors; decay_outer_ makes one pass
# over W with a rank-K product of small K (below the machine balance of either dtype).
MEMORY_BOUND_SOURCES = frozenset({"sgd_step.cu", "decay_outer.cu"})

_ENTRY = re.compile(r"^\s*\.(?:visible\s+)?\.entry\s+(\w+)\s*\(", re.MULTILINE)


def entry_ptx(ptx: str) -> dict[str, str]:
    """The PTX text of each kernel entry (from its .entry line to the next one)."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
    return {name: ptx[start:(starts[i + 1][0] if i + 1 < len(starts) else len(ptx))]
            for i, (start, name) in enumerate(starts)}


@lru_cache(maxsize=None)
def compile_source(filename: str, arch: str) -> nvrtc.CompiledProgram:
    """One source compiled for ``arch`` exactly as loaded (cached for the life of the process)."""
    return cuda_compile.build(cuda_compile.compile_spec(filename, arch))


def check_source(filename: str, arch: str) -> list[resources.KernelResources]:
    memory_bound = filename in MEMORY_BOUND_SOURCES
    kernels = cuda_compile.KERNELS[filename]
    try:
        program = compile_source(filename, arch)
    except nvrtc.NvrtcCompileError as error:
        return [resources.KernelResources(kernel=k, variant=filename, arch=arch,
                                          memory_bound=memory_bound, no_spills=memory_bound,
                                          error=str(error))
                for k in kernels]
    usage = resources.parse_ptxas_verbose(program.log)
    entries = entry_ptx(program.ptx)
    rows = []
    for kernel in kernels:
        symbol = program.lowered_names[kernel]
        info = usage.get(symbol, {})
        missing = [] if info else ["no ptxas report"]
        if symbol not in entries:
            missing.append("no PTX entry")
        rows.append(resources.KernelResources(
            kernel=kernel, variant=filename, arch=arch, registers=info.get("registers"),
            spill_stores=info.get("spill_stores"), spill_loads=info.get("spill_loads"),
            stack=info.get("stack"), shared=info.get("shared"),
            access=resources.count_global_accesses(entries.get(symbol, "")),
            memory_bound=memory_bound, no_spills=memory_bound,
            error=", ".join(missing) or None))
    return rows


def check_all(archs=ARCHS) -> list[resources.KernelResources]:
    """Every kernel of every csrc/ source, compiled for each of ``archs``."""
    return [row for filename in cuda_compile.KERNELS for arch in archs
            for row in check_source(filename, arch)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print the resource table")
    parser.add_argument("--arch", action="append", help=f"architecture (default: {ARCHS})")
    args = parser.parse_args(argv)
    rows = check_all(tuple(args.arch) if args.arch else ARCHS)
    if args.report:
        major, minor = nvrtc.version()
        print(f"NVRTC {major}.{minor} ({nvrtc.library_path()}), options: "
              f"{' '.join(cuda_compile.OPTIONS)}\n")
        print(resources.markdown_table(rows))
    defects = [r for r in rows if resources.is_defect(r)]
    for r in defects:
        print(f"{r.kernel} {r.arch}: {resources.verdict(r)}" + (f"\n{r.error}" if r.error else ""),
              file=sys.stderr)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
