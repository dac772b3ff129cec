"""One tiny call of every Triton and CUDA kernel, for compute-sanitizer to watch.

    compute-sanitizer --tool memcheck python3 benchmarks/gpu_check/tiny_run.py
    compute-sanitizer --tool racecheck python3 benchmarks/gpu_check/tiny_run.py

Sizes are small (the sanitizers slow every kernel down by orders of magnitude) but cover the
edges: a tensor tail that does not fill a block, a storage-offset-1 (unaligned) tensor,
K = 1 and a K that is not a multiple of the K tile, an odd eigen-size (padded to even). Run
with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` under memcheck, so that each tensor is its own
allocation and an out-of-bounds access cannot land inside a neighbour's block. Each call is
also checked against the torch backend, so the run means something without a sanitizer too (the
dry run). Exit status 1 when a result is wrong.
"""
from __future__ import annotations

import torch

import checks
from checks import DEVICE, KERNEL_BACKENDS, Checks, normwise_err

from lowrank_kernels import fused_sgd_step_
from lowrank_kernels.ops.symmetric_eig import batched_eigh


def close(a: torch.Tensor, b: torch.Tensor, limit: float) -> bool:
    return normwise_err(a, b) <= limit


def tiny_sgd_step(report: Checks, backend: str) -> None:
    for dtype, limit in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen) * 0.02 for s in ((37,), (5, 7))]
        unaligned = torch.empty(38, dtype=dtype, device=DEVICE)[1:]
        unaligned.copy_(base[0])
        results = {}
        for name in ("torch", backend):
            params = [unaligned.clone() if name == "torch" else unaligned,
                      base[1].to(DEVICE, dtype)]
            grads = [torch.ones_like(p) * 0.01 for p in params]
            bufs = [torch.zeros_like(p) for p in params]
            fused_sgd_step_(params, grads, bufs, lr=0.1, momentum=0.9, weight_decay=5e-4,
                            first_step=[True, False], backend=name)
            results[name] = params
        checks.synchronize()
        ok = all(close(a, b, limit) for a, b in zip(results[backend], results["torch"]))
        report.check(ok, f"sgd_step[{backend}] {dtype} (unaligned tail)")


def tiny_decay_outer(report: Checks, backend: str) -> None:
    for dtype, limit in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for m, n, k in ((19, 13, 1), (33, 40, 20)):
            ours, ref = checks.decay_outer_vs_torch(backend, m, n, k, dtype, seed=1)
            report.check(close(ours, ref, limit), f"decay_outer_[{backend}] {dtype} {m}x{n} K={k}")


def tiny_batched_eigh(report: Checks, backend: str) -> None:
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(3, 9, 9, generator=gen, dtype=torch.float64)
        A = ((x + x.mT) / 2).to(DEVICE, dtype)
        w, _ = batched_eigh(A, backend=backend)
        checks.synchronize()
        ok = close(w, torch.linalg.eigvalsh(A.double()), 1e-5)
        report.check(ok, f"batched_eigh[{backend}] {dtype} n=9")


def main() -> int:
    report = Checks("tiny run")
    for backend in checks.runnable(report, KERNEL_BACKENDS, "every kernel"):
        for fn in (tiny_sgd_step, tiny_decay_outer, tiny_batched_eigh):
            report.run(f"{fn.__name__}[{backend}]", lambda: fn(report, backend))
    return report.finish()


if __name__ == "__main__":
    raise SystemExit(main())
