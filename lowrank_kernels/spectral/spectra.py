"""Singular values of many weight matrices at once: exact and randomized tiers, batched by shape.

A model's layers have a handful of distinct shapes, so matrices are grouped by shape (a tall matrix
is transposed first: W and W^T share singular values) and each group is one batched computation,
never a Python loop of per-matrix SVDs.

* ``exact``: the Gram matrix of the short side, ``A A^T``, in float64 (on the CPU only its lower
  blocks are multiplied) and its eigenvalues (LAPACK/cuSOLVER ``eigvalsh``): s_i =
  sqrt(lambda_i); ||W||_F is the square root of its trace. Squaring the matrix loses the singular
  values below about 1e-8 * s_1 in float64, far under any rank threshold in use (eps = 1e-3 of
  ||W||_F); the tests check threshold_rank against LAPACK on trained-like spectra.
* ``randomized``: the range finder of Halko, Martinsson and Tropp, "Finding structure with
  randomness" (2011): Y = A Omega, q power iterations, each followed by a batched
  orthonormalisation (on a GPU shifted CholeskyQR, then CholeskyQR2: Fukaya et al., "Shifted
  Cholesky QR for computing the QR factorization of ill-conditioned matrices", 2020; on the CPU
  LAPACK's Householder QR), B = Q^T A, and the top-k singular triplets from the small Gram
  matrix B B^T. It returns the a-posteriori error ||A - Q Q^T A||_F = sqrt(||A||_F^2 -
  ||B||_F^2) with the values. ``adaptive=True`` doubles k until s_k / ||W||_F < eps, so the eps
  threshold rank is exact whenever it is below k.

The values are checked once up front (one ``aminmax`` per matrix, one host transfer per device:
NaN/Inf raise), matrices whose entries are huge or tiny are scaled by a power of two (exact) so
no product overflows or underflows, and the results come back to the host once per device at the
end, not once per shape group.
"""
from __future__ import annotations

import math
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
    """Normalise one matrix (m, n), a batch (b, m, n) or a list of matrices; validate each.

    Checks types and shapes only; ``finite_max_abs`` checks the values."""
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
        if w.is_sparse or w.layout != torch.strided:
            raise TypeError(f"matrix {i}: sparse tensors are not supported; pass w.to_dense()")
        if w.is_complex():
            raise TypeError(f"matrix {i}: complex matrices are not supported")
        if not w.is_floating_point():
            raise TypeError(f"matrix {i}: expected a floating-point matrix, got {w.dtype}")
        if w.dim() != 2:
            raise ValueError(f"matrix {i}: expected 2-D, got shape {tuple(w.shape)}; "
                             "use lowrank_kernels.spectral.matricize for conv weights")
    return matrices, single


def _which(i: int, matrices: list[torch.Tensor], names) -> str:
    """How an error names matrix ``i``: its layer name when the caller gave names."""
    shape = tuple(matrices[i].shape)
    return f"{names[i]} (matrix {i}, shape {shape})" if names is not None else f"matrix {i} (shape {shape})"


def finite_max_abs(matrices: list[torch.Tensor], names=None) -> list[float]:
    """max |w_ij| of every matrix (0 for an empty one); ValueError naming the first matrix that
    holds NaN or Inf (by ``names[i]``, e.g. the layer, when given).

    One ``aminmax`` pass per matrix (NaN propagates through it) and one host transfer per device:
    much cheaper than ``isfinite(w).all()`` per matrix, which makes several passes and syncs once
    per matrix on a GPU.
    """
    max_abs = [0.0] * len(matrices)
    by_device: dict[torch.device, list[int]] = {}
    for i, w in enumerate(matrices):
        if w.numel():
            by_device.setdefault(w.device, []).append(i)
    for index in by_device.values():
        extremes = [torch.aminmax(matrices[i].detach()) for i in index]
        both = torch.stack([e.min for e in extremes] + [e.max for e in extremes]).double().abs()
        host = torch.maximum(both[:len(index)], both[len(index):]).cpu().tolist()
        for i, value in zip(index, host):
            if not math.isfinite(value):
                raise ValueError(f"{_which(i, matrices, names)} contains NaN or Inf")
            max_abs[i] = value
    return max_abs


