"""decay_outer_: W <- decay * W + alpha * D^T F, in place.

* every backend that runs here (torch; Triton through its interpreter on the CPU; plus CUDA C++
  on a GPU) against a float64 NumPy reference, over shapes that are 1 x 1, not multiples of any
  tile, K = 1 and K in the hundreds, decay 0 and 1, alpha 0, float32 and bfloat16;
* special values as torch.addmm_ (decay = 0 ignores W, alpha = 0 ignores D and F), views with
  storage offsets, non-contiguous D and F, empty W;
* bad inputs: each gets a clear error;
* autograd: rejected in grad mode, allowed under no_grad, version counter bumped;
* GPU only: large shapes, the CUDA kernels' vectorized and unaligned paths, TF32.
"""
import math

import numpy as np
import pytest
import torch

from helpers import assert_close_verbose
from lowrank_kernels import BackendUnavailableError, decay_outer_
from lowrank_kernels.backends import available_backends

DTYPES = [torch.float32, torch.bfloat16]
ON_GPU = torch.cuda.is_available()


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def interpreter_truncates_bf16(backend, device, dtype):
    """Triton's CPU interpreter converts fp32 to bf16 by truncation where a GPU rounds to
    nearest even: up to one ulp instead of half an ulp."""
    return backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16


def make_inputs(m, n, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen)
    D = torch.randn(k, m, generator=gen)
    F = torch.randn(k, n, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (W, D, F))


def reference(W, D, F, decay, alpha):
    """float64 NumPy result and the elementwise error scale |decay||W| + |alpha||D|^T|F|, from
    the inputs' stored values; decay = 0 ignores W and alpha = 0 ignores D, F (BLAS)."""
    w, d, f = (t.detach().double().cpu().numpy() for t in (W, D, F))
    out = np.zeros_like(w)
    scale = np.zeros_like(w)
    if decay != 0:
        out += decay * w
        scale += abs(decay) * np.abs(w)
    if alpha != 0:
        out += alpha * np.einsum("km,kn->mn", d, f)
        scale += abs(alpha) * np.einsum("km,kn->mn", np.abs(d), np.abs(f))
    return torch.from_numpy(out), torch.from_numpy(scale)


def assert_matches_reference(out, W0, D, F, decay, alpha, backend, device):
    """Error bound of an fp32-accumulated dot product of K terms, (K + 3) u * scale (u = 2^-24),
    plus, for bfloat16, the final rounding: half an ulp (2^-8 relative) or a whole one where the
    interpreter truncates. An indexing mistake is off by O(scale)."""
    expected, scale = reference(W0, D, F, decay, alpha)
    k = D.shape[0]
    accumulation = 2 * (k + 3) * 2.0**-24 * scale
    if out.dtype == torch.bfloat16:
        rounding = 2.0**-7 if interpreter_truncates_bf16(backend, device, out.dtype) else 2.0**-8
        tol = 1.05 * rounding * expected.abs() + accumulation
    else:
        tol = accumulation
    actual = out.detach().double().cpu()
    bad = (actual - expected).abs() > tol + 1e-30
    bad |= torch.isnan(actual) != torch.isnan(expected)
    if bad.any():
        # Defer to the verbose helper for a message naming the offending indices.
        assert_close_verbose(actual, expected, rtol=0.0, atol=float((tol * bad).max()) * 0.999,
                             name=f"decay_outer_[{backend}] {dtype_id(out.dtype)} K={k}")


