"""The decay_outer_ contenders and problem sizes, shared by the pytest-benchmark suite and the
report.

The problem is one SGD step with weight decay of an m x n weight whose gradient comes as K
factor pairs, W <- (1 - lr*wd) W - lr D^T F (lr=0.1, wd=5e-4), for m = n = 4096 on a GPU (1024
on the CPU, to keep the run short) and K in {1, 8, 32, 128, 512}, float32 and bfloat16.

Contenders, each on its own copy of W:

* ``decay_outer_[backend]``: the op on each backend that is a speed path on the device (on the
  CPU only torch: Triton there is its interpreter);
* ``torch.addmm_``: ``W.addmm_(D.T, F, beta=decay, alpha=-lr)``, one BLAS/cuBLAS call;
* ``unfused``: what a training loop does without the op: the Linear-style weight-gradient GEMM
  ``torch.mm(D.T, F, out=W.grad)`` then ``torch.optim.SGD(lr, weight_decay=wd)``'s step
  (``fused=True`` where this torch build takes it, else ``foreach=True``).

The roofline of one step: bytes = 2 m n s + K (m + n) s (W read and written once, D and F read
once; s the element size) over the measured copy bandwidth, and flops = 2 m n K over a measured
large matmul's throughput of the same dtype; the step cannot beat the larger of the two times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowrank_kernels import decay_outer_
from lowrank_kernels.backends import BACKENDS
from runner import synchronize, why_backend_skipped

KS = (1, 8, 32, 128, 512)
DTYPES = (torch.float32, torch.bfloat16)
SIZE = {"cuda": 4096, "cpu": 1024}
LR = 0.1
WEIGHT_DECAY = 5e-4
DECAY = 1.0 - LR * WEIGHT_DECAY
ALPHA = -LR

# Square matmul measured once per dtype for the compute roof.
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}

# On the CPU a row is skipped when one call takes longer than this (bfloat16 matmuls can be very
# slow on CPUs without bf16 instructions).
CPU_CALL_LIMIT_S = 2.0

# Each contender cycles through enough copies of W to span this many bytes, so that W is not
# still in the cache from the previous call (in training, a layer's weight is updated once per
# step, with the rest of the step's traffic in between): twice the GPU's L2 (the H100 has 50 MB,
# which a 4096 x 4096 bfloat16 W of 32 MiB would otherwise nearly fit), 64 MiB on the CPU.
CPU_ROTATION_BYTES = 64 * 2**20
DEFAULT_L2_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Contender:
    key: str             # pytest id / JSON key
    label: str           # table label
    kind: str            # "ours", "addmm" or "unfused"
    backend: str | None = None


OURS = tuple(Contender(f"ours_{b}", f"decay_outer_[{b}]", "ours", b) for b in BACKENDS)
ADDMM = Contender("addmm", "torch.addmm_", "addmm")
UNFUSED = Contender("unfused", "unfused: mm -> .grad, SGD step", "unfused")
ALL_CONTENDERS = OURS + (ADDMM, UNFUSED)
BY_KEY = {c.key: c for c in ALL_CONTENDERS}

# The report's --headline rows: the kernels against torch.addmm_ at K = 128 (a Linear layer's
# batch) in both dtypes and at K = 512 in bfloat16 (where Triton's wgmma and the CUDA kernel's
# mma.sync part ways: the measurement behind backend "auto"'s order for bf16). Few (dtype, K)
# pairs, because each is a fresh Triton autotuning on a cold cache.
HEADLINE_PROBLEMS = frozenset({(torch.float32, 128), (torch.bfloat16, 128), (torch.bfloat16, 512)})
HEADLINE_CONTENDERS = frozenset({"ours_triton", "ours_cuda", "addmm"})


def is_headline(contender: Contender, dtype: torch.dtype, k: int) -> bool:
    return (dtype, k) in HEADLINE_PROBLEMS and contender.key in HEADLINE_CONTENDERS


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def size_for(device: torch.device | str) -> int:
    return SIZE["cuda" if torch.device(device).type == "cuda" else "cpu"]


def why_skipped(contender: Contender, device: torch.device | str) -> str | None:
    """None when the contender is timed on ``device``, else the reason it is not."""
    return why_backend_skipped(contender.backend, device)


def bytes_moved(m: int, n: int, k: int, dtype: torch.dtype) -> int:
    """Minimum traffic of one step: W read and written once, D and F read once."""
    size = torch.empty((), dtype=dtype).element_size()
    return (2 * m * n + k * (m + n)) * size


def flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


@dataclass
class Problem:
    m: int
    n: int
    k: int
    dtype: torch.dtype
    D: torch.Tensor
    F: torch.Tensor


def make_problem(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0) -> Problem:
    """Factors of a realistic scale (output gradients ~ 1e-2, inputs ~ 1), created on device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    D = (torch.randn(k, m, generator=gen, device=device) * 1e-2).to(dtype)
    F = torch.randn(k, n, generator=gen, device=device).to(dtype)
    return Problem(m, n, k, dtype, D, F)


