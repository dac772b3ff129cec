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
a weight (or buffer) whose memory is not contiguous (channels_last) is updated on a contiguous
copy, written back once at the end of the step. ``decay_outer_``'s input checks run once per
step, for all the passes over the weight and its buffer.

The sketch of a step (``lowrank_kernels/spectral/streaming_sketch.py``): every operation above
(``outer``, ``mul_``, ``add_`` of the other matrix, ``copy_``, ``zero_``) is linear in the
matrices it reads and commutes with right-multiplication by a fixed matrix Omega (d_in x l), and
``outer(T, c, a)`` applied to ``T Omega`` with the factors ``(D, F Omega)`` gives ``(c T + a D^T F)
Omega``. So ``factored_update_`` run on the sketches ``(W Omega, buf Omega)`` with
``sketch_factors(factors, omega)`` and the same step arguments leaves exactly ``(W' Omega, buf'
Omega)``: one rule set serves the weight and its sketch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.decay_outer import DTYPES as KERNEL_DTYPES
from ..ops.decay_outer import _launch, check_inputs, choose_backend
from .factor_capture import check_not_sharded


def _outer_(target: Tensor, factors: tuple[Tensor, Tensor] | None, decay: float, alpha: float,
            backend: str | None) -> None:
    """target (a 2-D contiguous matrix) <- decay * target + alpha * D^T F, on inputs that
    ``_checked_backend`` accepted (``backend`` is its answer)."""
    if factors is None:  # a zero gradient: only the shrink
        if decay != 1.0:
            target.mul_(decay)
        return
    D, F = factors
    if backend is not None:
        _launch(backend, target, D, F, decay, alpha)
    else:  # float16 / float64 weights: the reference formula
        target.addmm_(D.t(), F, beta=decay, alpha=alpha)


def _checked_backend(matrix: Tensor, factors: tuple[Tensor, Tensor] | None, decay: float,
                     alpha: float, backend: str | None) -> str | None:
    """Check a step's inputs once for all its passes (over the weight's matrix and the buffer's,
    which share shape, dtype and device) and choose decay_outer_'s backend. None: the passes
    need no kernel (a zero gradient, or a float16 / float64 weight)."""
    if factors is None or matrix.dtype not in KERNEL_DTYPES:
        return None
    check_inputs(matrix, *factors, decay, alpha)
    return choose_backend(matrix, backend)


def sketch_factors(factors: tuple[Tensor, Tensor] | None,
                   omega: Tensor) -> tuple[Tensor, Tensor] | None:
    """The factors of a step's sketch: ``(D, F @ omega)`` in ``omega``'s dtype (None stays None).

    ``omega`` (d_in, l) is the sketch's fixed test matrix, so ``D^T (F omega) = (D^T F) omega``:
    the product costs K*d_in*l flops, and ``factored_update_`` on the (d_out, l) sketch then
    K*d_out*l per pass over it."""
    if factors is None:
        return None
    D, F = factors
    if F.shape[-1] != omega.shape[0]:
        raise ValueError(f"sketch_factors: F (K, d_in) = {tuple(F.shape)} does not match omega "
                         f"(d_in, l) = {tuple(omega.shape)}")
    D, F = D.to(omega.dtype), F.to(omega.dtype)  # no copy when the dtype is already omega's
    return D.contiguous(), torch.mm(F, omega)


def _matrix(t: Tensor) -> Tensor:
    """The (rows, -1) matrix of ``t``: a view when ``t`` is contiguous, else a contiguous copy
    (written back by ``_write_back``)."""
    if t.is_contiguous():
        return t.view(t.shape[0], -1)
    return t.reshape(t.shape[0], -1).contiguous()


def _write_back(t: Tensor, matrix: Tensor) -> None:
    if not t.is_contiguous():  # ``matrix`` is a copy, not a view
        t.copy_(matrix.view(t.shape))


@torch.no_grad()
def factored_update_(weight: Tensor, factors: tuple[Tensor, Tensor] | None,
                     momentum_buffer: Tensor | None, *, first_step: bool, lr: float,
                     weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                     maximize: bool, decoupled_weight_decay: bool,
                     backend: str | None = "auto") -> None:
    """One SGD step of ``weight`` whose gradient is ``D^T F`` (``factors``; None: zero gradient)."""
    check_not_sharded(weight, "factored_update_'s weight")
    s = -1.0 if maximize else 1.0
    lr, wd = float(lr), float(weight_decay)
    momentum, keep = float(momentum), 1.0 - float(dampening)
    shrink = 1.0 - lr * wd
    for name, value in (("lr", lr), ("weight_decay", wd), ("momentum", momentum),
                        ("dampening", dampening)):
        if not math.isfinite(value):
            raise ValueError(f"factored_update_: {name} = {value} is not finite")
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("factored_update_: momentum != 0 needs a momentum buffer")
        if (momentum_buffer.shape, momentum_buffer.dtype, momentum_buffer.device) \
                != (weight.shape, weight.dtype, weight.device):
            raise ValueError(
                f"factored_update_: the momentum buffer ({tuple(momentum_buffer.shape)}, "
                f"{momentum_buffer.dtype}, {momentum_buffer.device}) does not match its weight "
                f"({tuple(weight.shape)}, {weight.dtype}, {weight.device})")
    w = _matrix(weight)
    name = _checked_backend(w, factors, shrink, -lr * s, backend)

    def outer(t: Tensor, decay: float, alpha: float) -> None:
        _outer_(t, factors, decay, alpha, name)

    if momentum == 0:
        outer(w, shrink, -lr * s)
        _write_back(weight, w)
        return
    buf = _matrix(momentum_buffer)
    if decoupled_weight_decay:
        if first_step:
            buf.zero_()
            outer(buf, 1.0, s)
        else:
            outer(buf, momentum, keep * s)
    else:
        if first_step:
            buf.copy_(w)
            outer(buf, wd, s)
        else:
            outer(buf, momentum, keep * s)
            if wd != 0:
                buf.add_(w, alpha=keep * wd)
    if nesterov:
        outer(w, shrink, -lr * s)
        w.add_(buf, alpha=-lr * momentum)
    elif decoupled_weight_decay:
        if shrink != 1.0:
            w.mul_(shrink)
        w.add_(buf, alpha=-lr)
    else:
        w.add_(buf, alpha=-lr)
    _write_back(momentum_buffer, buf)
    _write_back(weight, w)
