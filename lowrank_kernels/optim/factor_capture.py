"""Capture of a layer's per-example gradient factors: the inputs f and the output gradients delta.

For a layer y = W x applied R times per example (Linear: once per leading index, e.g. per token;
Conv2d: once per output position, on the unfolded input patch), the weight gradient of a
mini-batch is a sum of outer products::

    dL/dW = sum_rows delta_r f_r^T = D^T F,    D (K, d_out), F (K, d_in), K = B * R

A forward hook keeps the layer input and puts a gradient hook on the output, which records
the output gradient when backward reaches it (the gradient of the output as the layer produced
it, also when an in-place op such as ``ReLU(inplace=True)`` modifies it afterwards). Autograd is never asked for
the weight gradient itself (the weight has ``requires_grad=False`` while captured), so the
weight-gradient GEMM and the ``.grad`` tensor do not exist. ``factors()`` returns D and F.

Supported layers: ``nn.Linear`` (any leading dims) and ``nn.Conv2d`` with ``groups=1`` and zero
padding (``padding_mode="zeros"``, numeric padding). Anything else is reported by
``why_not_capturable`` so the caller can fall back to the dense path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..execution import is_dtensor
from .compiling import refuse_factored_under_compile


def why_not_capturable(module: nn.Module) -> str | None:
    """None when the factored path can take ``module``'s weight, else the reason it cannot."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is unfolded)"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (give the padding as numbers)"
        return None
    return f"{type(module).__name__} layers have no factored form here"


@dataclass
class _Record:
    """One application of the layer: its input, and its output gradient once backward ran."""

    input: Tensor
    grad_output: Tensor | None = None


class _JoinGraph(torch.autograd.Function):
    """A copy of the layer output that is part of the autograd graph through ``anchor``.

    Needed only when nothing upstream requires grad (a first layer without bias): without it
    backward would never reach the layer. A copy, not the output itself, because a custom
    Function's as-is output is a view that in-place ops after the layer (``ReLU(inplace=True)``)
    may not modify.
    """

    @staticmethod
    def forward(ctx, output, anchor):
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def check_not_sharded(weight: Tensor, what: str) -> None:
    """Factored mode steps a whole weight from factors computed on one process: a sharded weight
    (a DTensor) raises NotImplementedError naming the limit."""
    if is_dtensor(weight):
        raise NotImplementedError(
            f"factored mode does not support sharded weights: {what} is a DTensor "
            f"(placements {tuple(weight.placements)}), as torch.distributed.fsdp.fully_shard "
            "(FSDP2) and tensor parallelism make them; its factors are neither gathered nor "
            "reduce-scattered across ranks. Use factored=False (the dense step runs on the local "
            "shards)")


class FactorCapture:
    """Hooks on one layer that collect (D, F) for every forward/backward since the last ``clear``.

    ``active`` mirrors "the weight has a gradient": False after ``clear(set_to_none=True)``, True
    after a backward reached the layer or after ``clear(set_to_none=False)`` (a zero gradient).
    """

    def __init__(self, module: nn.Module, anchor: Tensor):
        reason = why_not_capturable(module)
        if reason is not None:
            raise ValueError(f"cannot capture gradient factors of {type(module).__name__}: {reason}")
        check_not_sharded(module.weight, f"the weight of this {type(module).__name__}")
        self.module = module
        self.anchor = anchor
        self.records: list[_Record] = []
        self.active = False
        self._handle = module.register_forward_hook(self._forward_hook)

    def remove(self) -> None:
        self._handle.remove()
        self.records.clear()

    def clear(self, set_to_none: bool = True) -> None:
        self.records.clear()
        self.active = not set_to_none

    def _forward_hook(self, module, inputs, output):
        refuse_factored_under_compile()
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        record = _Record(inputs[0].detach())
        self.records.append(record)
        replaced = None
        if not output.requires_grad:
            output = replaced = _JoinGraph.apply(output, self.anchor)
        output.register_hook(lambda grad: self._receive(record, grad))
        return replaced

    def _receive(self, record: _Record, grad_output: Tensor) -> None:
        self.active = True
        if record.grad_output is None:
            record.grad_output = grad_output.detach()
        else:  # a second backward through the same graph (retain_graph): one more term of the sum
            self.records.append(_Record(record.input, grad_output.detach()))

    def factors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
        """(D, F) of every completed record, stacked along K; None when there are none."""
        done = [r for r in self.records if r.grad_output is not None]
        if not done:
            return None
        ds, fs = zip(*(self._factor_pair(r) for r in done))
        D = ds[0] if len(ds) == 1 else torch.cat(ds)
        F = fs[0] if len(fs) == 1 else torch.cat(fs)
        if dtype is not None:
            D, F = D.to(dtype), F.to(dtype)
        return D.contiguous(), F.contiguous()

    def _factor_pair(self, record: _Record) -> tuple[Tensor, Tensor]:
        x, g = record.input, record.grad_output
        m = self.module
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:  # unbatched (C, H, W)
                x, g = x.unsqueeze(0), g.unsqueeze(0)
            # Unfolded patches: (B, c_in*kh*kw, L) -> (B*L, c_in*kh*kw), rows in the same
            # (example, position) order as the output gradient's (B, Ho, Wo) -> B*L.
            patches = nnf.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding,
                                 stride=m.stride)
            F = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            D = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
            return D, F
        return g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