def weight_copies(problem: Problem) -> int:
    """How many copies of W a contender cycles through (see the rotation bytes above)."""
    device = problem.D.device
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        span = 2 * (l2 or DEFAULT_L2_BYTES)
    else:
        span = CPU_ROTATION_BYTES
    w_bytes = problem.m * problem.n * problem.D.element_size()
    return max(1, -(-span // w_bytes))


def _fresh_weights(problem: Problem) -> list[torch.Tensor]:
    gen = torch.Generator(device=problem.D.device).manual_seed(1)
    return [(torch.randn(problem.m, problem.n, generator=gen, device=problem.D.device)
             * 0.02).to(problem.dtype) for _ in range(weight_copies(problem))]


def _cycle(updates: list[Callable[[], None]]) -> Callable[[], None]:
    """One call runs the next update in turn."""
    position = [0]

    def step():
        i = position[0]
        position[0] = (i + 1) % len(updates)
        updates[i]()
    return step


def _unfused_optimizer(W: torch.nn.Parameter) -> tuple[torch.optim.Optimizer, str]:
    """torch.optim.SGD over W, fused where this build takes it; one step checks that it runs."""
    for variant in ("fused", "foreach"):
        opt = torch.optim.SGD([W], lr=LR, weight_decay=WEIGHT_DECAY, **{variant: True})
        try:
            opt.step()
        except (RuntimeError, ValueError, TypeError):
            continue
        return opt, variant
    raise RuntimeError("torch.optim.SGD runs neither fused nor foreach here")


def prepare(contender: Contender, problem: Problem) -> tuple[Callable[[], None], str | None]:
    """(step, note): a callable doing one update with ``problem``'s factors, of the next of the
    contender's copies of W in turn, after one untimed call per copy (kernels compiled, Triton
    autotuned); note says which SGD variant the unfused path uses. Raises whatever the
    contender raises when it cannot run here."""
    D, F = problem.D, problem.F
    note = None
    weights = _fresh_weights(problem)
    if contender.kind == "ours":
        def update_of(W):
            return lambda: decay_outer_(W, D, F, DECAY, ALPHA, backend=contender.backend)
    elif contender.kind == "addmm":
        def update_of(W):
            return lambda: W.addmm_(D.t(), F, beta=DECAY, alpha=ALPHA)
    elif contender.kind == "unfused":
        weights = [torch.nn.Parameter(W) for W in weights]

        def update_of(W):
            W.grad = torch.zeros_like(W)
            opt, variant = _unfused_optimizer(W)
            nonlocal note
            note = f"SGD {variant}=True"

            def update():
                torch.mm(D.t(), F, out=W.grad)
                opt.step()
            return update
    else:
        raise ValueError(f"unknown contender kind {contender.kind!r}")
    updates = [update_of(W) for W in weights]
    for update in updates:
        update()
    synchronize(D.device)
    return _cycle(updates), note