# (m, n, K): 1 x 1; single rows/columns; not multiples of the tiles (interpreter 32, GPU 64-256);
# several tiles in both directions; K = 1, K below and above one K chunk, K = 300.
SHAPES = [
    (1, 1, 1),
    (1, 9, 3),
    (7, 1, 2),
    (33, 47, 5),
    (64, 64, 16),
    (65, 40, 1),
    (40, 70, 33),
    (17, 33, 300),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(backend, device, dtype, shape):
    m, n, k = shape
    W, D, F = make_inputs(m, n, k, dtype, device)
    W0 = W.clone()
    out = decay_outer_(W, D, F, 0.9, -0.3, backend=backend)
    assert out is W
    assert_matches_reference(W, W0, D, F, 0.9, -0.3, backend, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("decay, alpha", [(0.0, 1.0), (1.0, 0.0), (1.0, -0.5), (0.0, 0.0),
                                          (-2.0, 3)],
                         ids=["decay0", "alpha0", "decay1", "both0", "negative-decay-int-alpha"])
def test_special_scalars(backend, device, dtype, decay, alpha):
    W, D, F = make_inputs(37, 35, 6, dtype, device, seed=1)
    W0 = W.clone()
    decay_outer_(W, D, F, decay, alpha, backend=backend)
    assert_matches_reference(W, W0, D, F, decay, alpha, backend, device)
    if decay == 1.0 and alpha == 0.0:
        assert torch.equal(W, W0)


def test_decay_zero_ignores_nan_in_w(backend, device):
    W, D, F = make_inputs(20, 36, 3, torch.float32, device, seed=2)
    W[3, 4] = float("nan")
    W[0, 0] = float("inf")
    W0 = W.clone()
    decay_outer_(W, D, F, 0.0, 2.0, backend=backend)
    assert torch.isfinite(W).all()
    assert_matches_reference(W, W0, D, F, 0.0, 2.0, backend, device)


def test_alpha_zero_ignores_nan_in_factors(backend, device):
    W, D, F = make_inputs(20, 36, 3, torch.float32, device, seed=3)
    D[1, 2] = float("nan")
    F[0, 5] = float("-inf")
    W0 = W.clone()
    decay_outer_(W, D, F, 0.5, 0.0, backend=backend)
    assert_close_verbose(W, 0.5 * W0, rtol=0, atol=0)


def test_nan_in_factors_propagates_without_check(backend, device):
    W, D, F = make_inputs(20, 36, 3, torch.float32, device, seed=4)
    D[1, 2] = float("nan")
    decay_outer_(W, D, F, 0.5, 1.0, backend=backend)
    assert torch.isnan(W[2]).all() and torch.isfinite(W[:2]).all() and torch.isfinite(W[3:]).all()


def test_views_with_storage_offsets(backend, device):
    """W a contiguous slice of a larger buffer (only it changes), D and F at odd offsets."""
    m, n, k = 34, 37, 9
    buffer = torch.randn(m + 3, n, device=device)
    untouched = buffer.clone()
    W = buffer[1:m + 1]
    assert W.is_contiguous() and W.storage_offset() == n
    storage = torch.randn(k * (m + n) + 3, device=device)
    D = storage[1:1 + k * m].view(k, m)
    F = storage[2 + k * m:2 + k * m + k * n].view(k, n)
    W0 = W.clone()
    decay_outer_(W, D, F, 0.75, 0.25, backend=backend)
    assert_matches_reference(W, W0, D, F, 0.75, 0.25, backend, device)
    assert torch.equal(buffer[0], untouched[0]) and torch.equal(buffer[m + 1:], untouched[m + 1:])


def test_non_contiguous_factors(backend, device):
    """D and F given as transposes of (m, K) and (n, K) tensors, as autograd hooks produce."""
    m, n, k = 33, 20, 7
    W, _, _ = make_inputs(m, n, k, torch.float32, device, seed=5)
    D = torch.randn(m, k, device=device).t()
    F = torch.randn(n, k, device=device).t()
    assert not D.is_contiguous() and not F.is_contiguous()
    W0 = W.clone()
    decay_outer_(W, D, F, 0.9, -1.0, backend=backend)
    assert_matches_reference(W, W0, D, F, 0.9, -1.0, backend, device)


@pytest.mark.parametrize("shape", [(0, 5, 2), (4, 0, 2), (0, 0, 1)])
def test_empty_w(backend, device, shape):
    m, n, k = shape
    W, D, F = make_inputs(m, n, k, torch.float32, device)
    assert decay_outer_(W, D, F, 0.5, 1.0, backend=backend) is W


def test_backends_agree_with_each_other(device):
    backends = available_backends(device)
    W, D, F = make_inputs(45, 38, 21, torch.float32, device, seed=6)
    results = {b: decay_outer_(W.clone(), D, F, 0.99, -0.1, backend=b) for b in backends}
    for b, r in results.items():
        assert_close_verbose(r, results["torch"], rtol=1e-5, atol=1e-5, name=f"{b} vs torch")


def test_auto_backend_runs(device):
    W, D, F = make_inputs(9, 10, 4, torch.float32, device)
    W0 = W.clone()
    decay_outer_(W, D, F, 0.9, -0.3)
    assert_matches_reference(W, W0, D, F, 0.9, -0.3, "auto", device)


def test_numpy_scalars_accepted(device):
    W, D, F = make_inputs(5, 6, 2, torch.float32, device)
    W0 = W.clone()
    decay_outer_(W, D, F, np.float32(0.5), np.float64(-1.0), backend="torch")
    assert_matches_reference(W, W0, D, F, 0.5, -1.0, "torch", device)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["W", "D", "F"])
def test_requires_grad_in_grad_mode_is_an_error(backend, device, which):
    tensors = dict(zip("WDF", make_inputs(6, 5, 3, torch.float32, device)))
    tensors[which].requires_grad_(True)
    with pytest.raises(RuntimeError, match=rf"{which} requires grad.*torch\.no_grad"):
        decay_outer_(tensors["W"], tensors["D"], tensors["F"], 0.9, 1.0, backend=backend)


def test_parameter_under_no_grad_like_an_optimizer(backend, device):
    W, D, F = make_inputs(12, 7, 3, torch.float32, device, seed=7)
    param = torch.nn.Parameter(W.clone())
    version = param._version
    with torch.no_grad():
        out = decay_outer_(param, D, F, 0.9, -0.5, backend=backend)
    assert out is param and param.is_leaf and param.requires_grad and param.grad_fn is None
    assert param._version > version
    assert_matches_reference(param, W, D, F, 0.9, -0.5, backend, device)


def test_overwriting_a_saved_weight_is_detected_by_autograd(backend, device):
    W, D, F = make_inputs(6, 5, 3, torch.float32, device, seed=8)
    param = torch.nn.Parameter(W.clone())
    x = torch.randn(4, 6, device=device, requires_grad=True)
    loss = (x @ param).square().sum()  # saves param for x's gradient
    with torch.no_grad():
        decay_outer_(param, D, F, 0.9, -0.5, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def _good(device, dtype=torch.float32):
    return make_inputs(6, 5, 3, dtype, device)


@pytest.mark.parametrize("shapes", [
    ((6, 5), (3, 7), (3, 5)),     # D columns != m
    ((6, 5), (3, 6), (3, 4)),     # F columns != n
    ((6, 5), (3, 6), (2, 5)),     # K differs
], ids=["D-cols", "F-cols", "K"])
def test_shape_mismatch(backend, device, shapes):
    W, D, F = (torch.zeros(s, device=device) for s in shapes)
    with pytest.raises(ValueError, match="shapes do not match"):
        decay_outer_(W, D, F, 1.0, 1.0, backend=backend)


@pytest.mark.parametrize("which, shape", [("W", (6,)), ("D", (3, 6, 1)), ("F", ())])
def test_not_2d(device, which, shape):
    tensors = dict(zip("WDF", _good(device)))
    tensors[which] = torch.zeros(shape, device=device)
    with pytest.raises(ValueError, match=f"{which} must be 2-D"):
        decay_outer_(tensors["W"], tensors["D"], tensors["F"], 1.0, 1.0)


def test_k_zero(backend, device):
    W = torch.zeros(6, 5, device=device)
    with pytest.raises(ValueError, match="K = 0"):
        decay_outer_(W, torch.zeros(0, 6, device=device), torch.zeros(0, 5, device=device), 1.0,
                     1.0, backend=backend)


def test_dtype_mismatch(backend, device):
    W, D, F = _good(device)
    with pytest.raises(ValueError, match="share one dtype"):
        decay_outer_(W, D.bfloat16(), F, 1.0, 1.0, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32, torch.int64],
                         ids=dtype_id)
def test_unsupported_dtype(backend, device, dtype):
    W, D, F = (t.to(dtype) for t in _good(device))
    with pytest.raises(ValueError, match=f"dtype {dtype}; supported: float32, bfloat16"):
        decay_outer_(W, D, F, 1.0, 1.0, backend=backend)


def test_complex(device):
    W, D, F = _good(device)
    with pytest.raises(ValueError, match="complex"):
        decay_outer_(W.to(torch.complex64), D, F, 1.0, 1.0)


def test_sparse(device):
    W, D, F = _good(device)
    with pytest.raises(ValueError, match="dense"):
        decay_outer_(W, D.to_sparse(), F, 1.0, 1.0)


def test_not_a_tensor(device):
    W, D, F = _good(device)
    with pytest.raises(TypeError, match="F must be a torch.Tensor, got ndarray"):
        decay_outer_(W, D, F.cpu().numpy(), 1.0, 1.0)


def test_mixed_devices(device):
    W, D, F = _good(device)
    with pytest.raises(ValueError, match="one device"):
        decay_outer_(W, D.to("meta"), F, 1.0, 1.0)


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_meta_tensors_with_a_kernel_backend(backend_name):
    W, D, F = (torch.zeros(s, device="meta") for s in ((6, 5), (3, 6), (3, 5)))
    with pytest.raises(BackendUnavailableError, match="meta"):
        decay_outer_(W, D, F, 1.0, 1.0, backend=backend_name)


def test_meta_tensors_with_torch_propagate_shapes():
    W, D, F = (torch.zeros(s, device="meta") for s in ((6, 5), (3, 6), (3, 5)))
    assert decay_outer_(W, D, F, 1.0, 1.0, backend="torch", check_finite=True) is W


def test_cuda_backend_on_cpu_tensors_is_an_error():
    W, D, F = _good("cpu")
    with pytest.raises(BackendUnavailableError, match="CUDA device"):
        decay_outer_(W, D, F, 1.0, 1.0, backend="cuda")


def test_unknown_backend(device):
    W, D, F = _good(device)
    with pytest.raises(ValueError, match="unknown backend"):
        decay_outer_(W, D, F, 1.0, 1.0, backend="cutlass")


def test_non_contiguous_w(backend, device):
    W = torch.zeros(5, 6, device=device).t()
    D, F = torch.zeros(3, 6, device=device), torch.zeros(3, 5, device=device)
    with pytest.raises(ValueError, match="W must be contiguous"):
        decay_outer_(W, D, F, 1.0, 1.0, backend=backend)


def test_w_aliasing_a_factor(backend, device):
    W = torch.zeros(6, 6, device=device)
    with pytest.raises(ValueError, match="W and D share memory"):
        decay_outer_(W, W[:3], torch.zeros(3, 6, device=device), 1.0, 1.0, backend=backend)


@pytest.mark.parametrize("which", ["D", "F"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_check_finite(backend, device, which, value):
    tensors = dict(zip("WDF", _good(device)))
    tensors[which][1, 2] = value
    W0 = tensors["W"].clone()
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        decay_outer_(tensors["W"], tensors["D"], tensors["F"], 1.0, 1.0, backend=backend,
                     check_finite=True)
    assert torch.equal(tensors["W"], W0)  # nothing written before the error


@pytest.mark.parametrize("value, error, match", [
    ("0.9", TypeError, "real number, got str"),
    (None, TypeError, "real number, got NoneType"),
    (True, TypeError, "real number, got bool"),
    (1 + 2j, TypeError, "real number, got complex"),
    (torch.tensor(0.9), TypeError, r"got a tensor; pass decay\.item\(\)"),
    (float("nan"), ValueError, "not finite"),
    (math.inf, ValueError, "not finite"),
])
def test_bad_decay(device, value, error, match):
    W, D, F = _good(device)
    with pytest.raises(error, match=match):
        decay_outer_(W, D, F, value, 1.0)


def test_bad_alpha(device):
    W, D, F = _good(device)
    with pytest.raises(TypeError, match="alpha must be a Python number, got a tensor"):
        decay_outer_(W, D, F, 1.0, torch.tensor(-0.1))


def test_inference_tensor_outside_inference_mode(device):
    with torch.inference_mode():
        W = torch.zeros(6, 5, device=device)
    _, D, F = _good(device)
    with pytest.raises(RuntimeError, match="inference"):
        decay_outer_(W, D, F, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
GPU_BACKENDS = ["torch", "triton", "cuda"]


def _require(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU machine")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [
    (4096, 4096, 1), (1024, 1024, 128), (1000, 777, 8), (777, 1000, 2000), (129, 4103, 65),
    (3, 5000, 33), (5000, 3, 31), (1, 1, 4096),
], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(backend_name, dtype, shape):
    _require(backend_name)
    device = torch.device("cuda")
    m, n, k = shape
    W, D, F = make_inputs(m, n, k, dtype, device, seed=11)
    W0 = W.clone()
    decay_outer_(W, D, F, 0.999, -0.01, backend=backend_name)
    assert_matches_reference(W, W0, D, F, 0.999, -0.01, backend_name, device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
def test_gpu_aligned_and_unaligned_paths(backend_name, dtype, offset):
    """m, n multiples of 8 with aligned rows take the CUDA kernels' 16-byte path; storage
    offsets of 1 or 3 elements take the element-wise one; both must agree with the reference."""
    _require(backend_name)
    m, n, k = 256, 136, 40
    base = torch.randn(k * (m + n) + m * n + 3 * offset + 8, device="cuda").to(dtype)
    W = base[offset:offset + m * n].view(m, n)
    D = base[m * n + 2 * offset:m * n + 2 * offset + k * m].view(k, m)
    F = base[m * n + k * m + 3 * offset:m * n + k * m + 3 * offset + k * n].view(k, n)
    W0, D0, F0 = W.clone(), D.clone(), F.clone()
    decay_outer_(W, D, F, 0.5, 0.25, backend=backend_name)
    assert_matches_reference(W, W0, D0, F0, 0.5, 0.25, backend_name, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_gpu_decay_zero_ignores_nan(backend_name):
    _require(backend_name)
    W, D, F = make_inputs(300, 260, 20, torch.bfloat16, torch.device("cuda"), seed=12)
    W.fill_(float("nan"))
    W0 = W.clone()
    decay_outer_(W, D, F, 0.0, 1.0, backend=backend_name)
    assert_matches_reference(W, W0, D, F, 0.0, 1.0, backend_name, torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_triton_follows_tf32_flag():
    """With allow_tf32 the Triton fp32 path may use TF32 (about 2^-11 relative per product);
    without it, it must meet the fp32 bound."""
    _require("triton")
    device = torch.device("cuda")
    W, D, F = make_inputs(512, 512, 256, torch.float32, device, seed=13)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        W_tf32 = decay_outer_(W.clone(), D, F, 0.9, 0.1, backend="triton")
        torch.backends.cuda.matmul.allow_tf32 = False
        W_ieee = decay_outer_(W.clone(), D, F, 0.9, 0.1, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_matches_reference(W_ieee, W, D, F, 0.9, 0.1, "triton", device)
    expected, scale = reference(W, D, F, 0.9, 0.1)
    assert ((W_tf32.double().cpu() - expected).abs() <= 2.0**-9 * scale).all()
