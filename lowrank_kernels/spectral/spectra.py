"""Singular values of many weight matrices at once: exact and randomized tiers, batched by shape.

A model's layers have a handful of distinct shapes, so matrices are grouped by shape (a tall matrix
is transposed first: W and W^T share singular values) and each group is one batched computation,
never a Python loop of per-matrix SVDs.

* ``exact``: the Gram matrix of the short side, ``A A^T``, in float64 and its eigenvalues
  (``batched_eigh``): s_i = sqrt(lambda_i). Squaring the matrix loses the singular values below
  about 1e-8 * s_1 in float64, far under any rank threshold in use (eps = 1e-3 of ||W||_F); the
  tests check threshold_rank against LAPACK on trained-like spectra.
* ``randomized``: the range finder of Halko, Martinsson and Tropp, "Finding structure with
  randomness" (2011): Y = A Omega, q power iterations, each followed by a batched
  orthonormalisation (shifted CholeskyQR, then CholeskyQR2: Fukaya et al., "Shifted Cholesky QR
  for computing the QR factorization of ill-conditioned matrices", 2020), B = Q^T A, and the top-k
  singular triplets from the small Gram matrix B B^T. It returns the a-posteriori error
  ||A - Q Q^T A||_F = sqrt(||A||_F^2 - ||B||_F^2) with the values. ``adaptive=True`` doubles k
  until s_k / ||W||_F < eps, so the eps threshold rank is exact whenever it is below k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

@dataclass
class Spectra:
    """Singular values of b matrices, padded to a common length with zeros.

    values: (b, width) descending, float; rank_bound: (b,) = min(m, n); frobenius: (b,) exact
    ||W||_F; shapes: the (m, n) of each matrix; single: the input was one matrix.
    For the randomized tier, ``values`` holds the top k only, ``residual`` (b,) the Frobenius norm
    of what Q misses, and ``complete`` (b,) whether every s_i above eps * ||W||_F is in ``values``.
    U (b, m, k) and V (b, n, k) are kept when asked for, for one shape group at a time.
    """

    values: torch.Tensor
    rank_bound: torch.Tensor
    frobenius: torch.Tensor
    shapes: list[tuple[int, int]]
    single: bool = False
    method: str = "exact"
    residual: torch.Tensor | None = None
    complete: torch.Tensor | None = None
    vectors: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shapes)

    def finish(self, per_matrix: torch.Tensor) -> torch.Tensor:
        """Return per-matrix results as a scalar for a single matrix, else a (b,) tensor."""
        return per_matrix[0] if self.single else per_matrix


def as_matrices(x) -> tuple[list[torch.Tensor], bool]:
    """Normalise one matrix (m, n), a batch (b, m, n) or a list of matrices; validate each."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            matrices, single = [x], True
        elif x.dim() == 3:
            matrices, single = list(x.unbind(0)), False
        else:
            raise ValueError(f"expected a matrix (m, n) or a batch (b, m, n), got shape {tuple(x.shape)}")
    elif isinstance(x, (list, tuple)):
        matrices, single = list(x), False
    else:
        raise TypeError(f"expected a tensor or a list of tensors, got {type(x).__name__}")
    for i, w in enumerate(matrices):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"matrix {i}: expected a tensor, got {type(w).__name__}")
        if w.is_sparse:
            raise TypeError(f"matrix {i}: sparse tensors are not supported; pass w.to_dense()")
        if w.is_complex():
            raise TypeError(f"matrix {i}: complex matrices are not supported")
        if not w.is_floating_point():
            raise TypeError(f"matrix {i}: expected a floating-point matrix, got {w.dtype}")
        if w.dim() != 2:
            raise ValueError(f"matrix {i}: expected 2-D, got shape {tuple(w.shape)}; "
                             "use lowrank_kernels.spectral.matricize for conv weights")
        if w.numel() and not bool(torch.isfinite(w).all()):
            raise ValueError(f"matrix {i} (shape {tuple(w.shape)}) contains NaN or Inf")
    return matrices, single


