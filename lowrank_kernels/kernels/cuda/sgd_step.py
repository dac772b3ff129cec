"""Launcher of csrc/sgd_step.cu (semantics: lowrank_kernels/ops/sgd_step.py)."""
from __future__ import annotations

import numpy as np
import torch

from . import compile as cuda_compile
from .compile import pointer

SOURCE = "sgd_step.cu"
THREADS = 256
VECTOR_BYTES = 16  # the kernel's vector path moves 16 bytes per access
CHUNK = 16384      # elements per thread block; a multiple of every dtype's vector width (4 or 8)
assert CHUNK % (VECTOR_BYTES // 2) == 0

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_HAS_MOMENTUM, _NESTEROV, _MAXIMIZE, _COUPLED_WD, _DECOUPLED_WD, _ALIGNED = 1, 2, 4, 8, 16, 32


def kernel_flags(*, aligned, weight_decay, momentum, nesterov, maximize,
                 decoupled_weight_decay) -> int:
    """The kernel's ``flags`` argument (bits of SgdFlags in csrc/sgd_step.cu)."""
    return ((_HAS_MOMENTUM if momentum != 0 else 0) | (_NESTEROV if nesterov else 0)
            | (_MAXIMIZE if maximize else 0)
            | (_COUPLED_WD if weight_decay != 0 and not decoupled_weight_decay else 0)
            | (_DECOUPLED_WD if weight_decay != 0 and decoupled_weight_decay else 0)
            | (_ALIGNED if aligned else 0))


def launch_geometry(n_blocks: int) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) for a block table of ``n_blocks`` rows: one 1-D block per row."""
    if not 1 <= n_blocks <= cuda_compile.MAX_GRID[0]:
        raise ValueError(f"sgd_step: {n_blocks} chunks of {CHUNK} elements; a launch takes 1 to "
                         f"{cuda_compile.MAX_GRID[0]}")
    return (n_blocks,), (THREADS,)


def launch_sgd_step(tensors, blocks, dtype, lr, grad_scale, found_inf, *, aligned, weight_decay,
                    momentum, dampening, nesterov, maximize, decoupled_weight_decay):
    """One launch over the tables of ops/multi_tensor.py.

    ``aligned``: every param, grad and momentum-buffer pointer in ``tensors`` is 16-byte aligned
    (chunk starts are multiples of CHUNK elements), which selects the kernel's 16-byte vector path.
    """
    if dtype not in _SUFFIX:
        raise TypeError(f"sgd_step: the CUDA kernel takes {list(_SUFFIX)}, got {dtype}")
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    host_lr = 0.0 if lr_tensor is not None else lr
    flags = kernel_flags(aligned=aligned, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay)
    args = (pointer(tensors), pointer(blocks), np.float32(host_lr), pointer(lr_tensor),
            pointer(grad_scale), pointer(found_inf), np.float32(weight_decay),
            np.float32(1.0 - host_lr * weight_decay), np.float32(momentum),
            np.float32(1.0 - dampening), np.int32(flags), np.int64(CHUNK))
    grid, block = launch_geometry(int(blocks.shape[0]))
    cuda_compile.launch(SOURCE, f"sgd_step_{_SUFFIX[dtype]}", grid, block, args, tensors.device)
