"""Compile every Triton kernel variant for real GPUs ahead of time, on a machine without one.

The CPU interpreter accepts programs that the real compiler rejects (and hides register spills and
scalar memory accesses), so this module runs Triton's real pipeline (ttir -> ttgir -> llir -> PTX ->
cubin) for sm_90a (H100/H200) and sm_80 (A100) on every variant that the launchers can emit, and
reads the resources of each (``kernels/resources.py``).

Where the variants come from: each kernel module lists its own in ``aot_variants()``, built by the
very ``launch_arguments`` function its launcher calls, and this module feeds those arguments
through Triton's own argument binder, exactly as a launch on a GPU does. So the signature (int64
tables, fp32 scalars), the constexprs, the specialisation of integers and the 16-byte alignment of
pointers are the runtime's, and a new flag added to a launcher is compiled here without being
listed twice.

    python -m lowrank_kernels.kernels.triton.aot --report      # markdown table on stdout
    python -m lowrank_kernels.kernels.triton.aot --json FILE   # the rows as JSON

It must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python
functions); the test suite calls it in a subprocess. Results are cached on disk per
(Triton version, kernel source, variant, architecture), in ``$LOWRANK_AOT_CACHE`` or
``~/.cache/lowrank-kernels/aot``, so a second run only re-reads them.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from ..resources import AccessCounts, KernelResources, count_global_accesses, markdown_table, \
    ptxas_verbose

# kernel module -> (kernel attribute, memory-bound: must use 128-bit accesses and never spill)
KERNELS = {
    "sgd_step": ("_sgd_step_kernel", True),
    "decay_outer": ("_decay_outer_kernel", False),
    "symmetric_eig": ("_symmetric_eig_kernel", False),
}
# Kernels whose every emitted variant must compile without spills (the test enforces it): the
# step is memory-bound, and decay_outer's autotuner prunes the configurations that spill. The
# Jacobi eigensolver is latency-bound (a barrier per round); its few bytes of spills are reported.
NO_SPILLS = ("sgd_step", "decay_outer")
ARCHS = {"sm_90a": 90, "sm_80": 80}
# Variants whose alignment the launcher cannot assert (name contains this) use scalar accesses by
# design; the 128-bit rule applies to the others.
UNALIGNED_MARK = "-any"


def _module(name: str):
    return importlib.import_module(f"lowrank_kernels.kernels.triton.{name}")


def _check_not_interpreted(kernel) -> None:
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError("ahead-of-time compilation needs the real Triton compiler: run it "
                           "without TRITON_INTERPRET=1 (the interpreter replaces the kernels)")


def specialize(kernel, target, args: tuple, kwargs: dict):
    """Triton's own view of one launch: (signature, constexprs, attrs, options), as
    ``JITFunction.run`` computes it on a GPU."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    return signature, constexprs, attrs, options


def compile_variant(kernel, args: tuple, kwargs: dict, arch: str):
    """The CompiledKernel of one launch for ``arch``, compiled without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", ARCHS[arch], 32)
    signature, constexprs, attrs, options = specialize(kernel, target, args, kwargs)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _resources(module_name: str, variant: str, arch: str) -> KernelResources:
    attr, memory_bound = KERNELS[module_name]
    module = _module(module_name)
    kernel = getattr(module, attr)
    _check_not_interpreted(kernel)
    row = KernelResources(kernel=f"triton:{module_name}", variant=variant, arch=arch,
                          memory_bound=memory_bound and UNALIGNED_MARK not in variant,
                          no_spills=module_name in NO_SPILLS)
    args, kwargs = next((a, k) for name, a, k in module.aot_variants() if name == variant)
    try:
        compiled = compile_variant(kernel, args, kwargs, arch)
        ptx = compiled.asm["ptx"]
        info = next(iter(ptxas_verbose(ptx, arch).values()), {})
        row.registers = info.get("registers")
        row.spill_stores, row.spill_loads = info.get("spill_stores"), info.get("spill_loads")
        row.stack = info.get("stack")
        row.shared = int(getattr(compiled.metadata, "shared", 0))
        row.access = count_global_accesses(ptx)
    except Exception as error:  # noqa: BLE001 - a compile error is the result to report
        row.error = f"{type(error).__name__}: {str(error).strip()[:2000]}"
    return row


def _cache_dir() -> Path:
    root = os.environ.get("LOWRANK_AOT_CACHE") or Path.home() / ".cache" / "lowrank-kernels" / "aot"
    return Path(root)


def _cache_key(module_name: str, variant: str, arch: str) -> str:
    import triton

    from .. import resources

    module = _module(module_name)
    kernel = getattr(module, KERNELS[module_name][0])
    # cache_key covers the kernel's source and the jit functions it calls; the module file adds
    # the launcher (what the variant's arguments are); resources.py how the row is read.
    parts = [triton.__version__, kernel.cache_key, Path(module.__file__).read_text(),
             Path(resources.__file__).read_text(), variant, arch]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cached_resources(job: tuple[str, str, str]) -> dict:
    module_name, variant, arch = job
    path = _cache_dir() / f"{_cache_key(module_name, variant, arch)}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # unreadable: compile again
    row = asdict(_resources(module_name, variant, arch))
    if row["error"] is None:  # errors are never cached: a fix must be seen at once
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(row))
        os.replace(tmp, path)
    return row


def jobs(kernels=None, archs=None) -> list[tuple[str, str, str]]:
    out = []
    for module_name in kernels or KERNELS:
        for name, _, _ in _module(module_name).aot_variants():
            for arch in archs or ARCHS:
                out.append((module_name, name, arch))
    return out


def check_all(kernels=None, archs=None, workers: int | None = None) -> list[KernelResources]:
    """Compile every variant of ``kernels`` (default: all) for ``archs`` (default: sm_90a, sm_80),
    in parallel processes; one KernelResources row per (variant, arch), errors included."""
    todo = jobs(kernels, archs)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers > 1:
        import multiprocessing

        # spawn, not fork: a fork of a process that already runs torch's and Triton's threads can
        # inherit a held lock and hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_cached_resources, todo))
    else:
        rows = [_cached_resources(job) for job in todo]
    return [_row_from_dict(r) for r in rows]


def _row_from_dict(d: dict) -> KernelResources:
    d = dict(d)
    access = AccessCounts(**d.pop("access"))
    return KernelResources(**d, access=access)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank_kernels.kernels.triton.aot",
        description="Compile every Triton kernel variant for sm_90a and sm_80 without a GPU and "
                    "report registers, spills, shared memory and global access widths.")
    parser.add_argument("--report", action="store_true", help="print a markdown table")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON to FILE")
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS),
                        help="only this kernel (repeatable; default: all)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS),
                        help="only this architecture (repeatable; default: all)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiler processes")
    args = parser.parse_args(argv)
    rows = check_all(args.kernel, args.arch, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_row() for r in rows], indent=1))
    if args.report or not args.json:
        print(markdown_table(rows))
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"\nCOMPILE ERROR {r.kernel} {r.variant} {r.arch}:\n{r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
