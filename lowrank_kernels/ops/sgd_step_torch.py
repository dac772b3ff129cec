"""The torch backend of the fused SGD step: torch's own multi-tensor paths over a whole launch.

It computes the update that ``sgd_step``'s module docstring documents (fp32 arithmetic for
fp32 / bf16 / fp16 storage, fp64 for fp64), through two paths:

* ``torch._fused_sgd_`` (torch's fused CPU kernel), one call per first-step flag, for the CPU
  fp32 / fp64 tensors whose param, grad and buffer are laid out alike. The kernel is used only
  where it computes the documented update, which in torch 2.13 is not the whole op:

  - ``grad_scale``: the kernel divides by the scale and writes the unscaled gradient back into
    ``.grad``; the documented step multiplies by the reciprocal and leaves ``.grad`` as it was
    (as ``torch.optim.SGD``'s for-loop does), so the scaled gradient is made by
    ``torch._foreach_mul`` and the kernel runs without ``grad_scale``.
  - ``found_inf``: the kernel skips only when it is exactly 1.0, the documented step whenever
    it is non-zero: it is read here instead (on the CPU, reading it waits for nothing) and the
    kernel never sees it.
  - decoupled weight decay, which the kernel lacks: the shrink ``(1 - lr*wd) * p`` by
    ``torch._foreach_mul_`` first (the gradient does not depend on ``p`` in that form, so the
    order is the documented one), then the kernel with ``weight_decay=0``.
  - bf16 / fp16: the kernel leaves the elements of its vectorised body unstepped (only the
    scalar tail moves), so half precision never goes to it.
  - param, grad and buffer in different layouts: the kernel indexes each as a flat array, so
    such a param takes the foreach path.

  Its vectorised body rounds exactly like the per-tensor reference; the scalar tail of a tensor
  may differ from it by one ulp in the momentum update (contracted multiply-add).
* ``torch._foreach_*`` everywhere else (bf16 / fp16 through fp32 working copies, other
  devices, mismatched layouts), one call per operation over the group.
"""
from __future__ import annotations

import torch

from .multi_tensor import flat_compatible

FUSED_DTYPES = (torch.float32, torch.float64)


def step_torch(params, grads, bufs, first, lr, grad_scale, found_inf, *, weight_decay, momentum,
               dampening, nesterov, maximize, decoupled_weight_decay) -> None:
    """One step over a launch (tensors of one device and dtype, none listed twice): ``bufs``
    is None without momentum, ``first[i]`` starts buffer i from the gradient, ``lr`` a float or
    a one-element tensor, ``grad_scale`` / ``found_inf`` one-element fp32 tensors or None."""
    if not params or (found_inf is not None and bool(found_inf.item())):
        return
    lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
    hyper = dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                 nesterov=nesterov, maximize=maximize,
                 decoupled_weight_decay=decoupled_weight_decay)
    dtype, device = params[0].dtype, params[0].device
    if grad_scale is not None:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        reciprocal = grad_scale.to(compute).reciprocal()
        grads = torch._foreach_mul(_in_dtype(grads, compute), reciprocal.reshape(()))
    if device.type != "cpu" or dtype not in FUSED_DTYPES:
        _step_foreach(params, grads, bufs, first, lr, **hyper)
        return
    fused, rest = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = bufs[i] if bufs is not None else None
        (fused if _laid_out_alike(p, g, b) else rest).append(i)
    if rest:
        _step_foreach(*_select(rest, params, grads, bufs, first), lr, **hyper)
    if fused:
        _step_fused(*_select(fused, params, grads, bufs, first), lr, **hyper)


def _laid_out_alike(p, g, b) -> bool:
    """Element i of each is element i of its flat storage (checked cheaply when contiguous: this
    runs per tensor and step)."""
    if p.is_contiguous() and g.is_contiguous() and (b is None or b.is_contiguous()):
        return True
    return flat_compatible([p, g] if b is None else [p, g, b])


def _select(index, params, grads, bufs, first):
    if len(index) == len(params):
        return params, grads, bufs, first
    return ([params[i] for i in index], [grads[i] for i in index],
            [bufs[i] for i in index] if bufs is not None else None, [first[i] for i in index])


def _in_dtype(tensors, dtype):
    return tensors if tensors[0].dtype == dtype else [t.to(dtype) for t in tensors]


def _step_fused(params, grads, bufs, first, lr, *, weight_decay, momentum, dampening, nesterov,
                maximize, decoupled_weight_decay) -> None:
    """``torch._fused_sgd_`` over the whole list, once per first-step flag present."""
    if decoupled_weight_decay and weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        weight_decay = 0.0
    hyper = dict(weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening,
                 nesterov=nesterov, maximize=maximize)
    if bufs is None:
        torch._fused_sgd_(params, grads, [], is_first_step=False, **hyper)
        return
    for flag in (True, False):
        index = [i for i, f in enumerate(first) if bool(f) == flag]
        if index:
            p, g, b, _ = _select(index, params, grads, bufs, first)
            torch._fused_sgd_(p, g, b, is_first_step=flag, **hyper)


def _step_foreach(params, grads, bufs, first, lr, *, weight_decay, momentum, dampening, nesterov,
                  maximize, decoupled_weight_decay) -> None:
    """The documented update with one ``torch._foreach_*`` call per operation; half-precision
    tensors are stepped through fp32 copies and rounded once when written back. ``grads`` is
    never written (it may be the params' ``.grad``)."""
    dtype = params[0].dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    work_p = _in_dtype(params, compute)
    g = _in_dtype(grads, compute)
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0 and not decoupled_weight_decay:
        g = torch._foreach_add(g, work_p, alpha=weight_decay)
    if momentum != 0:
        work_b = _in_dtype(bufs, compute)
        starts = [i for i, f in enumerate(first) if f]
        updates = [i for i, f in enumerate(first) if not f]
        if starts:
            torch._foreach_copy_([work_b[i] for i in starts], [g[i] for i in starts])
        if updates:
            b_up = [work_b[i] for i in updates]
            torch._foreach_mul_(b_up, momentum)
            torch._foreach_add_(b_up, [g[i] for i in updates], alpha=1 - dampening)
        if work_b is not bufs:
            torch._foreach_copy_(bufs, work_b)
        g = torch._foreach_add(g, work_b, alpha=momentum) if nesterov else work_b
    if decoupled_weight_decay and weight_decay != 0:
        torch._foreach_mul_(work_p, 1 - lr * weight_decay)
    torch._foreach_add_(work_p, g, alpha=-lr)
    if work_p is not params:
        torch._foreach_copy_(params, work_p)
