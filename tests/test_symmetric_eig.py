"""batched_eigh: every backend against numpy's float64 eigvalsh, plus eigenvector residuals.

On the CPU the Triton kernel runs in the interpreter (slow: a few thousand interpreted ops per
sweep), so CPU sizes stay small; batches of n = 64..128 matrices run only on a GPU.
"""
import numpy as np
import pytest
import torch

from lowrank_kernels import BackendUnavailableError
from lowrank_kernels.backends import available_backends
from lowrank_kernels.ops.symmetric_eig import batched_eigh

DTYPES = (torch.float32, torch.float64)
# Relative to ||A||_2 (eigenvalues), ||A||_F (residual) and 1 (orthogonality), by dtype.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
ON_GPU = torch.cuda.is_available()


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def random_symmetric(b, n, seed=0):
    x = torch.randn(b, n, n, dtype=torch.float64, generator=_generator(seed))
    return (x + x.mT) / 2


def with_spectrum(values, seed=0):
    """Q diag(values) Q^T for a random orthogonal Q: (b, n) values -> (b, n, n) matrices."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() == 1:
        values = values[None]
    b, n = values.shape
    q, _ = torch.linalg.qr(torch.randn(b, n, n, dtype=torch.float64, generator=_generator(seed)))
    a = q @ torch.diag_embed(values) @ q.mT
    return (a + a.mT) / 2


def check_decomposition(a, w, v, dtype, name=""):
    """w ascending and close to numpy's eigvalsh of ``a`` (its lower triangle); A V = V diag(w);
    V orthogonal. ``a`` is the float64 reference input, (b, n, n)."""
    tol = TOL[dtype]
    assert w.dtype == dtype and v.dtype == dtype, f"{name}: dtypes {w.dtype}, {v.dtype}"
    assert w.shape == a.shape[:-1] and v.shape == a.shape, f"{name}: shapes {w.shape}, {v.shape}"
    a64 = a.to(torch.float64).cpu()
    lower = torch.tril(a64)
    sym = lower + torch.tril(lower, -1).mT
    w64, v64 = w.double().cpu(), v.double().cpu()
    expected = torch.from_numpy(np.linalg.eigvalsh(sym.numpy()))
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    assert torch.all(w64[..., 1:] >= w64[..., :-1]), f"{name}: eigenvalues not ascending"
    err = ((w64 - expected).abs() / scale).max().item()
    assert err <= tol, f"{name}: eigenvalue error {err:.3g} (relative to ||A||_2) > {tol}"
    fro = torch.linalg.matrix_norm(sym).clamp_min(1e-300)
    residual = (torch.linalg.matrix_norm(sym @ v64 - v64 * w64[..., None, :]) / fro).max().item()
    assert residual <= tol, f"{name}: ||A V - V diag(w)|| / ||A|| = {residual:.3g} > {tol}"
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    orth = (v64.mT @ v64 - eye).abs().max().item()
    assert orth <= tol, f"{name}: max |V^T V - I| = {orth:.3g} > {tol}"


# ----------------------------------------------------------------------------------------------
# Accuracy on the required matrix families
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
def test_random_symmetric(backend, device, dtype, n):
    b = 2 if n <= 16 else 1
    a = random_symmetric(b, n, seed=n)
    w, v = batched_eigh(a.to(device, dtype), backend=backend)
    check_decomposition(a, w, v, dtype, f"{backend} n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_psd_gram_decaying_spectrum(backend, device, dtype):
    # B B^T of a (n, k) B with geometrically decaying column scales, k < n: rank deficient,
    # eigenvalues from 1 down to ~1e-10 and then exact zeros (the randomized-SVD case).
    n, k = 12, 9
    b = torch.randn(2, n, k, dtype=torch.float64, generator=_generator(1))
    b = b * torch.logspace(0, -5, k, dtype=torch.float64)
    a = b @ b.mT
    w, v = batched_eigh(a.to(device, dtype), backend=backend)
    check_decomposition(a, w, v, dtype, f"{backend} gram")
    assert w.min().item() >= -TOL[dtype] * w.max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_eigenvalues(backend, device, dtype):
    values = torch.tensor([[3.0, 1.0, 1.0, -2.0, 3.0, 1.0, 0.5, 3.0, -2.0, 1.0, 0.0]])
    a = with_spectrum(values, seed=2)
    w, v = batched_eigh(a.to(device, dtype), backend=backend)
    check_decomposition(a, w, v, dtype, f"{backend} repeated")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_diagonal_input(backend, device, dtype):
    diag = torch.tensor([2.5, -1.0, 0.0, 7.0, -4.0, 3.25, 1e-3], dtype=torch.float64)
    a = torch.diag(diag)[None]
    w, v = batched_eigh(a.to(device, dtype), backend=backend)
    check_decomposition(a, w, v, dtype, f"{backend} diagonal")
    torch.testing.assert_close(w[0].cpu(), diag.to(dtype).sort().values, rtol=0, atol=0)
    # eigenvectors are coordinate vectors (up to sign)
    ones = torch.ones(1, 7, dtype=torch.float64)
    torch.testing.assert_close(v.abs().sum(dim=-2).double().cpu(), ones)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_matrix(backend, device, dtype):
    a = torch.zeros(2, 5, 5, dtype=torch.float64)
    w, v = batched_eigh(a.to(device, dtype), backend=backend)
    assert torch.all(w == 0)
    check_decomposition(a, w, v, dtype, f"{backend} zero")


def test_odd_size_between_powers_of_two(backend, device):
    # n = 69: padded to an even order (70) and, in Triton, to a power of two (128); the padding must
    # not leak into the result. (70, 127 and 128 run in the GPU test below.)
    a = random_symmetric(1, 69, seed=69)
    w, v = batched_eigh(a.to(device, torch.float64), backend=backend)
    check_decomposition(a, w, v, torch.float64, f"{backend} n=69")


def test_only_lower_triangle_is_read(backend, device):
    a = random_symmetric(1, 7, seed=3)
    garbage = a + torch.triu(torch.randn(1, 7, 7, dtype=torch.float64, generator=_generator(4)), 1)
    w_ref, _ = torch.linalg.eigh(a)
    w, v = batched_eigh(garbage.to(device), backend=backend)
    check_decomposition(a, w.double(), v.double(), torch.float64, f"{backend} lower")
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_magnitudes_float32(backend, device, scale):
    # Squared norms of these would overflow / underflow in fp32 without the op's power-of-two
    # scaling.
    a = random_symmetric(1, 6, seed=5) * scale
    w, v = batched_eigh(a.to(device, torch.float32), backend=backend)
    check_decomposition(a, w, v, torch.float32, f"{backend} scale={scale}")


# ----------------------------------------------------------------------------------------------
# Shapes, batching, options
# ----------------------------------------------------------------------------------------------
def test_batch_equals_per_matrix(backend, device):
    a = random_symmetric(3, 6, seed=6).to(device, torch.float32)
    w, v = batched_eigh(a, backend=backend)
    for i in range(a.shape[0]):
        wi, vi = batched_eigh(a[i], backend=backend)
        assert wi.shape == (6,) and vi.shape == (6, 6)
        torch.testing.assert_close(wi, w[i], rtol=1e-6, atol=1e-6)
        # eigenvectors agree up to sign (the eigenvalues are distinct)
        sign = torch.sign((vi * v[i]).sum(dim=0))
        torch.testing.assert_close(vi * sign, v[i], rtol=1e-5, atol=1e-5)
        if backend != "torch":  # one program per matrix: identical bits
            assert torch.equal(wi, w[i]) and torch.equal(vi, v[i])


def test_unbatched_and_non_contiguous(backend, device):
    a = random_symmetric(1, 8, seed=7)[0]
    wide = torch.zeros(8, 16, dtype=torch.float64, device=device)
    wide[:, ::2] = a.to(device)
    strided = wide[:, ::2]  # a non-contiguous view
    assert not strided.is_contiguous()
    w, v = batched_eigh(strided, backend=backend)
    assert w.shape == (8,) and v.shape == (8, 8)
    check_decomposition(a[None], w[None], v[None], torch.float64, f"{backend} 2-D")


def test_empty_inputs(backend, device):
    for shape in [(0, 4, 4), (3, 0, 0), (0, 0)]:
        w, v = batched_eigh(torch.zeros(shape, device=device), backend=backend)
        assert w.shape == shape[:-1] and v.shape == shape and w.dtype == torch.float32


def test_sweeps_and_tol(backend, device):
    a = random_symmetric(1, 6, seed=8).to(device)
    w, v = batched_eigh(a, backend=backend, sweeps=30, tol=0.0)  # run every sweep
    check_decomposition(a.cpu(), w, v, torch.float64, f"{backend} tol=0")
    w1, v1 = batched_eigh(a, backend=backend, sweeps=1, tol=1e-3)
    # Any number of sweeps is an orthogonal similarity: orthogonal V, trace kept.
    eye = torch.eye(6, dtype=torch.float64, device=device)
    torch.testing.assert_close(v1.mT @ v1, eye[None], rtol=0, atol=1e-12)
    torch.testing.assert_close(w1.sum(), a.diagonal(dim1=-2, dim2=-1).sum(), rtol=1e-12, atol=1e-12)


def test_default_backend_matches_torch(device):
    a = random_symmetric(2, 7, seed=9).to(device)
    w, v = batched_eigh(a)
    check_decomposition(a.cpu(), w, v, torch.float64, "auto")


def test_multiple_row_tiles_triton(device):
    # The Triton kernel walks each round in tiles of rows; on the CPU it takes whole matrices, so
    # force small tiles here (n = 11: 12 rows padded to 16, tiles of 4 rows).
    if "triton" not in available_backends(device):
        pytest.skip("Triton backend unavailable here")
    from lowrank_kernels.kernels.triton import symmetric_eig as kernel

    a = random_symmetric(1, 11, seed=10)
    w, vt = kernel.launch_symmetric_eig(a.to(device, torch.float32).contiguous(), 15, 1e-7, rows=4)
    order = w.argsort(dim=-1)
    w = w.gather(1, order)
    v = vt.gather(1, order[..., None].expand_as(vt)).mT
    check_decomposition(a, w, v, torch.float32, "rows=4")


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4,), (2, 3, 4, 4), (3, 4), (2, 4, 5), ()])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"shape \(" + ", ".join(map(str, shape))):
        batched_eigh(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.int64, torch.bool,
                                   torch.float16, torch.bfloat16], ids=str)
def test_bad_dtypes(dtype):
    with pytest.raises(TypeError, match="complex|float32 and float64"):
        batched_eigh(torch.zeros(2, 3, 3, dtype=dtype))


def test_sparse_input():
    with pytest.raises(TypeError, match="dense"):
        batched_eigh(torch.eye(3).to_sparse())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises_when_checked(backend, device, bad):
    a = torch.eye(4, device=device).repeat(2, 1, 1)
    a[1, 2, 1] = bad
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        batched_eigh(a, backend=backend, check_finite=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_unchecked_gives_nan_on_kernel_backends(backend, device, bad):
    if backend == "torch":
        pytest.skip("the torch backend returns what torch.linalg.eigh returns")
    a = random_symmetric(3, 5, seed=4).to(device, torch.float32)
    a[1, 3, 0] = bad  # lower triangle: read by the kernels
    w, v = batched_eigh(a, backend=backend)
    assert torch.isnan(w[1]).all() and torch.isnan(v[1]).all()
    # The other matrices of the batch are unaffected.
    good = a[[0, 2]]
    check_decomposition(good.double().cpu(), w[[0, 2]], v[[0, 2]], torch.float32, backend)


class _HostSync(AssertionError):
    pass


def _forbid_host_syncs(monkeypatch):
    """Make every Python-level read of a tensor value (bool(), item()) fail."""
    def refuse(self, *args, **kwargs):
        raise _HostSync("a tensor value was read on the host (device sync)")

    for name in ("__bool__", "item"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_no_host_sync_by_default(backend, device, monkeypatch):
    a = random_symmetric(2, 6, seed=5).to(device, torch.float32)
    expected = batched_eigh(a, backend=backend)
    _forbid_host_syncs(monkeypatch)
    w, v = batched_eigh(a, backend=backend)
    with pytest.raises(_HostSync):  # the probe works: the opt-in check reads a value
        batched_eigh(a, backend=backend, check_finite=True)
    monkeypatch.undo()
    assert torch.equal(w, expected[0]) and torch.equal(v, expected[1])


def test_bad_options():
    a = torch.eye(3)
    for sweeps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="sweeps"):
            batched_eigh(a, sweeps=sweeps)
    for tol in (-1e-7, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol"):
            batched_eigh(a, tol=tol)
    with pytest.raises(ValueError, match="unknown backend"):
        batched_eigh(a, backend="numpy")


def test_cuda_backend_on_cpu_tensor_is_refused():
    with pytest.raises(BackendUnavailableError):
        batched_eigh(torch.eye(3), backend="cuda")


# ----------------------------------------------------------------------------------------------
# GPU only: the sizes the randomized SVD uses, and the kernels' size limits
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 70, 127, 128])
def test_gpu_batches_of_gram_matrices(backend, dtype, n):
    b = torch.randn(20, n, n + 8, dtype=torch.float64, generator=_generator(n))
    b = b * torch.logspace(0, -3, n + 8, dtype=torch.float64)
    a = b @ b.mT
    w, v = batched_eigh(a.to("cuda", dtype), backend=backend)
    check_decomposition(a, w, v, dtype, f"{backend} gpu n={n}")


@pytest.mark.gpu
def test_gpu_size_limits():
    from lowrank_kernels.ops.symmetric_eig import max_kernel_n

    for name in available_backends("cuda"):
        if name == "torch":
            continue
        limit = max_kernel_n(name, torch.float64, torch.device("cuda"))
        assert limit >= 128
        a = random_symmetric(1, limit + 2, seed=11).cuda()
        with pytest.raises(ValueError, match="takes matrices up to"):
            batched_eigh(a, backend=name)
    a = random_symmetric(1, 300, seed=11).cuda()
    w, v = batched_eigh(a)  # auto: falls back to a backend that takes it
    check_decomposition(a.cpu(), w, v, torch.float64, "auto n=300")


def test_launch_makes_the_matrices_device_current(monkeypatch):
    # Triton launches on the current device: matrices on another GPU need it switched.
    from lowrank_kernels.execution import on_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(on_device(torch.device("cuda", 0)), torch.cuda.device)
    assert not isinstance(on_device(torch.device("cpu")), torch.cuda.device)
