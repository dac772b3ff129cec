"""Batched symmetric eigensolver for many small matrices: ``batched_eigh``.

Same results and conventions as ``torch.linalg.eigh`` (eigenvalues ascending, eigenvectors as the
columns of V with A V = V diag(w), only the lower triangle of A is read), but the kernel backends
decompose every matrix of the batch at once: on CUDA, torch.linalg.eigh loops over the batch for
matrices above 32 x 32, which is what the randomized SVD of many layers needs for its small
l x l Gram matrices B B^T.

Backends:

* ``torch``: ``torch.linalg.eigh``.
* ``triton`` / ``cuda``: parallel (round-robin "tournament" ordering) two-sided Jacobi, one
  program / thread block per matrix, n/2 disjoint rotations applied at once per round, the
  eigenvectors accumulated alongside. Sweeps stop when the off-diagonal Frobenius norm is
  <= ``tol * ||A||_F`` (checked before each sweep) or after ``sweeps`` sweeps; the eigenpairs are
  then sorted ascending. Arithmetic is in the input's dtype: float32 in fp32, float64 in fp64
  (CUDA ``double``, Triton ``tl.float64``). Each matrix is first scaled by a power of two so
  that its largest entry lies in [0.5, 1): no overflow or underflow in the norms, whatever the
  input's magnitude (the eigenvalues are scaled back).

Sizes: the Triton kernel takes n <= 256; the CUDA kernel keeps A in shared memory (n_even^2
elements, n_even = n rounded up to even) and V in global memory, so n is bounded by the GPU's
shared memory per block (opt-in limit: 227 KiB on an H100, n <= 238 in float32 and n <= 168 in
float64; 163 KiB on an A100; about 99 KiB on consumer sm_86/sm_89 parts, where float64 stops at
n = 110). With ``backend="auto"`` a size a kernel cannot take falls back to the next
backend of ``backends.AUTO_ORDER["symmetric_eig"]`` (eventually torch); an explicit backend
raises ValueError.

Non-finite input: ``check_finite=True`` raises ValueError for NaN or Inf in A, at the price of
one device-to-host sync per call. By default nothing is checked on the host; the kernel backends
then return NaN eigenvalues and eigenvectors for every matrix that holds a NaN or Inf (decided on
the device from the per-matrix scaling pass they make anyway), and the torch backend does what
``torch.linalg.eigh`` does.

Jacobi converges quadratically: with the default tolerances, random matrices need about 6 sweeps
at n = 32 and 8-9 at n = 128. ``sweeps`` bounds the work for hard cases (e.g. clustered spectra);
results are then less accurate but still an orthogonal similarity of A. The kernel backends have
no backward (their outputs do not require grad); use backend="torch" to differentiate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import auto_candidates, kernel_module, resolve_backend
from ..execution import on_device

DTYPES = (torch.float32, torch.float64)
DEFAULT_TOL = {torch.float32: 1e-7, torch.float64: 1e-14}
DEFAULT_SWEEPS = 15

def batched_eigh(A: Tensor, *, backend: str | None = "auto", sweeps: int | None = None,
                 tol: float | None = None, check_finite: bool = False) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of each real symmetric matrix in ``A``.

    ``A`` is (b, n, n) or (n, n), float32 or float64; only its lower triangle is read. Returns
    ``(w, V)`` of shapes (b, n) and (b, n, n) (unbatched for a 2-D input) in A's dtype, with
    ``A @ V = V @ diag(w)``, like ``torch.linalg.eigh``. ``sweeps`` (default 15) and ``tol``
    (default 1e-7 for float32, 1e-14 for float64: stop once the off-diagonal norm is
    <= tol * ||A||_F) control the Jacobi kernels; the torch backend ignores them.
    ``check_finite=True`` raises ValueError for NaN/Inf in ``A`` (one host sync); without it a
    kernel backend returns NaN for such a matrix (see the module docstring).
    """
    _check_input(A)
    max_sweeps = _check_sweeps(sweeps)
    tolerance = _check_tol(tol, A.dtype)
    batched = A.dim() == 3
    a = A if batched else A.unsqueeze(0)
    b, n = a.shape[0], a.shape[-1]
    if b == 0 or n == 0:
        w, v = a.new_empty((b, n)), a.new_empty((b, n, n))
        return (w, v) if batched else (w[0], v[0])
    if check_finite and not bool(torch.isfinite(a).all()):
        raise ValueError(f"batched_eigh: the input of shape {tuple(A.shape)} contains NaN or Inf")

    name = _choose_backend(backend, a)
    if name == "torch":
        w, v = torch.linalg.eigh(a)
    else:
        w, v = _kernel_eigh(name, a, max_sweeps, tolerance)
    return (w, v) if batched else (w[0], v[0])


