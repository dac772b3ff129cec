"""Fused weight-decay shrink + rank-K outer-product accumulation: ``decay_outer_``.

    W <- decay * W + alpha * D^T F          W (m, n), D (K, m), F (K, n)

is one SGD step of a layer written from its per-example factors: D holds the output gradients
delta_i, F the layer inputs f_i (after unfolding for a convolution), so D^T F = sum_i delta_i f_i^T
is the mini-batch weight gradient, of rank <= K, and with ``decay = 1 - lr*wd``,
``alpha = -lr`` this is SGD with weight decay that never materialises the gradient.
K = B for a Linear layer, K = B*R when the layer is applied R times per example (conv: R output
positions; attention projections: R tokens).

Backends (same rules as every op, see ``lowrank_kernels.backends``):

* ``torch``: ``W.addmm_(D.T, F, beta=decay, alpha=alpha)`` (one BLAS/cuBLAS call).
* ``triton`` / ``cuda``: one pass over W, each tile of W read once and written once, the product
  accumulated on chip in fp32 (tensor cores where the dtype allows).

Dtypes: float32 and bfloat16 (fp32 accumulation; W, D, F share one dtype). W must be
contiguous (it is updated in place through its data pointer); D and F are made contiguous if
they are not. ``decay`` and ``alpha`` are Python numbers.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from ..backends import resolve_backend

DTYPES = (torch.float32, torch.bfloat16)

_KERNEL_MODULES = {
    "triton": "..kernels.triton.decay_outer",
    "cuda": "..kernels.cuda.decay_outer",
}


def _check_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"decay_outer_: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"decay_outer_: {name} must be a dense (strided) tensor, got layout "
                         f"{t.layout}")
    if t.is_complex():
        raise ValueError(f"decay_outer_: {name} is complex ({t.dtype}); only real float32 and "
                         "bfloat16 are supported")
    if t.dtype not in DTYPES:
        raise ValueError(f"decay_outer_: {name} has dtype {t.dtype}; supported: float32, bfloat16")
    if t.dim() != 2:
        raise ValueError(f"decay_outer_: {name} must be 2-D, got shape {tuple(t.shape)}")


def check_inputs(W: Tensor, D: Tensor, F: Tensor, decay: float, alpha: float, *,
                 check_finite: bool = True) -> None:
    """Raise a clear error for anything ``decay_outer_`` cannot take (see its docstring)."""
    for name, t in (("W", W), ("D", D), ("F", F)):
        _check_tensor(name, t)
    m, n = W.shape
    if D.shape[1] != m or F.shape[1] != n or D.shape[0] != F.shape[0]:
        raise ValueError(f"decay_outer_: shapes do not match W (m, n) = {tuple(W.shape)}, "
                         f"D (K, m) = {tuple(D.shape)}, F (K, n) = {tuple(F.shape)}")
    if D.shape[0] == 0:
        raise ValueError("decay_outer_: K = 0 (D and F have no rows): there is no update to apply")
    if not (D.dtype == F.dtype == W.dtype):
        raise ValueError(f"decay_outer_: W, D, F must share one dtype, got {W.dtype}, {D.dtype}, "
                         f"{F.dtype}")
    if not (D.device == F.device == W.device):
        raise ValueError(f"decay_outer_: W, D, F must be on one device, got {W.device}, "
                         f"{D.device}, {F.device}")
    if not W.is_contiguous():
        raise ValueError(f"decay_outer_: W must be contiguous (it is updated in place), got "
                         f"strides {W.stride()} for shape {tuple(W.shape)}")
    for name, v in (("decay", decay), ("alpha", alpha)):
        if isinstance(v, Tensor) or not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"decay_outer_: {name} must be a Python number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"decay_outer_: {name} = {v} is not finite")
    if check_finite:
        for name, t in (("D", D), ("F", F)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"decay_outer_: {name} contains NaN or Inf")


def decay_outer_(W: Tensor, D: Tensor, F: Tensor, decay: float, alpha: float, *,
                 backend: str | None = "auto", check_finite: bool = False) -> Tensor:
    """In place ``W <- decay * W + alpha * D^T F``; returns ``W``.

    W (m, n) contiguous; D (K, m), F (K, n), K >= 1; one dtype (float32 or bfloat16) and one
    device for all three. ``check_finite=True`` also rejects NaN/Inf in D and F (one device sync).
    """
    check_inputs(W, D, F, decay, alpha, check_finite=check_finite)
    name = resolve_backend(backend, W.device)
    if W.numel() == 0:
        return W
    if name == "torch":
        return W.addmm_(D.t(), F, beta=decay, alpha=alpha)
    module = importlib.import_module(_KERNEL_MODULES[name], __package__)
    module.launch_decay_outer(W, D.contiguous(), F.contiguous(), float(decay), float(alpha))
    return W
