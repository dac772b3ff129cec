"""The SGD step of one weight from its gradient factors: ``factored_update_``.

With the weight gradient ``g = D^T F`` (``FactorCapture.factors()``; D (K, d_out), F (K, d_in))
and ``s = -1`` under ``maximize`` else 1, torch.optim.SGD's update is linear in g, so every form
is exact in factored form; ``outer(T, c, a)`` below is ``T <- c*T + a*D^T F``, one
``decay_outer_`` pass over T:

    momentum == 0 (coupled or decoupled decay):   outer(W, 1 - lr*wd, -lr*s)
    with momentum, coupled decay (d = s*g + wd*W):
        first step: buf = d                      buf <- W; outer(buf, wd, s)
        later:      buf = m*buf + (1-damp)*d     outer(buf, m, (1-damp)*s); buf += (1-damp)*wd*W
        W -= lr*buf                              (Nesterov: outer(W, 1-lr*wd, -lr*s); W -= lr*m*buf)
    with momentum, decoupled decay (d = s*g):
        first step: buf = d                      buf <- 0; outer(buf, 1, s)
        later:      buf = m*buf + (1-damp)*d     outer(buf, m, (1-damp)*s)
        W <- (1-lr*wd)*W - lr*buf                (Nesterov: outer(W, 1-lr*wd, -lr*s); W -= lr*m*buf)

The momentum buffer is dense (d_out x d_in), as in the dense step, so with momentum the mode saves
the ``.grad`` tensor and the weight-gradient GEMM's separate pass, not the buffer; with momentum 0
the whole step is one pass over W. Nesterov runs the product twice (once into the buffer, once
into W). Results equal the dense step up to fp32 rounding (the order of the additions differs).

A weight is updated through its (d_out, d_in) matrix view (conv weights: (c_out, c_in*kh*kw));
a weight whose memory is not contiguous (channels_last) is updated on a contiguous copy.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..ops.decay_outer import DTYPES as KERNEL_DTYPES
from ..ops.decay_outer import decay_outer_


def _outer_(target: Tensor, factors: tuple[Tensor, Tensor] | None, decay: float, alpha: float,
            backend: str | None) -> None:
    """target (a 2-D contiguous matrix) <- decay * target + alpha * D^T F."""
    if factors is None:  # a zero gradient: only the shrink
        if decay != 1.0:
            target.mul_(decay)
        return
    D, F = factors
    if target.dtype in KERNEL_DTYPES:
        decay_outer_(target, D, F, decay, alpha, backend=backend)
    else:  # float16 / float64 weights: the reference formula
        target.addmm_(D.t(), F, beta=decay, alpha=alpha)


def _on_matrix(t: Tensor, update: Callable[[Tensor], None]) -> None:
    """Run ``update`` on the (rows, -1) matrix of ``t``, in place."""
    if t.is_contiguous():
        update(t.view(t.shape[0], -1))
        return
    work = t.reshape(t.shape[0], -1).contiguous()
    update(work)
    t.copy_(work.view(t.shape))


@torch.no_grad()
def factored_update_(weight: Tensor, factors: tuple[Tensor, Tensor] | None,
                     momentum_buffer: Tensor | None, *, first_step: bool, lr: float,
                     weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                     maximize: bool, decoupled_weight_decay: bool,
                     backend: str | None = "auto") -> None:
    """One SGD step of ``weight`` whose gradient is ``D^T F`` (``factors``; None: zero gradient)."""
    s = -1.0 if maximize else 1.0
    lr, wd = float(lr), float(weight_decay)
    shrink = 1.0 - lr * wd

    def outer(t: Tensor, decay: float, alpha: float) -> None:
        _on_matrix(t, lambda mat: _outer_(mat, factors, decay, alpha, backend))

    if momentum == 0:
        outer(weight, shrink, -lr * s)
        return
    if momentum_buffer is None:
        raise ValueError("factored_update_: momentum != 0 needs a momentum buffer")
    buf = momentum_buffer
    keep = 1.0 - dampening
    if decoupled_weight_decay:
        if first_step:
            buf.zero_()
            outer(buf, 1.0, s)
        else:
            outer(buf, momentum, keep * s)
    else:
        if first_step:
            buf.copy_(weight)
            outer(buf, wd, s)
        else:
            outer(buf, momentum, keep * s)
            if wd != 0:
                buf.add_(weight, alpha=keep * wd)
    if nesterov:
        outer(weight, shrink, -lr * s)
        weight.add_(buf, alpha=-lr * momentum)
    elif decoupled_weight_decay:
        if shrink != 1.0:
            weight.mul_(shrink)
        weight.add_(buf, alpha=-lr)
    else:
        weight.add_(buf, alpha=-lr)