def _check_input(A) -> None:
    if not isinstance(A, Tensor):
        raise TypeError(f"batched_eigh expects a torch.Tensor, got {type(A).__name__}")
    if A.layout != torch.strided:
        raise TypeError(f"batched_eigh supports dense (strided) tensors, got layout {A.layout}")
    if A.is_complex():
        raise TypeError(f"batched_eigh supports real symmetric matrices, got complex dtype "
                        f"{A.dtype}")
    if A.dtype not in DTYPES:
        raise TypeError(f"batched_eigh supports float32 and float64 inputs, got {A.dtype}")
    if A.dim() not in (2, 3) or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"batched_eigh expects square matrices of shape (b, n, n) or (n, n), "
                         f"got shape {tuple(A.shape)}")


def _check_sweeps(sweeps) -> int:
    if sweeps is None:
        return DEFAULT_SWEEPS
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ValueError(f"sweeps must be a positive integer, got {sweeps!r}")
    return sweeps


def _check_tol(tol, dtype) -> float:
    if tol is None:
        return DEFAULT_TOL[dtype]
    tol = float(tol)
    if not (0.0 <= tol < float("inf")):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return tol


def max_kernel_n(backend: str, dtype: torch.dtype, device: torch.device) -> int:
    """The largest n the ``backend`` kernel takes for ``dtype`` on ``device``."""
    if backend == "torch":
        return 2**31 - 1
    return kernel_module("symmetric_eig", backend).max_n(dtype, device)


def _choose_backend(backend, a: Tensor) -> str:
    name = resolve_backend(backend, a.device, op="symmetric_eig", variant=a.dtype)
    if name == "torch":
        return name
    n = a.shape[-1]
    limit = max_kernel_n(name, a.dtype, a.device)
    if n <= limit:
        return name
    if backend not in (None, "auto"):
        raise ValueError(f"batched_eigh: backend {name!r} takes matrices up to n = {limit} for "
                         f"{a.dtype} on this device, got n = {n}; use backend='torch'")
    # "auto" (or LOWRANK_BACKEND): the next backend of the order whose kernel takes this n.
    candidates = auto_candidates(a.device, "symmetric_eig", a.dtype)
    following = candidates[candidates.index(name) + 1:] if name in candidates else ["torch"]
    return next(c for c in following if n <= max_kernel_n(c, a.dtype, a.device))


def _kernel_eigh(name: str, a: Tensor, max_sweeps: int, tol: float) -> tuple[Tensor, Tensor]:
    a = a.detach()  # the kernels have no backward
    # Power-of-two scaling per matrix, so that the largest |entry| lies in [0.5, 1): no overflow or
    # underflow in the kernels' squared norms. The exponent is clamped so both factors are normal
    # numbers (a zero matrix keeps exponent 0); the factors are computed in A's dtype.
    amax = torch.tril(a).abs().amax(dim=(-2, -1))  # the lower triangle, the only part read
    _, exponent = torch.frexp(amax)
    limit = 126 if a.dtype == torch.float32 else 1022
    exponent = exponent.clamp(-limit, limit).to(a.dtype)
    scaled = (a * torch.pow(2.0, -exponent)[:, None, None]).contiguous()
    w, vt = _symmetric_eig_op(scaled, max_sweeps, tol, name)
    w = w * torch.pow(2.0, exponent)[:, None]
    # NaN propagates through amax (and Inf stays Inf): such a matrix gets NaN results, decided
    # on the device without a host sync.
    bad = ~torch.isfinite(amax)
    w = torch.where(bad[:, None], torch.nan, w)
    vt = torch.where(bad[:, None, None], torch.nan, vt)
    w, order = torch.sort(w, dim=-1)
    vt = torch.gather(vt, 1, order[:, :, None].expand_as(vt))
    # V^T is contiguous, so V has torch.linalg.eigh's column-major layout.
    return w, vt.mT


# The Jacobi kernel as a torch.library op: (b, n, n) contiguous, scaled to entries <= 1 ->
# unsorted eigenvalues (b, n) and V^T (b, n, n), both new contiguous tensors. One opaque node
# for torch.compile (the scaling and sorting around it are plain torch ops), with a fake
# implementation for tracing. The torch backend is torch.linalg.eigh itself, differentiable, and
# needs no op of its own.
@torch.library.custom_op("lowrank_kernels::symmetric_eig", mutates_args=())
def _symmetric_eig_op(a: Tensor, max_sweeps: int, tol: float,
                      backend: str) -> tuple[Tensor, Tensor]:
    with on_device(a.device):
        return kernel_module("symmetric_eig", backend).launch_symmetric_eig(a, max_sweeps, tol)


@_symmetric_eig_op.register_fake
def _symmetric_eig_fake(a, max_sweeps, tol, backend):
    b, n, _ = a.shape
    return a.new_empty((b, n)), a.new_empty((b, n, n))
