"""Stage 1 smoke test: every kernel once against the torch reference of its op.

    python3 benchmarks/gpu_check/smoke.py

sgd_step (Triton and CUDA, float32 with momentum and weight decay), decay_outer_ (Triton and CUDA,
float32 and bfloat16) and batched_eigh (Triton and CUDA, float32), each on small inputs, compared
with ``backend="torch"`` on the same inputs. A backend that cannot run here is skipped with the
reason. Exit status 1 when any comparison fails. GPU_CHECK_DRY_RUN=1: tiny sizes.
"""
from __future__ import annotations

import torch

import checks
from checks import DEVICE, DRY_RUN, KERNEL_BACKENDS, Checks, normwise_err

from lowrank_kernels import fused_sgd_step_
from lowrank_kernels.ops.symmetric_eig import batched_eigh

# Normwise error bounds against the torch backend: max |ours - torch| / max |torch|.
LIMIT = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def sgd_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (33, 5), (4, 3, 3, 3)] if DRY_RUN else [(1,), (1000, 37), (64, 3, 3, 3), (4099,)]
    params = [torch.randn(s, generator=gen).to(DEVICE) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen).to(DEVICE) * 0.01 for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(DEVICE) * 0.01 for s in shapes]
    return params, grads, bufs


def smoke_sgd_step(report: Checks, backend: str) -> None:
    results = {}
    for name in ("torch", backend):
        params, grads, bufs = sgd_inputs(0)
        fused_sgd_step_(params, grads, bufs, lr=0.1, weight_decay=5e-4, momentum=0.9,
                        first_step=[False] * len(params), backend=name)
        results[name] = (params, bufs)
    checks.synchronize()
    err = max(normwise_err(a, e) for group in (0, 1)
              for a, e in zip(results[backend][group], results["torch"][group]))
    report.check(err <= LIMIT[torch.float32], f"sgd_step[{backend}] float32",
                 f"max normwise error {err:.1e} vs torch (limit {LIMIT[torch.float32]:g})")


def smoke_decay_outer(report: Checks, backend: str, dtype: torch.dtype) -> None:
    m, n, k = (40, 24, 8) if DRY_RUN else (192, 160, 64)
    ours, ref = checks.decay_outer_vs_torch(backend, m, n, k, dtype, seed=1)
    err = normwise_err(ours, ref)
    name = str(dtype).removeprefix("torch.")
    report.check(err <= LIMIT[dtype], f"decay_outer_[{backend}] {name} {m}x{n} K={k}",
                 f"max normwise error {err:.1e} vs torch (limit {LIMIT[dtype]:g})")


def smoke_batched_eigh(report: Checks, backend: str) -> None:
    b, n = (3, 8) if DRY_RUN else (8, 32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b, n, n, generator=gen)
    A = ((x + x.mT) / 2).to(DEVICE)
    w, V = batched_eigh(A, backend=backend)
    w_ref = batched_eigh(A, backend="torch")[0]
    checks.synchronize()
    err = normwise_err(w, w_ref)
    residual = float((A @ V - V * w[:, None, :]).norm() / A.norm())
    ok = err <= 1e-5 and residual <= 1e-4
    report.check(ok, f"batched_eigh[{backend}] float32 {b}x{n}x{n}",
                 f"eigenvalues: max normwise error {err:.1e} vs torch (limit 1e-05); "
                 f"||AV - VdiagW|| / ||A|| = {residual:.1e} (limit 1e-04)")


def main() -> int:
    report = Checks("smoke")
    for backend in checks.runnable(report, KERNEL_BACKENDS, "every kernel"):
        report.run(f"sgd_step[{backend}]", lambda: smoke_sgd_step(report, backend))
        for dtype in (torch.float32, torch.bfloat16):
            report.run(f"decay_outer_[{backend}] {dtype}",
                       lambda: smoke_decay_outer(report, backend, dtype))
        report.run(f"batched_eigh[{backend}]", lambda: smoke_batched_eigh(report, backend))
    return report.finish()


if __name__ == "__main__":
    raise SystemExit(main())
