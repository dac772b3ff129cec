"""Launcher of csrc/symmetric_eig.cu (semantics: lowrank_kernels/ops/symmetric_eig.py).

One thread block per matrix. A (n_even x n_even, n_even = n rounded up to even, rows padded to
n_even + 1 entries against shared-memory bank conflicts) and the round's rotations live in
dynamic shared memory; V^T is accumulated in place in the output tensor, in global memory. Above
48 KiB of shared memory (n_even > 108 in float32, > 76 in float64) the launch raises the kernel's
max_dynamic_shared_size_bytes (compile.launch does it); the largest n is set by the device's
opt-in limit per block (227 KiB on an H100: n <= 238 in float32, n <= 168 in float64).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from . import compile as cuda_compile
from .compile import pointer

SOURCE = "symmetric_eig.cu"
MAX_THREADS = 512  # the kernel's __launch_bounds__

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_NP_SCALAR = {torch.float32: np.float32, torch.float64: np.float64}


def shared_bytes(n: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of one block, as laid out in csrc/symmetric_eig.cu: A with rows
    padded to n_even + 1 entries, the round's rotations and pairs, 32 reduction slots."""
    n_even = n + (n & 1)
    k = n_even // 2
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (n_even * (n_even + 1) + 3 * k + 32) * itemsize + 2 * k * 4


def max_n(dtype: torch.dtype, device: torch.device) -> int:
    """Largest n whose matrix fits in the shared memory of one block on ``device``."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_n(dtype, cuda_compile.shared_memory_optin(index))


@lru_cache(maxsize=None)
def _max_n(dtype: torch.dtype, limit: int) -> int:
    n = 2
    while shared_bytes(n + 2, dtype) <= limit:
        n += 2
    return n


def threads_for(n: int) -> int:
    """Threads per block: about one per 2x2 block task of a round (K^2), 32 to 512."""
    k = (n + (n & 1)) // 2
    return min(MAX_THREADS, max(32, (k * k + 31) // 32 * 32))


def launch_geometry(b: int, n: int, dtype: torch.dtype) -> tuple[tuple[int], tuple[int], int]:
    """(grid, block, dynamic shared bytes): one block per matrix of the batch."""
    if not 1 <= b <= cuda_compile.MAX_GRID[0]:
        raise ValueError(f"symmetric_eig: a batch of {b} matrices; one launch takes 1 to "
                         f"{cuda_compile.MAX_GRID[0]} (one thread block each)")
    return (b,), (threads_for(n),), shared_bytes(n, dtype)


def launch_symmetric_eig(a: torch.Tensor, max_sweeps: int, tol: float):
    """Eigen-decompose each matrix of ``a`` (b, n, n), contiguous, float32/float64, on CUDA.

    Returns (w, vt): unsorted eigenvalues (b, n) and V^T (b, n, n), rows the eigenvectors.
    """
    b, n, _ = a.shape
    w = torch.empty((b, n), dtype=a.dtype, device=a.device)
    vt = torch.empty((b, n, n), dtype=a.dtype, device=a.device)
    if b == 0 or n == 0:
        return w, vt
    grid, block, shared = launch_geometry(b, n, a.dtype)
    args = (pointer(a), pointer(w), pointer(vt), np.int32(n), np.int32(max_sweeps),
            _NP_SCALAR[a.dtype](tol))
    cuda_compile.launch(SOURCE, f"symmetric_eig_{_SUFFIX[a.dtype]}", grid, block, args,
                        a.device, shared_mem=shared)
    return w, vt
