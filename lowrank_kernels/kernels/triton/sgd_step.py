"""Triton kernel of the fused SGD step (semantics: lowrank_kernels/ops/sgd_step.py).

One program per (tensor, chunk) row of the block table; pointers come from the tensor table as
int64 and are cast with ``tl.pointer_type``, so one launch covers tensors of any number and size.
Works on a CUDA device and, with TRITON_INTERPRET=1, on CPU tensors.

Only what changes the memory traffic or the addressing is a compile-time variant: the storage
dtype, whether a momentum buffer is read and written, and ``ALIGNED`` (every pointer of the launch
is 16-byte aligned, chosen by the launcher). Everything else (maximize, nesterov, coupled or
decoupled weight decay, a device lr, GradScaler's scale and found_inf) is a runtime flag or factor
whose "off" value is exact (a multiply by 1.0, a uniform branch not taken), so a user's first step
compiles one of 12 kernels, not one of hundreds, and the ahead-of-time check (``aot.py``) can
compile all of them.

Why ``ALIGNED``: the table's pointers are plain integers to the compiler, which therefore cannot
prove 16-byte alignment and emits 32-bit (fp32) or 16-bit (bf16/fp16) accesses. With the alignment
asserted (``tl.multiple_of``) and a chunk that lies wholly inside its tensor, the body runs without
a mask and compiles to 128-bit loads and stores; only the last chunk of a tensor takes the masked
path. A launch with any misaligned pointer (a view at an odd storage offset) uses the variant
without the assertion, which stays correct for any address.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...execution import on_device
from .launch import FP_FUSION

BLOCK = 1024
CHUNK = 16 * BLOCK  # elements per program
NUM_WARPS = 4

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Runtime flags (one int32 argument).
MAXIMIZE, NESTEROV, COUPLED_WD, HAS_LR_PTR, HAS_GRAD_SCALE, HAS_FOUND_INF = 1, 2, 4, 8, 16, 32


@triton.jit
def _update_block(p_ptr, g_ptr, b_ptr, idx, mask, first, step_lr, step_decay, inv_scale, sign,
                  weight_decay, momentum, dampening_keep, flags,
                  DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + idx).to(tl.float32)
        g = tl.load(g_ptr + idx).to(tl.float32)
    g = g * inv_scale * sign  # 1.0 / 1.0 without a GradScaler and without maximize: exact
    if (flags & 4) != 0:  # COUPLED_WD; not folded into a factor: 0 * inf would be NaN
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if MASKED:
            old = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            old = tl.load(b_ptr + idx).to(tl.float32)
        buf = tl.where(first, g, momentum * old + dampening_keep * g)
        if MASKED:
            tl.store(b_ptr + idx, buf.to(DTYPE), mask=mask)
        else:
            tl.store(b_ptr + idx, buf.to(DTYPE))
        if (flags & 2) != 0:  # NESTEROV
            g = g + momentum * buf
        else:
            g = buf
    # step_decay is 1 - lr * wd for decoupled weight decay and exactly 1.0 otherwise.
    p = p * step_decay - step_lr * g
    if MASKED:
        tl.store(p_ptr + idx, p.to(DTYPE), mask=mask)
    else:
        tl.store(p_ptr + idx, p.to(DTYPE))


# Triton specialises integer arguments equal to 1 or divisible by 16 into separate kernels; the
# flags word must not multiply the variants.
@triton.jit(do_not_specialize=["flags"])
def _sgd_step_kernel(
    tensor_table, block_table,
    lr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    weight_decay, decoupled_weight_decay, decay, momentum, dampening_keep, flags,
    DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    entry = tensor_table + row * 5
    p_ptr = tl.load(entry).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(DTYPE))
    numel = tl.load(entry + 3)
    b_ptr = p_ptr  # never dereferenced without momentum
    first = False
    if HAS_MOMENTUM:
        b_ptr = tl.load(entry + 2).to(tl.pointer_type(DTYPE))
        first = tl.load(entry + 4) != 0
    if ALIGNED:  # asserted by the launcher for every pointer of this launch
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        start = tl.multiple_of(start, CHUNK)  # block table rows start at multiples of CHUNK
    end = tl.minimum(start + CHUNK, numel)

    # decay = 1 - lr * wd and dampening_keep = 1 - dampening come from the host in double
    # precision, rounded once, as torch computes its scalar factors; a device lr needs both here.
    step_lr = lr
    step_decay = decay
    if (flags & 8) != 0:  # HAS_LR_PTR
        step_lr = tl.load(lr_ptr).to(tl.float32)
        step_decay = 1.0 - step_lr * decoupled_weight_decay
    inv_scale = 1.0
    if (flags & 16) != 0:  # HAS_GRAD_SCALE
        inv_scale = 1.0 / tl.load(grad_scale_ptr).to(tl.float32)
    sign = 1.0
    if (flags & 1) != 0:  # MAXIMIZE
        sign = -1.0
    # A skipped (inf/NaN) step empties the chunk: decided on the device, no host sync.
    if (flags & 32) != 0:  # HAS_FOUND_INF
        end = tl.where(tl.load(found_inf_ptr) == 0, end, start)

    lanes = tl.arange(0, BLOCK)
    if end - start == CHUNK:  # a whole chunk: no mask, so aligned pointers give 128-bit accesses
        for offset in range(0, CHUNK, BLOCK):
            idx = start + offset + lanes
            _update_block(p_ptr, g_ptr, b_ptr, idx, None, first, step_lr, step_decay, inv_scale,
                          sign, weight_decay, momentum, dampening_keep, flags,
                          DTYPE, HAS_MOMENTUM, False)
    else:  # the last chunk of a tensor (or a skipped step)
        for offset in range(0, CHUNK, BLOCK):
            idx = start + offset + lanes
            _update_block(p_ptr, g_ptr, b_ptr, idx, idx < end, first, step_lr, step_decay,
                          inv_scale, sign, weight_decay, momentum, dampening_keep, flags,
                          DTYPE, HAS_MOMENTUM, True)


def launch_arguments(tensors, blocks, dtype, lr, grad_scale, found_inf, *, aligned, weight_decay,
                     momentum, dampening, nesterov, maximize, decoupled_weight_decay):
    """(positional args, keyword args) of ``_sgd_step_kernel``: the one place where the op's
    arguments become the kernel's, shared by the launcher and the ahead-of-time check."""
    has_lr_ptr = isinstance(lr, torch.Tensor)
    host_lr = 0.0 if has_lr_ptr else float(lr)
    decoupled_wd = weight_decay if decoupled_weight_decay else 0.0
    flags = ((MAXIMIZE if maximize else 0) | (NESTEROV if nesterov and momentum != 0 else 0)
             | (COUPLED_WD if weight_decay != 0 and not decoupled_weight_decay else 0)
             | (HAS_LR_PTR if has_lr_ptr else 0)
             | (HAS_GRAD_SCALE if grad_scale is not None else 0)
             | (HAS_FOUND_INF if found_inf is not None else 0))
    dummy = tensors  # any tensor stands in for an absent optional pointer (never read)
    args = (
        tensors, blocks,
        host_lr,
        lr if has_lr_ptr else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        float(weight_decay), float(decoupled_wd), 1.0 - host_lr * decoupled_wd, float(momentum),
        1.0 - float(dampening), flags,
    )
    kwargs = dict(DTYPE=_TL_DTYPE[dtype], HAS_MOMENTUM=momentum != 0, ALIGNED=bool(aligned),
                  CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
    return args, kwargs


def launch_sgd_step(tensors, blocks, dtype, lr, grad_scale, found_inf, **hyper):
    args, kwargs = launch_arguments(tensors, blocks, dtype, lr, grad_scale, found_inf, **hyper)
    with on_device(tensors.device):
        _sgd_step_kernel[(blocks.shape[0],)](*args, **kwargs)


def aot_variants():
    """Every kernel the launcher can emit, as (name, args, kwargs) of real launches built by
    ``launch_arguments`` on small CPU stand-ins (the compiler reads only their dtypes and 16-byte
    alignment); the ahead-of-time check (``aot.py``) compiles each. All runtime flags are on, so
    the launch is the most general one; they select branches inside the same kernel."""
    tensors = torch.zeros((1, 5), dtype=torch.int64)
    blocks = torch.zeros((1, 2), dtype=torch.int64)
    scalar = torch.ones(1, dtype=torch.float32)
    for dtype in _TL_DTYPE:
        for momentum in (0.0, 0.9):
            for aligned in (True, False):
                name = (f"{str(dtype).removeprefix('torch.')}-"
                        f"{'momentum' if momentum else 'plain'}-{'aligned' if aligned else 'any'}")
                args, kwargs = launch_arguments(
                    tensors, blocks, dtype, scalar, scalar, scalar, aligned=aligned,
                    weight_decay=1e-4, momentum=momentum, dampening=0.0, nesterov=momentum != 0,
                    maximize=True, decoupled_weight_decay=False)
                yield name, args, kwargs
