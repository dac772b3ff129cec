"""Launcher of csrc/sgd_step.cu (semantics: lowrank_kernels/ops/sgd_step.py)."""
from __future__ import annotations

import numpy as np
import torch

from .compile import launch, pointer

CHUNK = 16384  # elements per thread block
THREADS = 256

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_HAS_MOMENTUM, _NESTEROV, _MAXIMIZE, _COUPLED_WD, _DECOUPLED_WD = 1, 2, 4, 8, 16


def launch_sgd_step(tensors, blocks, dtype, lr, grad_scale, found_inf, *, weight_decay, momentum,
                    dampening, nesterov, maximize, decoupled_weight_decay):
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    host_lr = 0.0 if lr_tensor is not None else lr
    flags = ((_HAS_MOMENTUM if momentum != 0 else 0) | (_NESTEROV if nesterov else 0)
             | (_MAXIMIZE if maximize else 0)
             | (_COUPLED_WD if weight_decay != 0 and not decoupled_weight_decay else 0)
             | (_DECOUPLED_WD if weight_decay != 0 and decoupled_weight_decay else 0))
    args = (pointer(tensors), pointer(blocks), np.float32(host_lr), pointer(lr_tensor),
            pointer(grad_scale), pointer(found_inf), np.float32(weight_decay),
            np.float32(1.0 - host_lr * weight_decay), np.float32(momentum),
            np.float32(1.0 - dampening), np.int32(flags), np.int64(CHUNK))
    launch("sgd_step.cu", f"sgd_step_{_SUFFIX[dtype]}", (blocks.shape[0],), (THREADS,), args,
           tensors.device)