# Inputs whose largest |entry| lies outside [2^-32, 2^32] are scaled by a power of two (exact)
# before any product: float32 squares and sums of a few thousand of them then stay far from
# overflow and underflow, and so do float64 Gram matrices of float64 inputs of any magnitude.
_SAFE_EXPONENT = 32


def _power_of_two_scale(max_abs: float) -> float:
    """2^-e bringing ``max_abs`` into [0.5, 1) when it is outside the safe range, else 1."""
    if max_abs == 0.0 or 2.0 ** -_SAFE_EXPONENT <= max_abs <= 2.0 ** _SAFE_EXPONENT:
        return 1.0
    return math.ldexp(1.0, -math.frexp(max_abs)[1])


def _shape_groups(matrices: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the matrices that share (device, short side, long side)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(matrices):
        m, n = w.shape
        groups.setdefault((w.device, min(m, n), max(m, n)), []).append(i)
    return groups


def _stack_wide(matrices, index, dtype, scales) -> torch.Tensor:
    """(g, short, long) stack of the group in ``dtype``, tall matrices transposed, each scaled by
    its factor. Written into one preallocated buffer: a single converting copy per matrix
    (``torch.stack(...).to(dtype)`` copies twice)."""
    first = matrices[index[0]]
    short, long = sorted(first.shape)
    out = torch.empty(len(index), short, long, dtype=dtype, device=first.device)
    for j, i in enumerate(index):
        w = matrices[i].detach()
        if scales[i] != 1.0:  # before the conversion: 1e200 in float64 is Inf in float32
            w = w * scales[i]
        out[j].copy_(w if w.shape[0] <= w.shape[1] else w.T)
    return out


# Below this size a diagonal block of the CPU Gram matrix is one product (see _gram).
_GRAM_LEAF = 128


def _gram(stack: torch.Tensor) -> torch.Tensor:
    """stack @ stack^T, (g, short, short).

    On the CPU only the blocks on and below the diagonal are multiplied (recursive halving down to
    _GRAM_LEAF rows; the upper blocks are mirrored): 25% (n = 256) to 44% (n = 768) fewer flops
    than one bmm, as BLAS's syrk would do, and the Gram matrix is the exact tier's largest cost
    there. On a GPU one bmm beats the extra launches.
    """
    g, n, _ = stack.shape
    if stack.device.type != "cpu" or n <= _GRAM_LEAF:
        return stack @ stack.transpose(1, 2)
    gram = stack.new_empty(g, n, n)

    def fill(lo: int, hi: int) -> None:
        if hi - lo <= _GRAM_LEAF:
            rows = stack[:, lo:hi]
            gram[:, lo:hi, lo:hi] = rows @ rows.transpose(1, 2)
            return
        mid = (lo + hi) // 2
        fill(lo, mid)
        fill(mid, hi)
        gram[:, mid:hi, lo:mid] = stack[:, mid:hi] @ stack[:, lo:mid].transpose(1, 2)
        gram[:, lo:mid, mid:hi] = gram[:, mid:hi, lo:mid].transpose(1, 2)

    fill(0, n)
    return gram


def singular_values(x, method: str = "exact", *, k: int = 64, oversample: int = 16,
                    power_iters: int = 2, adaptive: bool = False, eps: float = 1e-3,
                    dtype: torch.dtype | None = None, return_vectors: bool = False,
                    seed: int = 0, backend: str | None = "auto", names=None) -> Spectra:
    """Singular values of one matrix, a batch, or a list of matrices of mixed shapes.

    method: "exact" (all values, from a float64 Gram matrix) or "randomized" (top ``k``; the range
    finder works in ``dtype``, float32 by default; ``adaptive`` grows k until s_k / ||W||_F <
    eps). ``seed`` fixes the random test matrices. ``backend`` picks the eigensolver of the small
    symmetric problems. ``names`` (one per matrix, e.g. the layers') name a matrix in errors.
    The results (``values``, ``frobenius``, ...) are float64 on the CPU; the
    singular vectors stay on the matrices' device.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    if k < 1 or oversample < 0 or power_iters < 0:
        raise ValueError(f"need k >= 1, oversample >= 0, power_iters >= 0; got {k}, {oversample}, {power_iters}")
    matrices, single = as_matrices(x)
    if names is not None:
        names = list(names)
        if len(names) != len(matrices):
            raise ValueError(f"names has {len(names)} entries for {len(matrices)} matrices")
    max_abs = finite_max_abs(matrices, names)
    scales = [_power_of_two_scale(a) for a in max_abs]
    b = len(matrices)
    shapes = [tuple(w.shape) for w in matrices]
    rank_bound = torch.tensor([min(s) for s in shapes], dtype=torch.long)
    vectors: list = [None] * b
    # Per group: (index, values, frobenius, residual, complete), all still on the group's device;
    # they travel to the host together at the end, one transfer per device.
    results: list[tuple] = []

    for (dev, short, long), index in _shape_groups(matrices).items():
        g = len(index)
        if short == 0:
            zeros = torch.zeros(g, dtype=torch.float64, device=dev)
            done = torch.ones(g, dtype=torch.bool, device=dev)
            results.append((index, zeros[:, None][:, :0], zeros, zeros, done))
            continue
        unscale = torch.tensor([1.0 / scales[i] for i in index], dtype=torch.float64, device=dev)
        if method == "exact" or k + oversample >= short:
            s, frob, u, v = _exact_group(_stack_wide(matrices, index, torch.float64, scales),
                                         return_vectors)
            residual = torch.zeros(g, dtype=torch.float64, device=dev)
        else:
            stack = _stack_wide(matrices, index, dtype or torch.float32, scales)
            # Row norms in the working dtype, their squares summed in float64: accurate to about
            # 1e-8 where one float32 reduction over the whole matrix loses ~1e-5.
            frob = torch.linalg.vector_norm(stack, dim=2).double().pow(2).sum(1).sqrt()
            s, u, v, residual = _randomized_group(stack, k, oversample, power_iters, adaptive, eps,
                                                  frob, seed, return_vectors, backend)
        s = s.double()
        complete = (s[:, -1] <= eps * frob) | (s.shape[1] >= short)
        results.append((index, s * unscale[:, None], frob * unscale, residual * unscale, complete))
        if return_vectors:
            for j, i in enumerate(index):
                transposed = matrices[i].shape[0] > matrices[i].shape[1]
                vectors[i] = (v[j], u[j]) if transposed else (u[j], v[j])

    width = max((r[1].shape[1] for r in results), default=0)
    values = torch.zeros(b, width, dtype=torch.float64)
    frobenius = torch.zeros(b, dtype=torch.float64)
    residual = torch.zeros(b, dtype=torch.float64)
    complete = torch.ones(b, dtype=torch.bool)
    for group_index, s, frob, res, done in _to_host(results):
        index = torch.tensor(group_index, dtype=torch.long)
        values[index, :s.shape[1]] = s
        frobenius[index] = frob
        residual[index] = res
        complete[index] = done
    randomized = method == "randomized"
    return Spectra(values=values, rank_bound=rank_bound, frobenius=frobenius, shapes=shapes,
                   single=single, method=method, residual=residual if randomized else None,
                   complete=complete if randomized else None, vectors=vectors)


def _to_host(results: list[tuple]) -> list[tuple]:
    """The groups' device results on the host, with one device-to-host copy per device."""
    by_device: dict[torch.device, list[int]] = {}
    for n, (_, s, *_rest) in enumerate(results):
        by_device.setdefault(s.device, []).append(n)
    host: list[tuple] = [()] * len(results)
    for device, members in by_device.items():
        parts = []
        for n in members:
            _, s, frob, res, done = results[n]
            parts += [s.reshape(-1), frob, res, done.double()]
        flat = torch.cat(parts).cpu() if device.type != "cpu" else torch.cat(parts)
        offset = 0
        for n in members:
            index, s, *_rest = results[n]
            g, width = s.shape
            pieces = []
            for size in (g * width, g, g, g):
                pieces.append(flat[offset:offset + size])
                offset += size
            host[n] = (index, pieces[0].reshape(g, width), pieces[1], pieces[2], pieces[3] > 0.5)
    return host


def _descending_eigh(gram: torch.Tensor, backend):
    from ..ops.symmetric_eig import batched_eigh

    w, vecs = batched_eigh(gram, backend=backend)
    return w.flip(-1).clamp_min(0), vecs.flip(-1)


def _exact_group(stack: torch.Tensor, return_vectors: bool):
    """All singular values of a float64 (g, short, long) stack, and its Frobenius norms (the
    square root of the Gram matrix's trace: no extra pass over the stack)."""
    gram = _gram(stack)
    frob = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(0).sqrt()
    if not return_vectors:
        # Eigenvalues only: LAPACK/cuSOLVER's batched path; the custom kernels pay off for the
        # small problems of the randomized tier.
        w = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
        return w.sqrt(), frob, None, None
    w, u = _descending_eigh(gram, "torch")
    s = w.sqrt()
    v = _right_vectors(stack, u, s)
    return s, frob, u, v


def _right_vectors(stack, u, s):
    """V = A^T U / s, zero where s is (numerically) zero."""
    safe = torch.where(s > s[:, :1] * 1e-12, s, torch.ones_like(s))
    v = stack.transpose(1, 2) @ u / safe.unsqueeze(1)
    return v * (s > s[:, :1] * 1e-12).unsqueeze(1)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Batched orthonormal basis of the columns of y (g, m, l), m >= l: shifted CholeskyQR, then
    CholeskyQR2, all batched matrix products (what a GPU does best).

    The shift keeps the Cholesky factorisation defined when y is rank-deficient (a low-rank
    layer); the two plain passes restore orthogonality to working precision. The l x l Gram
    matrices and their Cholesky factors are formed in float64 even for float32 input (mixed
    precision: Yamazaki, Tomov and Dongarra, "Mixed-precision Cholesky QR factorization and its
    case studies on multicore CPU with multiple GPUs", 2015): a float32 Gram matrix squares the
    condition number of y into float32's 1e-7 and fails for the ~1e5-conditioned sketches of
    trained low-rank layers, while the extra cost is O(m l^2) against the sketch's O(m n l).
    """
    q, failed = _cholesky_qr3(y)
    if bool(failed.any()):
        # Fallback for a basis too ill-conditioned even after the shift: Householder QR.
        return torch.linalg.qr(y).Q
    return q


def _cholesky_qr3(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``orthonormalize`` without its host check: (basis, (g,) bool tensor of the matrices whose
    Cholesky factorisation failed), so that a caller can check many bases at once."""
    g, m, cols = y.shape
    eye = torch.eye(cols, dtype=torch.float64, device=y.device)
    # The shift must dominate the rounding of the Gram matrix (float64) and of the triangular
    # solves in y's dtype, which the next pass sees as a perturbation of its input.
    unit = torch.finfo(y.dtype).eps if y.dtype == torch.float64 else torch.finfo(torch.float64).eps
    q = y
    failed = torch.zeros(g, dtype=torch.bool, device=y.device)
    for shifted in (True, False, False):
        q64 = q.double()
        gram = q64.transpose(1, 2) @ q64
        if shifted:
            scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
            shift = 11 * (m * cols + cols * (cols + 1)) * unit * scale
            gram = gram + shift[:, None, None] * eye
        factor, info = torch.linalg.cholesky_ex(gram)
        failed = failed | (info != 0)  # a failed pass spoils what follows it, nothing else
        q = torch.linalg.solve_triangular(factor.to(y.dtype), q.transpose(1, 2),
                                          upper=False).transpose(1, 2)
    return q, failed


def _householder(y: torch.Tensor) -> tuple[torch.Tensor, None]:
    return torch.linalg.qr(y).Q, None


def _range_basis(stack: torch.Tensor, omega: torch.Tensor, power_iters: int, basis):
    """Q spanning the range of stack @ omega after ``power_iters`` power iterations, and the
    failure flags of ``basis`` (None when it cannot fail)."""
    q, failed = basis(stack @ omega)
    for _ in range(power_iters):
        z, failed_z = basis(stack.transpose(1, 2) @ q)
        q, failed_q = basis(stack @ z)
        if failed is not None:
            failed = failed | failed_z | failed_q
    return q, failed


def _sketch_basis(stack: torch.Tensor, omega: torch.Tensor, power_iters: int) -> torch.Tensor:
    """The range finder's orthonormal basis. CPU: LAPACK's Householder QR (fewer flops than three
    CholeskyQR passes there). GPU: batched CholeskyQR (a batched QR factorisation is a loop of
    small, latency-bound kernels there), checked once for all its 1 + 2 * power_iters
    factorisations (one host sync, not one per factorisation); the rare failure redoes the sketch
    with Householder QR."""
    if stack.device.type == "cpu":
        return _range_basis(stack, omega, power_iters, _householder)[0]
    q, failed = _range_basis(stack, omega, power_iters, _cholesky_qr3)
    if bool(failed.any()):
        q = _range_basis(stack, omega, power_iters, _householder)[0]
    return q


# On the CPU, the adaptive tier switches to the exact one once the sketch would be wider than
# 1/_CPU_EXACT_FRACTION of the short side m: 2 + 2 * power_iters passes over the m x n matrix with
# a sketch of width l cost about 12 m n l float32 flops, the exact tier's float64 Gram matrix
# (lower blocks) and LAPACK's eigvalsh about m^2 n + 4/3 m^3 float64 flops, at half the float32
# rate: the exact tier wins from l ~ m/5. A GPU keeps sketching (its eigensolvers for large m are
# the slow part there).
_CPU_EXACT_FRACTION = 5


def _randomized_group(stack, k, oversample, power_iters, adaptive, eps, frob, seed,
                      return_vectors, backend):
    g, short, long = stack.shape
    generator = torch.Generator(device=stack.device).manual_seed(seed)
    while True:
        width = min(k + oversample, short)
        omega = torch.randn(g, long, width, generator=generator, device=stack.device, dtype=stack.dtype)
        q = _sketch_basis(stack, omega, power_iters)
        # The small problem in float64: squaring B in float32 would lose the values below
        # about 3e-4 * s_1 (the square root of float32's epsilon).
        small = (q.transpose(1, 2) @ stack).double()  # (g, width, long)
        w, u_small = _descending_eigh(small @ small.transpose(1, 2), backend)
        s = w.sqrt()[:, :k]
        captured = small.pow(2).sum((1, 2))
        residual = (frob.pow(2) - captured).clamp_min(0).sqrt()
        if not adaptive or k + oversample >= short or bool((s[:, -1] <= eps * frob).all()):
            break
        k = min(2 * k, short)
        if k + oversample >= short or (stack.device.type == "cpu"
                                       and _CPU_EXACT_FRACTION * (k + oversample) >= short):
            s, _, u, v = _exact_group(stack.double(), return_vectors)
            return s, u, v, torch.zeros(g, dtype=torch.float64, device=stack.device)
    if not return_vectors:
        return s, None, None, residual
    u = q.double() @ u_small[:, :, :k]
    v = _right_vectors(stack.double(), u, s)
    return s, u, v, residual
