"""Rank of a mini-batch weight gradient next to its bound: Part I of the theory, checkable.

One example's gradient of a layer applied once is an outer product delta f^T (rank <= 1); a layer
applied R times per example (conv: R output positions; a Linear on (B, T, d) inputs: R = T
tokens) contributes R outer products per example, so a batch of B examples gives

    rank(dL/dW) <= min(d_out, d_in, B * R)

(Galanti et al., "SGD and Weight Decay Secretly Minimize the Rank of Your Neural Network").
``gradient_rank`` measures the numerical rank of each layer's gradient on one batch and reports
it beside that bound. For generic data the bound is attained.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..optim.factor_capture import why_not_capturable
from .matricize import LayerFilter, _matches


def numerical_rank(matrix: Tensor, rtol: float | None = None) -> tuple[int, float]:
    """(rank, tolerance): singular values above ``rtol * s_1`` in float64 (numpy's default rtol:
    max(m, n) * machine epsilon of the matrix's dtype, the rounding level of its entries)."""
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(matrix.dtype).eps
    s = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0, 0.0
    tol = float(s[0]) * rtol
    return int((s > tol).sum()), tol


def gradient_rank(model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *,
                  loss_fn: Callable[..., Tensor] | None = None, include: LayerFilter = None,
                  exclude: LayerFilter = None, rtol: float | None = None) -> list[dict]:
    """Per Linear / Conv2d layer: rank of the batch's weight gradient and min(d_out, d_in, B*R).

    The loss is ``loss_fn(model(inputs), targets)`` (default: cross entropy), or
    ``loss_fn(model(inputs))`` when ``targets`` is None. B is ``inputs.shape[0]``. Parameter
    ``.grad`` fields are not touched (``torch.autograd.grad``). Rows: ``layer`` (the weight's
    parameter name, ``"0.weight"``, as RankTracker and analyze name layers), ``shape``
    (d_out, d_in of the matrix), ``batch_size``, ``rows_per_example`` (R), ``rank``, ``bound``,
    ``attained``, ``tolerance``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradient_rank: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Tensor) or inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError("gradient_rank: inputs must be a batched tensor with at least one example")
    if loss_fn is None:
        if targets is None:
            raise ValueError("gradient_rank: give targets (cross-entropy loss) or a loss_fn")
        loss_fn = nnf.cross_entropy
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and why_not_capturable(m) is None
              and (include is None or _matches(name, m, include))
              and not (exclude is not None and _matches(name, m, exclude))]
    if not layers:
        raise ValueError("gradient_rank: the model has no Linear or Conv2d layer to measure "
                         "(after include/exclude)")
    batch = inputs.shape[0]
    rows_per_example: dict[str, int] = {}

    def count_rows(name):
        def hook(module, args, output):
            # Rows of the layer's factor matrices over the batch: (B, C, H, W) conv output ->
            # B*H*W positions; Linear (..., d_out) -> every leading index.
            channels = output.shape[-3] if isinstance(module, nn.Conv2d) else output.shape[-1]
            rows = output.numel() // channels
            rows_per_example[name] = rows_per_example.get(name, 0) + rows // batch
        return hook

    weights = [m.weight for _, m in layers]
    was_trainable = [w.requires_grad for w in weights]
    handles = [m.register_forward_hook(count_rows(name)) for name, m in layers]
    try:
        for w in weights:  # factored DecaySGD switches it off; the measurement needs the grad
            w.requires_grad_(True)
        with torch.enable_grad():
            out = model(inputs)
            loss = loss_fn(out) if targets is None else loss_fn(out, targets)
            if loss.numel() != 1:
                raise ValueError(f"gradient_rank: the loss must be a scalar, got shape "
                                 f"{tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, was_trainable):
            w.requires_grad_(flag)
    rows = []
    for (name, module), g in zip(layers, grads):
        if g is None or name not in rows_per_example:
            # not on the loss's path, or its weight is used functionally (nn.MultiheadAttention's
            # out_proj): without its own forward there is no R to bound the rank with
            continue
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"gradient_rank: the gradient of {name}.weight contains NaN or Inf")
        matrix = g.reshape(g.shape[0], -1)
        rank, tol = numerical_rank(matrix, rtol)
        r = rows_per_example[name]
        bound = min(matrix.shape[0], matrix.shape[1], batch * r)
        rows.append(dict(layer=f"{name}.weight" if name else "weight", shape=tuple(matrix.shape), batch_size=batch,
                         rows_per_example=r, rank=rank, bound=bound, attained=rank == bound,
                         tolerance=tol))
    return rows
