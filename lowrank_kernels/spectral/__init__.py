"""Spectra of many weight matrices at once, and the rank measures of the source papers."""
from .alignment import alignment, alignment_matrix
from .gradient_rank import gradient_rank, numerical_rank
from .matricize import TrackedMatrix, matricize, tracked_matrices
from .measures import (MEASURES, all_measures, effective_rank, frobenius_norm, normalized_effective_rank,
                       nuclear_norm, relative_rank, spectral_norm, stable_rank, threshold_rank)
from .spectra import Spectra, orthonormalize, singular_values
from .truncation import truncate_spectrum

__all__ = [
    "MEASURES", "Spectra", "TrackedMatrix", "alignment", "alignment_matrix", "all_measures",
    "effective_rank", "frobenius_norm", "gradient_rank", "matricize", "normalized_effective_rank",
    "nuclear_norm", "numerical_rank", "orthonormalize", "relative_rank", "singular_values", "spectral_norm", "stable_rank",
    "threshold_rank", "tracked_matrices", "truncate_spectrum",
]
