"""Launcher of csrc/decay_outer.cu (semantics: lowrank_kernels/ops/decay_outer.py)."""
from __future__ import annotations

import numpy as np
import torch

from .compile import launch, pointer

TILE = 128      # rows and columns of W per thread block (both kernels)
THREADS = 256
MAX_BLOCKS = 2**31 - 1  # 1-D grid limit

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_VECTORIZED, _READ_W = 1, 2
_VECTOR_BYTES = 16


def _rows_aligned(t: torch.Tensor) -> bool:
    """Every row of the contiguous 2-D ``t`` starts on a 16-byte boundary."""
    row_bytes = t.shape[1] * t.element_size()
    return t.data_ptr() % _VECTOR_BYTES == 0 and row_bytes % _VECTOR_BYTES == 0


def launch_decay_outer(W: torch.Tensor, D: torch.Tensor, F: torch.Tensor, decay: float,
                       alpha: float) -> None:
    """In place ``W <- decay * W + alpha * D^T F``; W, D, F contiguous, one dtype and CUDA
    device, checked by the op."""
    m, n = W.shape
    k = D.shape[0] if alpha != 0.0 else 0  # alpha = 0: D and F are never read
    blocks = -(-m // TILE) * -(-n // TILE)
    if blocks > MAX_BLOCKS:
        raise ValueError(f"decay_outer_: W of shape {(m, n)} needs {blocks} thread blocks of "
                         f"{TILE}x{TILE}, more than a CUDA grid holds ({MAX_BLOCKS})")
    flags = ((_VECTORIZED if all(_rows_aligned(t) for t in (W, D, F)) else 0)
             | (_READ_W if decay != 0.0 else 0))
    args = (pointer(W), pointer(D), pointer(F), np.int64(m), np.int64(n), np.int64(k),
            np.float32(decay), np.float32(alpha), np.int32(flags))
    launch("decay_outer.cu", f"decay_outer_{_SUFFIX[W.dtype]}", (blocks,), (THREADS,), args,
           W.device)
