"""Spectral truncation of a model, to test what the top and bottom of the spectrum carry
(Yunis et al. evaluate loss and accuracy with only the top or only the bottom half kept)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .matricize import LayerFilter, tracked_matrices


def _unmatricize(matrix: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv_transpose":
        c_in, c_out = weight.shape[:2]
        return matrix.reshape(c_out, c_in, *weight.shape[2:]).transpose(0, 1)
    return matrix.reshape(weight.shape)


@torch.no_grad()
def truncate_spectrum(model: nn.Module, keep: str = "top", fraction: float = 0.5,
                      include: LayerFilter = None, exclude: LayerFilter = None) -> nn.Module:
    """A copy of ``model`` whose tracked matrices keep only part of their spectrum.

    keep="top": the largest ceil(fraction * r) singular values; keep="bottom": the rest
    (the smallest r - ceil(fraction * r)). The original model is not modified.
    """
    if keep not in ("top", "bottom"):
        raise ValueError(f"keep must be 'top' or 'bottom', got {keep!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    clone = copy.deepcopy(model)
    for tracked in tracked_matrices(clone, include, exclude):
        matrix = tracked.matrix().double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        cut = int(torch.tensor(fraction * s.numel()).ceil())
        mask = torch.zeros_like(s)
        if keep == "top":
            mask[:cut] = 1
        else:
            mask[cut:] = 1
        kept = (u * (s * mask)) @ vh
        tracked.param.copy_(_unmatricize(kept, tracked.param, tracked.kind).to(tracked.param.dtype))
    return clone
