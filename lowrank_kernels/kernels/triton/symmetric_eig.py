"""Triton kernel of the batched symmetric eigensolver.

Semantics: lowrank_kernels/ops/symmetric_eig.py.

Parallel two-sided Jacobi, one program per matrix. The matrix is padded to an even order M
(one zero row/column when n is odd) and every round of a sweep applies M/2 disjoint rotations at
once, in round-robin ("tournament") order: in round r of a sweep, indices i and j < M-1 are paired
when i + j = 2r (mod M-1), the one left alone is paired with M-1, and after the M-1 rounds of a
sweep every pair has met once. With J the product of a round's rotations::

    A <- J^T A J,   V <- V J        (V^T is stored: its rows are the eigenvectors)

which, elementwise, reads four entries of A per output (rows i, pi(i); columns j, pi(j); pi is the
round's pairing). Since a round reads entries that other threads of the program write in the same
round, A and V^T live in a per-matrix scratch buffer in global memory, twice (ping-pong: a round
reads one copy and writes the other), with a ``tl.debug_barrier`` (__syncthreads) between rounds.
Each round first computes its M/2 rotations (vectorized over the indices, in fp64 whatever the
dtype) and writes them to a small scratch that the row tiles read back after a barrier, then walks
the matrix in tiles of rows, so registers hold a bounded tile whatever n. The rotation of a pair is
computed from the canonical (upper-triangle) entry A[min, max], so both members of a pair get
exactly the same (c, s); the pair's entries are then set to exactly zero and its diagonal to
a_pp - t a_pq, a_qq + t a_pq (the classical accurate update).

Padding is exact: a padded index (n <= i < M) has a zero row and column, so every rotation that
involves it has a_pq = 0, which is the identity (c = 1, s = 0); its row/column stay zero and the
n x n leading block evolves exactly as if the padding were not there. Lanes M <= i < P (the
power-of-two tile width) are masked out of every access to A and V. Nothing padded is written out.

Arithmetic is in the input's dtype (float32 or float64), rotation angles in fp64. Sweeps stop when
the off-diagonal Frobenius norm is <= tol * ||A||_F (checked before each sweep) or after
``max_sweeps``. Eigenvalues come out unsorted (the op sorts them). Works on a CUDA device and, with
TRITON_INTERPRET=1, on the CPU. Scratch per matrix: 4 P^2 + 3 P elements and P int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FP_FUSION

# Elements per (rows x P) tile a program holds in registers per load on a GPU: 16 registers a
# thread per tile at 4 warps, whatever the dtype. The interpreter takes whole matrices (fewer ops).
TILE_ELEMENTS = {torch.float32: 2048, torch.float64: 1024}
NUM_WARPS = 4
MAX_N = 256

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _off_diagonal_sq(x_ptr, M, P: tl.constexpr, R: tl.constexpr, DTYPE: tl.constexpr):
    cols = tl.arange(0, P)
    acc = tl.zeros([R, P], DTYPE)
    for rb in range(0, M, R):
        rows = rb + tl.arange(0, R)
        mask = (rows[:, None] < M) & (cols[None, :] < M)
        x = tl.load(x_ptr + rows[:, None] * P + cols[None, :], mask=mask, other=0.0)
        acc += tl.where(rows[:, None] != cols[None, :], x * x, 0.0)
    return tl.sum(tl.sum(acc, axis=1), axis=0)


# n, M and max_sweeps are loop and mask bounds: specialising them on divisibility by 16 or on the
# value 1 would only multiply the compiled kernels (P carries the shape that matters).
@triton.jit(do_not_specialize=["n", "M", "max_sweeps"])
def _symmetric_eig_kernel(
    a_ptr, w_ptr, vt_ptr, scratch_a, scratch_v, scratch_p, scratch_i,
    n, M, max_sweeps, tol_sq,
    P: tl.constexpr, R: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    a_ptr += pid * n * n
    w_ptr += pid * n
    vt_ptr += pid * n * n
    PP = P * P  # constexpr arithmetic
    sa = scratch_a + pid * 2 * PP  # two copies of A (ping-pong)
    sv = scratch_v + pid * 2 * PP  # two copies of V^T
    sp = scratch_p + pid * 3 * P   # a round's c, sigma, delta per index
    si = scratch_i + pid * P       # a round's partner per index, as a row offset partner * P
    cols = tl.arange(0, P)
    col_ok = cols < M
    ar = tl.arange(0, R)
    cols_p = (cols * P)[None, :]

    # Copy A (its lower triangle, mirrored: like torch.linalg.eigh, the upper one is never read)
    # into scratch copy 0 with zero padding, set V^T = I, and take ||A||_F^2 and off(A)^2.
    fro = tl.zeros([R, P], DTYPE)
    off = tl.zeros([R, P], DTYPE)
    for rb in range(0, M, R):
        rows = rb + ar
        inside = (rows[:, None] < n) & (cols[None, :] < n)
        lower = (tl.maximum(rows[:, None], cols[None, :]) * n
                 + tl.minimum(rows[:, None], cols[None, :]))
        x = tl.load(a_ptr + lower, mask=inside, other=0.0).to(DTYPE)
        keep = (rows[:, None] < M) & col_ok[None, :]
        offsets = rows[:, None] * P + cols[None, :]
        tl.store(sa + offsets, x, mask=keep)
        eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0).to(DTYPE)
        tl.store(sv + offsets, eye, mask=keep)
        fro += x * x
        off += tl.where(rows[:, None] != cols[None, :], x * x, 0.0)
    fro_sq = tl.sum(tl.sum(fro, axis=1), axis=0)
    off_sq = tl.sum(tl.sum(off, axis=1), axis=0)
    threshold = fro_sq * tol_sq
    tl.debug_barrier()

    m = M - 1
    cur = tl.program_id(0) * 0  # which scratch copy holds the current A and V^T (int32 0)
    sweep = tl.program_id(0) * 0
    while (sweep < max_sweeps) & (off_sq > threshold):
        for r in range(0, m):
            src_a = sa + cur * PP
            dst_a = sa + (1 - cur) * PP
            src_v = sv + cur * PP
            dst_v = sv + (1 - cur) * PP
            # The round's pairing: i + j = 2r (mod m) for i, j < m, the index left alone pairs with
            # m. Lanes >= M pair with themselves (identity).
            jj = tl.where(col_ok, cols, 0)
            other = (2 * r - jj + m) % m  # non-negative: r >= 0 and jj <= m
            pj = tl.where(jj == m, r, tl.where(other == jj, m, other))
            pj = tl.where(col_ok, pj, cols)
            lo = tl.minimum(cols, pj)
            hi = tl.maximum(cols, pj)
            # Rotation of each pair (p, q) = (lo, hi), from the upper-triangle entry: both members
            # compute identical values. Golub & Van Loan's symmetric Schur 2x2, in fp64 for both
            # dtypes (IEEE-rounded division and sqrt, a handful of values a round):
            # [[c, s], [-s, c]] diagonalizes [[app, apq], [apq, aqq]]. |apq| <= 1e-150 is taken
            # as zero (identity rotation; the entry is then cleared): the op scales A to entries
            # <= 1, so |aqq - app| <= 2n and tau^2 cannot overflow.
            app = tl.load(src_a + lo * (P + 1), mask=col_ok, other=0.0).to(tl.float64)
            aqq = tl.load(src_a + hi * (P + 1), mask=col_ok, other=0.0).to(tl.float64)
            apq = tl.load(src_a + lo * P + hi, mask=col_ok, other=0.0).to(tl.float64)
            nonzero = tl.abs(apq) > 1e-150
            tau = (aqq - app) / (2.0 * tl.where(nonzero, apq, 1.0))
            t = 1.0 / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
            t = tl.where(nonzero, tl.where(tau < 0.0, -t, t), 0.0)
            c64 = 1.0 / tl.sqrt(1.0 + t * t)
            first = cols < pj  # this index is p of its pair
            cj = c64.to(DTYPE)
            sj = tl.where(first, -(t * c64), t * c64).to(DTYPE)
            dj = tl.where(first, -(t * apq), t * apq).to(DTYPE)
            # Rows need the same values in a row layout: through a small scratch.
            tl.store(sp + cols, cj)
            tl.store(sp + P + cols, sj)
            tl.store(sp + 2 * P + cols, dj)
            tl.store(si + cols, pj * P)
            tl.debug_barrier()
            cj = cj[None, :]
            sj = sj[None, :]
            pj = pj[None, :]
            for rb in range(0, M, R):
                rows = rb + ar
                row_ok = rows < M
                ci = tl.load(sp + rows, mask=row_ok, other=1.0)[:, None]
                sg = tl.load(sp + P + rows, mask=row_ok, other=0.0)[:, None]
                di = tl.load(sp + 2 * P + rows, mask=row_ok, other=0.0)[:, None]
                pi_off = tl.load(si + rows, mask=row_ok, other=0)[:, None]
                i_off = (rows * P)[:, None]
                mask = row_ok[:, None] & col_ok[None, :]
                ij = i_off + cols[None, :]
                pij = pi_off + cols[None, :]
                # B = A J on rows i and pi(i), then the rows of J^T B.
                a_ij = tl.load(src_a + ij, mask=mask, other=0.0)
                a_ipj = tl.load(src_a + i_off + pj, mask=mask, other=0.0)
                a_pij = tl.load(src_a + pij, mask=mask, other=0.0)
                a_pipj = tl.load(src_a + pi_off + pj, mask=mask, other=0.0)
                new = ci * (cj * a_ij + sj * a_ipj) + sg * (cj * a_pij + sj * a_pipj)
                new = tl.where(ij == (P + 1) * rows[:, None], a_ij + di, new)  # diagonal
                new = tl.where(pi_off == cols_p, 0.0, new)  # the pair's entry (i, pi(i))
                tl.store(dst_a + ij, new, mask=mask)
                # V <- V J, i.e. rows of V^T: vt[i] <- c_i vt[i] + sigma_i vt[pi(i)].
                v_i = tl.load(src_v + ij, mask=mask, other=0.0)
                v_pi = tl.load(src_v + pij, mask=mask, other=0.0)
                tl.store(dst_v + ij, ci * v_i + sg * v_pi, mask=mask)
            tl.debug_barrier()  # the next round reads what other threads just wrote
            cur = 1 - cur
        off_sq = _off_diagonal_sq(sa + cur * PP, M, P, R, DTYPE)
        sweep += 1

    # Eigenvalues (unsorted) and V^T, the n x n leading block.
    src_a = sa + cur * PP
    src_v = sv + cur * PP
    tl.store(w_ptr + cols, tl.load(src_a + cols * (P + 1), mask=cols < n, other=0.0), mask=cols < n)
    for rb in range(0, n, R):
        rows = rb + ar
        inside = (rows[:, None] < n) & (cols[None, :] < n)
        v = tl.load(src_v + rows[:, None] * P + cols[None, :], mask=inside, other=0.0)
        tl.store(vt_ptr + rows[:, None] * n + cols[None, :], v, mask=inside)


def max_n(dtype: torch.dtype, device: torch.device) -> int:
    """Largest matrix order this kernel takes (any dtype, any device): tiles stay bounded, but the
    number of rounds grows with n and the scratch with P^2."""
    return MAX_N


def _tile(a: torch.Tensor, n: int, rows: int | None) -> tuple[int, int, int]:
    """(M, P, R): even order, padded power-of-two width, rows per tile."""
    m_even = n + (n & 1)
    p = triton.next_power_of_2(max(m_even, 2))
    if rows is None:
        rows = p if a.device.type == "cpu" else TILE_ELEMENTS[a.dtype] // p
    rows = triton.next_power_of_2(max(1, rows))
    return m_even, p, min(p, rows)


def launch_arguments(a: torch.Tensor, max_sweeps: int, tol: float, rows: int | None = None):
    """(positional args, keywords, outputs) of one launch: the one place where the op's arguments
    become the kernel's, shared by the launcher and the ahead-of-time check."""
    b, n, _ = a.shape
    m_even, p, r = _tile(a, n, rows)
    w = torch.empty((b, n), dtype=a.dtype, device=a.device)
    vt = torch.empty((b, n, n), dtype=a.dtype, device=a.device)
    scratch_a = torch.empty((b, 2, p, p), dtype=a.dtype, device=a.device)
    scratch_v = torch.empty_like(scratch_a)
    scratch_p = torch.empty((b, 3, p), dtype=a.dtype, device=a.device)
    scratch_i = torch.empty((b, p), dtype=torch.int32, device=a.device)
    args = (a, w, vt, scratch_a, scratch_v, scratch_p, scratch_i,
            n, m_even, max_sweeps, tol * tol)
    kwargs = dict(P=p, R=r, DTYPE=_TL_DTYPE[a.dtype], num_warps=NUM_WARPS, num_stages=1,
                  enable_fp_fusion=FP_FUSION)
    return args, kwargs, (w, vt)