def _shape_groups(matrices: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the matrices that share (device, short side, long side)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(matrices):
        m, n = w.shape
        groups.setdefault((w.device, min(m, n), max(m, n)), []).append(i)
    return groups


def _stack_wide(matrices, index, dtype) -> torch.Tensor:
    """(g, short, long) stack of the group, tall matrices transposed."""
    return torch.stack([(w if w.shape[0] <= w.shape[1] else w.T).to(dtype) for w in
                        (matrices[i] for i in index)])


def singular_values(x, method: str = "exact", *, k: int = 64, oversample: int = 16,
                    power_iters: int = 2, adaptive: bool = False, eps: float = 1e-3,
                    dtype: torch.dtype | None = None, return_vectors: bool = False,
                    seed: int = 0, backend: str | None = "auto") -> Spectra:
    """Singular values of one matrix, a batch, or a list of matrices of mixed shapes.

    method: "exact" (all values, float64 by default) or "randomized" (top ``k``, float32 by
    default; ``adaptive`` grows k until s_k / ||W||_F < eps). ``seed`` fixes the random test
    matrices. ``backend`` picks the eigensolver of the small symmetric problems.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    if k < 1 or oversample < 0 or power_iters < 0:
        raise ValueError(f"need k >= 1, oversample >= 0, power_iters >= 0; got {k}, {oversample}, {power_iters}")
    matrices, single = as_matrices(x)
    b = len(matrices)
    shapes = [tuple(w.shape) for w in matrices]
    device = matrices[0].device if b else torch.device("cpu")
    rank_bound = torch.tensor([min(s) for s in shapes], dtype=torch.long)
    frobenius = torch.zeros(b, dtype=torch.float64)
    per_matrix: list[torch.Tensor] = [torch.zeros(0, dtype=torch.float64)] * b
    residual = torch.zeros(b, dtype=torch.float64)
    complete = torch.ones(b, dtype=torch.bool)
    vectors: list = [None] * b

    for (dev, short, long), index in _shape_groups(matrices).items():
        work_dtype = dtype or (torch.float64 if method == "exact" else torch.float32)
        stack = _stack_wide(matrices, index, work_dtype)
        frob = torch.linalg.matrix_norm(stack.double(), "fro").cpu() if short else torch.zeros(len(index), dtype=torch.float64)
        frobenius[index] = frob
        if short == 0:
            continue
        if method == "exact" or k + oversample >= short:
            s, u, v = _exact_group(stack.double(), return_vectors, backend)
        else:
            s, u, v, res = _randomized_group(stack, k, oversample, power_iters, adaptive, eps,
                                             frob, seed, return_vectors, backend)
            residual[index] = res
            complete[index] = (s[:, -1].double().cpu() <= eps * frob) | (s.shape[1] >= short)
        s_cpu = s.double().cpu()
        for j, i in enumerate(index):
            per_matrix[i] = s_cpu[j]
            if return_vectors:
                transposed = matrices[i].shape[0] > matrices[i].shape[1]
                vectors[i] = (v[j], u[j]) if transposed else (u[j], v[j])

    width = max((len(s) for s in per_matrix), default=0)
    values = torch.zeros(b, width, dtype=torch.float64)
    for i, s in enumerate(per_matrix):
        values[i, :len(s)] = s
    return Spectra(values=values, rank_bound=rank_bound, frobenius=frobenius, shapes=shapes,
                   single=single, method=method, residual=residual if method == "randomized" else None,
                   complete=complete if method == "randomized" else None, vectors=vectors)


def _descending_eigh(gram: torch.Tensor, backend):
    from ..ops.symmetric_eig import batched_eigh

    w, vecs = batched_eigh(gram, backend=backend)
    return w.flip(-1).clamp_min(0), vecs.flip(-1)


def _exact_group(stack: torch.Tensor, return_vectors: bool, backend):
    gram = stack @ stack.transpose(1, 2)
    if not return_vectors:
        # Eigenvalues only: LAPACK/cuSOLVER's batched path; the custom kernels pay off for the
        # small problems of the randomized tier.
        w = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
        return w.sqrt(), None, None
    w, u = _descending_eigh(gram, "torch")
    s = w.sqrt()
    v = _right_vectors(stack, u, s)
    return s, u, v


def _right_vectors(stack, u, s):
    """V = A^T U / s, zero where s is (numerically) zero."""
    safe = torch.where(s > s[:, :1] * 1e-12, s, torch.ones_like(s))
    v = stack.transpose(1, 2) @ u / safe.unsqueeze(1)
    return v * (s > s[:, :1] * 1e-12).unsqueeze(1)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Batched orthonormal basis of the columns of y (g, m, l), m >= l: shifted CholeskyQR, then
    CholeskyQR2. The shift keeps the Cholesky factorisation defined when y is rank-deficient (a
    low-rank layer); the two plain passes restore orthogonality to working precision."""
    l = y.shape[-1]
    eye = torch.eye(l, dtype=y.dtype, device=y.device)
    unit = torch.finfo(y.dtype).eps
    for shifted in (True, False, False):
        gram = y.transpose(1, 2) @ y
        if shifted:
            scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(torch.finfo(y.dtype).tiny)
            shift = 11 * (y.shape[1] * l + l * (l + 1)) * unit * scale
            gram = gram + shift[:, None, None] * eye
        factor, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            # Fallback for a basis too ill-conditioned even after the shift: Householder QR.
            return torch.linalg.qr(y).Q
        y = torch.linalg.solve_triangular(factor, y.transpose(1, 2), upper=False).transpose(1, 2)
    return y


def _randomized_group(stack, k, oversample, power_iters, adaptive, eps, frob, seed,
                      return_vectors, backend):
    g, short, long = stack.shape
    generator = torch.Generator(device=stack.device).manual_seed(seed)
    while True:
        width = min(k + oversample, short)
        omega = torch.randn(g, long, width, generator=generator, device=stack.device, dtype=stack.dtype)
        q = orthonormalize(stack @ omega)
        for _ in range(power_iters):
            z = orthonormalize(stack.transpose(1, 2) @ q)
            q = orthonormalize(stack @ z)
        # The small problem in float64: squaring B in float32 would lose the values below
        # about 3e-4 * s_1 (the square root of float32's epsilon).
        small = (q.transpose(1, 2) @ stack).double()  # (g, width, long)
        w, u_small = _descending_eigh(small @ small.transpose(1, 2), backend)
        s = w.sqrt()[:, :k]
        captured = small.pow(2).sum((1, 2)).cpu()
        residual = (frob.pow(2) - captured).clamp_min(0).sqrt()
        done = bool((s[:, -1].double().cpu() <= eps * frob).all()) or k + oversample >= short
        if not adaptive or done:
            break
        k = min(2 * k, short)
        if k + oversample >= short:
            return (*_exact_group(stack.double(), return_vectors, backend), torch.zeros(g, dtype=torch.float64))
    if not return_vectors:
        return s, None, None, residual
    u = q.double() @ u_small[:, :, :k]
    v = _right_vectors(stack.double(), u, s)
    return s, u, v, residual
