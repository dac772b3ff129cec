"""The fused SGD step: weight-decay shrink, momentum and update over many tensors in one launch.

Per element, in fp32 arithmetic whatever the storage dtype::

    g = grad * (1 / grad_scale)                (when a GradScaler scale is given)
    g = -g                                     (maximize)
    g = g + wd * p                             (coupled weight decay, torch's convention)
    buf = g              on the first step,    (momentum != 0)
    buf = m * buf + (1 - dampening) * g        afterwards
    g = g + m * buf  (nesterov)  or  g = buf
    p = (1 - lr * wd) * p                      (decoupled weight decay, the SGDW form)
    p = p - lr * g

and nothing at all when ``found_inf`` is non-zero (GradScaler found an inf/NaN gradient), decided
on the device so the step never waits for the host. The momentum buffer is stored in the
parameter's dtype, like ``torch.optim.SGD``'s, so state dicts move between the two unchanged.
"""
from __future__ import annotations

import importlib

import torch

from ..backends import resolve_backend
from . import multi_tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)


def fused_sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    first_step: list[bool] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = "auto",
) -> None:
    """Apply one SGD step in place to ``params`` (and ``momentum_buffers``).

    One kernel launch per (device, dtype) group of tensors. ``momentum_buffers`` is required when
    ``momentum != 0`` (one tensor per param, same dtype and shape); ``first_step[i]`` marks a
    buffer to initialise from the gradient (torch's first-step rule) instead of updating it.
    """
    _check_inputs(params, grads, momentum_buffers, momentum, first_step)
    if not params:
        return
    if first_step is None:
        first_step = [False] * len(params)
    hyper = dict(weight_decay=float(weight_decay), momentum=float(momentum),
                 dampening=float(dampening), nesterov=bool(nesterov), maximize=bool(maximize),
                 decoupled_weight_decay=bool(decoupled_weight_decay))

    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), index in groups.items():
        name = resolve_backend(backend, device, op="sgd_step", variant=dtype)
        explicit = (backend or "auto") != "auto"
        if name != "torch" and dtype not in KERNEL_DTYPES and not explicit:
            name = "torch"  # "auto" (or LOWRANK_BACKEND) sends float64 to the reference
        if name != "torch" and dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend {name!r} supports parameters of dtype float32, bfloat16 and "
                            f"float16, got {dtype}; use backend='torch' for it")
        p = [params[i] for i in index]
        g = [grads[i] for i in index]
        b = [momentum_buffers[i] for i in index] if momentum != 0 else None
        f = [first_step[i] for i in index]
        scale = _on_device(grad_scale, device, "grad_scale")
        inf = _on_device(found_inf, device, "found_inf")
        group_lr = _lr_for(lr, device)
        _IMPLEMENTATIONS[name](p, g, b, f, group_lr, scale, inf, **hyper)