def launch_symmetric_eig(a: torch.Tensor, max_sweeps: int, tol: float, rows: int | None = None):
    """Eigen-decompose each matrix of ``a`` (b, n, n), contiguous, float32/float64.

    Returns (w, vt): unsorted eigenvalues (b, n) and V^T (b, n, n), rows the eigenvectors.
    ``rows`` overrides the rows per tile (a power of two; tests use it to cover several tiles).
    """
    args, kwargs, outputs = launch_arguments(a, max_sweeps, tol, rows)
    _symmetric_eig_kernel[(a.shape[0],)](*args, **kwargs)
    return outputs


def aot_variants():
    """Every kernel the launcher can emit on a GPU: one per (dtype, padded width P) for
    n = 2 .. MAX_N, as (name, args, kwargs) of real launches built by ``launch_arguments`` on small
    CPU stand-ins; the rows per tile are the GPU's (``TILE_ELEMENTS``), not the interpreter's."""
    for dtype in _TL_DTYPE:
        p = 2
        while p <= MAX_N:
            a = torch.zeros((1, p, p), dtype=dtype)
            rows = TILE_ELEMENTS[dtype] // p
            args, kwargs, _ = launch_arguments(a, 15, 1e-7, rows)
            yield f"{str(dtype).removeprefix('torch.')}-P{p}-R{kwargs['R']}", args, kwargs
            p *= 2
