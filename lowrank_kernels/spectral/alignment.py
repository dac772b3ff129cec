"""Alignment between consecutive layers (Yunis et al., "Rank Minimization, Alignment and Weight
Decay in Neural Networks", eqs. 2-3).

A_jk = |<u_j(W_l), v_k(W_next)>|: how well the output directions of one layer line up with the
input directions of the next. The score is the mean of the diagonal A_ii over the top ``top``
(default 10) pairs. When the next layer is a convolution, its right singular vectors live in
(c_in, kh, kw) patch space; the vector at the kernel's centre position is taken and rescaled to
unit length, so A is a matrix of |cosines| in every case.
"""
from __future__ import annotations

import torch

from .matricize import matricize
from .spectra import singular_values


def input_directions(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Right singular vectors (in_dim, k) of the next layer, as vectors over its input channels."""
    if weight.dim() <= 2:
        return v
    c_in, kernel = weight.shape[1], weight.shape[2:]
    patches = v.reshape(c_in, *kernel, v.shape[-1])
    centre = patches[(slice(None), *[size // 2 for size in kernel])]
    return centre / centre.norm(dim=0, keepdim=True).clamp_min(torch.finfo(centre.dtype).tiny)


def alignment_matrix(weight: torch.Tensor, next_weight: torch.Tensor, top: int = 10) -> torch.Tensor:
    """The (k, k) matrix A_jk = |<u_j(W), v_k(W_next)>|, k = min(top, ranks).

    ``weight`` and ``next_weight`` are Linear (out, in) or conv (c_out, c_in, *k) weights; the
    next layer's input channels must equal this layer's outputs.
    """
    if weight.shape[0] != next_weight.shape[1]:
        raise ValueError(f"layers do not chain: this layer has {weight.shape[0]} outputs but the next "
                         f"takes {next_weight.shape[1]} input channels (shapes {tuple(weight.shape)}, "
                         f"{tuple(next_weight.shape)})")
    kinds = ["conv" if w.dim() > 2 else "linear" for w in (weight, next_weight)]
    matrices = [matricize(w.detach(), kind) for w, kind in zip((weight, next_weight), kinds)]
    spectra = singular_values(matrices, return_vectors=True)
    (u, _), (_, v_next) = spectra.vectors
    k = min(top, u.shape[1], v_next.shape[1])
    directions = input_directions(v_next[:, :k], next_weight)
    return (u[:, :k].transpose(0, 1).to(directions.dtype) @ directions).abs()


def alignment(weight: torch.Tensor, next_weight: torch.Tensor, top: int = 10) -> torch.Tensor:
    """Alignment score: mean of A_ii, i <= top (a 0-d tensor)."""
    return alignment_matrix(weight, next_weight, top).diagonal().mean()
