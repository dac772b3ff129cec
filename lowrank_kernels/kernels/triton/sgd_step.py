"""Triton kernel of the fused SGD step (semantics: lowrank_kernels/ops/sgd_step.py).

One program per (tensor, chunk) row of the block table; pointers come from the tensor table as
int64 and are cast with ``tl.pointer_type``, so one launch covers tensors of any number and size.
Works on a CUDA device and, with TRITON_INTERPRET=1, on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
CHUNK = 16 * BLOCK  # elements per program

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _sgd_step_kernel(
    tensor_table, block_table,
    lr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    weight_decay, decay, momentum, dampening_keep,
    DTYPE: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    COUPLED_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    entry = tensor_table + row * 5
    p_ptr = tl.load(entry).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(DTYPE))
    numel = tl.load(entry + 3)
    end = tl.minimum(start + CHUNK, numel)

    # decay = 1 - lr * wd and dampening_keep = 1 - dampening come from the host in double
    # precision, rounded once, as torch computes its scalar factors; a device lr needs both here.
    step_lr = lr
    step_decay = decay
    if HAS_LR_PTR:
        step_lr = tl.load(lr_ptr).to(tl.float32)
        step_decay = 1.0 - step_lr * weight_decay
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = 1.0 / tl.load(grad_scale_ptr).to(tl.float32)
    # A skipped (inf/NaN) step empties the chunk: decided on the device, no host sync.
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, start)
    if HAS_MOMENTUM:
        b_ptr = tl.load(entry + 2).to(tl.pointer_type(DTYPE))
        first = tl.load(entry + 4) != 0

    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < end
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        if MAXIMIZE:
            g = -g
        if COUPLED_WD:
            g = g + weight_decay * p
        if HAS_MOMENTUM:
            old = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            buf = tl.where(first, g, momentum * old + dampening_keep * g)
            tl.store(b_ptr + idx, buf.to(DTYPE), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        if DECOUPLED_WD:
            p = p * step_decay
        p = p - step_lr * g
        tl.store(p_ptr + idx, p.to(DTYPE), mask=mask)


def launch_sgd_step(tensors, blocks, dtype, lr, grad_scale, found_inf, *, weight_decay, momentum,
                    dampening, nesterov, maximize, decoupled_weight_decay):
    has_lr_ptr = isinstance(lr, torch.Tensor)
    dummy = tensors  # any tensor stands in for an absent optional pointer (never read)
    grid = (blocks.shape[0],)
    _sgd_step_kernel[grid](
        tensors, blocks,
        0.0 if has_lr_ptr else lr,
        lr if has_lr_ptr else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        weight_decay, 1.0 - (0.0 if has_lr_ptr else lr) * weight_decay, momentum, 1.0 - dampening,
        DTYPE=_TL_DTYPE[dtype],
        HAS_LR_PTR=has_lr_ptr, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize,
        COUPLED_WD=weight_decay != 0 and not decoupled_weight_decay,
        DECOUPLED_WD=weight_decay != 0 and decoupled_weight_decay,
        CHUNK=CHUNK, BLOCK=BLOCK,
    )

