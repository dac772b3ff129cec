"""Launcher of csrc/decay_outer.cu (semantics: lowrank_kernels/ops/decay_outer.py)."""
from __future__ import annotations

import numpy as np
import torch

from . import compile as cuda_compile
from .compile import pointer

SOURCE = "decay_outer.cu"
TILE = 128      # rows and columns of W per thread block (both kernels)
THREADS = 256
MAX_BLOCKS = cuda_compile.MAX_GRID[0]  # 1-D grid limit

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_VECTORIZED, _READ_W = 1, 2
_VECTOR_BYTES = 16


def _rows_aligned(t: torch.Tensor) -> bool:
    """Every row of the contiguous 2-D ``t`` starts on a 16-byte boundary."""
    row_bytes = t.shape[1] * t.element_size()
    return t.data_ptr() % _VECTOR_BYTES == 0 and row_bytes % _VECTOR_BYTES == 0


def launch_geometry(m: int, n: int) -> tuple[tuple[int], tuple[int]]:
    """(grid, block): one 1-D block per 128 x 128 tile of W (m, n), row bands outermost."""
    blocks = -(-m // TILE) * -(-n // TILE)
    if blocks > MAX_BLOCKS:
        raise ValueError(f"decay_outer_: W of shape {(m, n)} needs {blocks} thread blocks of "
                         f"{TILE}x{TILE}, more than a CUDA grid holds ({MAX_BLOCKS})")
    return (blocks,), (THREADS,)


def launch_decay_outer(W: torch.Tensor, D: torch.Tensor, F: torch.Tensor, decay: float,
                       alpha: float) -> None:
    """In place ``W <- decay * W + alpha * D^T F``; W, D, F contiguous, one dtype and CUDA
    device, checked by the op."""
    m, n = W.shape
    if m == 0 or n == 0:
        return
    k = D.shape[0] if alpha != 0.0 else 0  # alpha = 0: D and F are never read
    grid, block = launch_geometry(m, n)
    flags = ((_VECTORIZED if all(_rows_aligned(t) for t in (W, D, F)) else 0)
             | (_READ_W if decay != 0.0 else 0))
    args = (pointer(W), pointer(D), pointer(F), np.int64(m), np.int64(n), np.int64(k),
            np.float32(decay), np.float32(alpha), np.int32(flags))
    cuda_compile.launch(SOURCE, f"decay_outer_{_SUFFIX[W.dtype]}", grid, block, args, W.device)
