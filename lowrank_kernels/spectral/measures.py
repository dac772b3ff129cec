"""The rank measures of the two source papers, vectorised over many matrices.

Every function takes one matrix (m, n), a batch (b, m, n), a list of matrices of mixed shapes, or
a precomputed ``Spectra``, and returns one value per matrix (a 0-d tensor for one matrix, a (b,)
tensor otherwise). Definitions (DESIGN.md section 2), s_1 >= s_2 >= ... >= s_r, r = min(m, n):

* threshold_rank(eps=1e-3): #{i : s_i / ||W||_F > eps}  (Galanti et al., their eval_ranks)
* relative_rank(eps): #{i : s_i / s_1 > eps}
* effective_rank: exp(H(p)), p_i = s_i / sum_j s_j  (Roy & Vetterli 2007; Yunis et al. eq. 1)
* normalized_effective_rank: effective_rank / r
* stable_rank: ||W||_F^2 / s_1^2
* spectral_norm, frobenius_norm, nuclear_norm: s_1, sqrt(sum s_i^2), sum s_i

Defined answers for degenerate input: a zero matrix (and an empty one) has every rank and norm
0; a 1 x n matrix has rank 1 when non-zero. NaN or Inf entries raise ValueError. On a randomized
``Spectra`` (top-k values only), threshold/relative rank are exact where ``complete`` is set;
effective rank and the nuclear norm then see only the top k values.
"""
from __future__ import annotations

import torch

from .spectra import Spectra, singular_values


def _spectra(x, method: str = "exact", **kwargs) -> Spectra:
    return x if isinstance(x, Spectra) else singular_values(x, method=method, **kwargs)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den == 0 (the zero matrix's defined answer)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(num))


def _check_eps(eps: float) -> float:
    if not (eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    return float(eps)


def _top(sp: Spectra) -> torch.Tensor:
    return sp.values[:, 0] if sp.values.shape[1] else torch.zeros(len(sp), dtype=torch.float64)


# Each measure as a function of a Spectra, returning a (b,) tensor.
def _threshold_rank(sp: Spectra, eps: float) -> torch.Tensor:
    return (_ratio(sp.values, sp.frobenius[:, None]) > eps).sum(1)


def _relative_rank(sp: Spectra, eps: float) -> torch.Tensor:
    return (_ratio(sp.values, _top(sp)[:, None]) > eps).sum(1)


def _effective_rank(sp: Spectra) -> torch.Tensor:
    total = sp.values.sum(1, keepdim=True)
    p = _ratio(sp.values, total)
    entropy = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(1)
    return torch.where(total[:, 0] > 0, entropy.exp(), torch.zeros_like(entropy))


def _normalized_effective_rank(sp: Spectra) -> torch.Tensor:
    eff = _effective_rank(sp)
    return _ratio(eff, sp.rank_bound.to(eff.dtype))


def _stable_rank(sp: Spectra) -> torch.Tensor:
    return _ratio(sp.frobenius.pow(2), _top(sp).pow(2))


_BY_SPECTRA = {
    "threshold_rank": _threshold_rank,
    "relative_rank": _relative_rank,
    "effective_rank": _effective_rank,
    "normalized_effective_rank": _normalized_effective_rank,
    "stable_rank": _stable_rank,
    "spectral_norm": _top,
    "frobenius_norm": lambda sp: sp.frobenius,
    "nuclear_norm": lambda sp: sp.values.sum(1),
}
_TAKES_EPS = ("threshold_rank", "relative_rank")
MEASURES = tuple(_BY_SPECTRA)


def all_measures(x, measures=MEASURES, eps: float = 1e-3, **spectra_kwargs) -> dict[str, torch.Tensor]:
    """Several measures from one spectral computation: {name: value per matrix}."""
    unknown = [m for m in measures if m not in _BY_SPECTRA]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; choose from {list(MEASURES)}")
    eps = _check_eps(eps)
    sp = _spectra(x, **spectra_kwargs)
    return {name: sp.finish(_BY_SPECTRA[name](sp, eps) if name in _TAKES_EPS else _BY_SPECTRA[name](sp))
            for name in measures}


def threshold_rank(x, eps: float = 1e-3, **spectra_kwargs) -> torch.Tensor:
    """#{i : s_i / ||W||_F > eps} per matrix."""
    return all_measures(x, ("threshold_rank",), eps, **spectra_kwargs)["threshold_rank"]


def relative_rank(x, eps: float = 1e-3, **spectra_kwargs) -> torch.Tensor:
    """#{i : s_i / s_1 > eps} per matrix."""
    return all_measures(x, ("relative_rank",), eps, **spectra_kwargs)["relative_rank"]


def effective_rank(x, **spectra_kwargs) -> torch.Tensor:
    """exp(entropy of s / sum(s)) per matrix (Roy & Vetterli)."""
    return all_measures(x, ("effective_rank",), **spectra_kwargs)["effective_rank"]


def normalized_effective_rank(x, **spectra_kwargs) -> torch.Tensor:
    """effective_rank / min(m, n) per matrix."""
    return all_measures(x, ("normalized_effective_rank",), **spectra_kwargs)["normalized_effective_rank"]


def stable_rank(x, **spectra_kwargs) -> torch.Tensor:
    """||W||_F^2 / s_1^2 per matrix."""
    return all_measures(x, ("stable_rank",), **spectra_kwargs)["stable_rank"]


def spectral_norm(x, **spectra_kwargs) -> torch.Tensor:
    """s_1 per matrix."""
    return all_measures(x, ("spectral_norm",), **spectra_kwargs)["spectral_norm"]


def frobenius_norm(x, **spectra_kwargs) -> torch.Tensor:
    """sqrt(sum s_i^2) per matrix."""
    return all_measures(x, ("frobenius_norm",), **spectra_kwargs)["frobenius_norm"]


def nuclear_norm(x, **spectra_kwargs) -> torch.Tensor:
    """sum s_i per matrix."""
    return all_measures(x, ("nuclear_norm",), **spectra_kwargs)["nuclear_norm"]
