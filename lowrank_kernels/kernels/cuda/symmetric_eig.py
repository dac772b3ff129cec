"""Launcher of csrc/symmetric_eig.cu (semantics: lowrank_kernels/ops/symmetric_eig.py).

One thread block per matrix. A (n_even x n_even, n_even = n rounded up to even) and the round's
rotations live in dynamic shared memory; V^T is accumulated in place in the output tensor, in
global memory. Above 48 KiB of shared memory (n_even > 108 in float32, > 76 in float64) the launch
raises the kernel's max_dynamic_shared_size_bytes (compile.launch does it); the largest n is set
by the device's opt-in limit per block (227 KiB on an H100: n <= 238 in float32, n <= 168 in
float64).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .compile import launch, pointer

MAX_THREADS = 512  # the kernel's __launch_bounds__

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_NP_SCALAR = {torch.float32: np.float32, torch.float64: np.float64}


def shared_bytes(n: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of one block, as laid out in csrc/symmetric_eig.cu."""
    n_even = n + (n & 1)
    k = n_even // 2
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (n_even * n_even + 3 * k + 32) * itemsize + 2 * k * 4


@lru_cache(maxsize=None)
def _shared_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        import cupy

        limit = cupy.cuda.Device(device_index).attributes.get("MaxSharedMemoryPerBlockOptin", 0)
    return int(limit) or 48 * 1024


def max_n(dtype: torch.dtype, device: torch.device) -> int:
    """Largest n whose matrix fits in the shared memory of one block on ``device``."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_n(dtype, _shared_limit(index))


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


def launch_symmetric_eig(a: torch.Tensor, max_sweeps: int, tol: float):
    """Eigen-decompose each matrix of ``a`` (b, n, n), contiguous, float32/float64, on CUDA.

    Returns (w, vt): unsorted eigenvalues (b, n) and V^T (b, n, n), rows the eigenvectors.
    """
    b, n, _ = a.shape
    w = torch.empty((b, n), dtype=a.dtype, device=a.device)
    vt = torch.empty((b, n, n), dtype=a.dtype, device=a.device)
    shared = shared_bytes(n, a.dtype)
    args = (pointer(a), pointer(w), pointer(vt), np.int32(n), np.int32(max_sweeps),
            _NP_SCALAR[a.dtype](tol))
    launch("symmetric_eig.cu", f"symmetric_eig_{_SUFFIX[a.dtype]}", (b,), (threads_for(n),), args,
           a.device, shared_mem=shared)
    return w, vt