def _check_inputs(params, grads, momentum_buffers, momentum, first_step):
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    if momentum != 0:
        if momentum_buffers is None or len(momentum_buffers) != len(params):
            raise ValueError("momentum != 0 needs one momentum buffer per param")
    if first_step is not None and len(first_step) != len(params):
        raise ValueError(f"first_step has {len(first_step)} entries for {len(params)} params")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_sparse or p.is_sparse:
            raise RuntimeError(f"tensor {i}: sparse tensors are not supported by the fused SGD step")
        if p.is_complex() or g.is_complex():
            raise RuntimeError(f"tensor {i}: complex tensors are not supported by the fused SGD step; "
                               "step torch.view_as_real(param) instead")
        if p.dtype not in TORCH_DTYPES:
            raise TypeError(f"tensor {i}: parameters must be floating point "
                            f"(float32, bfloat16, float16, float64), got {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"tensor {i}: grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
        if g.dtype != p.dtype or g.device != p.device:
            raise TypeError(f"tensor {i}: grad is {g.dtype} on {g.device} but param is "
                            f"{p.dtype} on {p.device}")
        if momentum != 0:
            b = momentum_buffers[i]
            if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                raise TypeError(f"tensor {i}: momentum buffer must match its param in shape, dtype and "
                                f"device; got {tuple(b.shape)} {b.dtype} {b.device}")


def _lr_for(lr, device):
    """A float, or a one-element fp32 tensor on ``device`` that the kernels read there.

    A CPU tensor lr is read on the host (reading host memory waits for nothing), never copied to
    the GPU: a pageable host-to-device copy would wait for the stream, and it cannot be captured
    in a CUDA graph. torch's fused optimizers treat a CPU lr the same way."""
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.device.type == "cpu" and torch.device(device).type != "cpu":
        if lr.numel() != 1:
            raise ValueError("lr must be a one-element tensor")
        return float(lr)
    return _on_device(lr, device, "lr")


def _on_device(t, device, name):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor")
    return t.to(device=device, dtype=torch.float32).reshape(1)


# ----------------------------------------------------------------------------------------------
# torch: the reference. Same fp32 arithmetic as the kernels, one tensor at a time.
# ----------------------------------------------------------------------------------------------
def _step_torch(params, grads, bufs, first, lr, grad_scale, found_inf, *, weight_decay, momentum,
                dampening, nesterov, maximize, decoupled_weight_decay):
    if found_inf is not None and bool(found_inf.item()):
        return
    lr = float(lr.item()) if isinstance(lr, torch.Tensor) else lr
    for i, (p, grad) in enumerate(zip(params, grads)):
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        # fp32/fp64 params are updated in place; half-precision ones through an fp32 copy.
        p_work = p if p.dtype == compute else p.to(compute)
        g = grad if grad.dtype == compute else grad.to(compute)
        if grad_scale is not None:  # multiply by the reciprocal, exactly as the kernels do
            g = g * grad_scale.to(compute).reciprocal()
        if maximize:
            g = -g
        if weight_decay != 0 and not decoupled_weight_decay:
            g = g.add(p_work, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[i] if bufs[i].dtype == compute else bufs[i].to(compute)
            if first[i]:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            if buf is not bufs[i]:
                bufs[i].copy_(buf)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        if decoupled_weight_decay and weight_decay != 0:
            p_work.mul_(1 - lr * weight_decay)
        p_work.add_(g, alpha=-lr)
        if p_work is not p:
            p.copy_(p_work)


# ----------------------------------------------------------------------------------------------
# Kernel backends: build the launch tables, stage tensors whose layouts differ, launch once.
# ----------------------------------------------------------------------------------------------
TABLE_COLUMNS = 5  # param ptr, grad ptr, momentum-buffer ptr, numel, first-step flag


def _stage(params, grads, bufs):
    """Flat views the kernel can index as arrays, plus the copies to write back afterwards.

    Tensors that are flat and laid out alike go straight to the kernel; any other param (strided
    slices, grads with another memory format) is stepped on contiguous copies.
    """
    flat_p, flat_g, flat_b, write_back = [], [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = bufs[i] if bufs is not None else None
        group = [p, g] + ([b] if b is not None else [])
        if multi_tensor.flat_compatible(group):
            flat_p.append(p), flat_g.append(g), flat_b.append(b)
            continue
        p_c, b_c = p.contiguous(), (b.contiguous() if b is not None else None)
        flat_p.append(p_c), flat_g.append(g.contiguous()), flat_b.append(b_c)
        write_back.append((p, p_c))
        if b is not None:
            write_back.append((b, b_c))
    return flat_p, flat_g, flat_b, write_back


def _launch_tables(params, grads, bufs, first, chunk):
    """(tensor table, block table, aligned): ``aligned`` says that every pointer of the launch is
    16-byte aligned, so the kernels may use their 128-bit path (chunk starts are multiples of
    ``chunk`` elements, which keeps each chunk aligned as well)."""
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    rows = [[params[i].data_ptr(), grads[i].data_ptr(),
             bufs[i].data_ptr() if bufs is not None else 0,
             params[i].numel(), int(bool(first[i]))] for i in keep]
    aligned = all(row[0] % _ALIGNMENT == 0 and row[1] % _ALIGNMENT == 0
                  and row[2] % _ALIGNMENT == 0 for row in rows)
    device = params[0].device
    return (multi_tensor.tensor_table(rows, device),
            multi_tensor.block_table([r[3] for r in rows], chunk, device), aligned)


_ALIGNMENT = 16  # bytes of one 128-bit access


def _kernel_step(kernel_module: str):
    """A backend step: shared staging and table building around one kernel module's launcher.

    The module (``..kernels.triton.sgd_step`` or ``..kernels.cuda.sgd_step``) is imported on first
    use, so importing this file needs neither Triton nor CuPy. It provides ``CHUNK`` (elements per
    program) and ``launch_sgd_step``.
    """

    def step(params, grads, bufs, first, lr, grad_scale, found_inf, **hyper):
        kernels = importlib.import_module(kernel_module, __package__)
        flat_p, flat_g, flat_b, write_back = _stage(params, grads, bufs)
        if not any(p.numel() for p in flat_p):
            return
        tensors, blocks, aligned = _launch_tables(
            flat_p, flat_g, flat_b if bufs is not None else None, first, kernels.CHUNK)
        kernels.launch_sgd_step(tensors, blocks, flat_p[0].dtype, lr, grad_scale, found_inf,
                                aligned=aligned, **hyper)
        for original, staged in write_back:
            original.copy_(staged)

    return step


_IMPLEMENTATIONS = {
    "torch": _step_torch,
    "triton": _kernel_step("..kernels.triton.sgd_step"),
    "cuda": _kernel_step("..kernels.cuda.sgd_step"),
}
