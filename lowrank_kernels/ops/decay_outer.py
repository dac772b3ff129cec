"""Fused weight-decay shrink + rank-K outer-product accumulation: ``decay_outer_``.

    W <- decay * W + alpha * D^T F          W (m, n), D (K, m), F (K, n)

is one SGD step of a layer written from its per-example factors: D holds the output gradients
delta_i, F the layer inputs f_i (after unfolding for a convolution), so D^T F = sum_i delta_i f_i^T
is the mini-batch weight gradient, of rank <= K, and with ``decay = 1 - lr*wd``,
``alpha = -lr`` this is SGD with weight decay that never materialises the gradient.
K = B for a Linear layer, K = B*R when the layer is applied R times per example (conv: R output
positions; attention projections: R tokens).

Backends (same rules as every op, see ``lowrank_kernels.backends``):

* ``torch``: ``W.addmm_(D.T, F, beta=decay, alpha=alpha)`` (one BLAS/cuBLAS call).
* ``triton`` / ``cuda``: one pass over W, each tile of W read once and written once, the product
  accumulated on chip in fp32 (tensor cores where the dtype allows). ``"auto"`` on a GPU tries
  them in the order of ``backends.AUTO_ORDER["decay_outer"]``: Triton first for bfloat16 and for
  float32 with TF32 allowed (its dot compiles to Hopper's wgmma), CUDA first for IEEE float32.

Dtypes: float32 and bfloat16 (fp32 accumulation; W, D, F share one dtype). W must be
contiguous (it is updated in place through its data pointer) and must not share memory with D or
F; D and F are made contiguous if they are not. ``decay`` and ``alpha`` are real Python (or
NumPy) numbers, not tensors.

Special values, as ``torch.addmm_`` (BLAS): ``decay == 0`` ignores the old W (NaN/Inf in it do
not propagate) and ``alpha == 0`` ignores D and F. float32 precision also follows it: IEEE fp32
unless ``torch.backends.cuda.matmul.allow_tf32`` is True, which lets the torch and Triton
backends use TF32 tensor cores (the CUDA C++ kernel stays IEEE fp32 whatever the flag).

Autograd: like an optimizer step, the update is not recorded. With grad mode on, a W, D or F
that requires grad is an error (call it under ``torch.no_grad()``, as ``optimizer.step()``
does); W's version counter is bumped on every backend, so autograd still detects a W that a
pending backward saved and this call then overwrote.

Meta tensors go to the torch backend (shapes only; ``check_finite`` has nothing to check there).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from ..backends import kernel_module, resolve_backend
from ..execution import compiling

DTYPES = (torch.float32, torch.bfloat16)


def _check_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"decay_outer_: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"decay_outer_: {name} must be a dense (strided) tensor, got layout "
                         f"{t.layout}")
    if t.dtype not in DTYPES:
        if t.is_complex():
            raise ValueError(f"decay_outer_: {name} is complex ({t.dtype}); only real float32 "
                             "and bfloat16 are supported")
        raise ValueError(f"decay_outer_: {name} has dtype {t.dtype}; supported: float32, bfloat16")
    if t.dim() != 2:
        raise ValueError(f"decay_outer_: {name} must be 2-D, got shape {tuple(t.shape)}")


def _check_scalar(name: str, v) -> None:
    if type(v) is not float and type(v) is not int:  # fast path for the common case
        if isinstance(v, Tensor):
            raise TypeError(f"decay_outer_: {name} must be a Python number, got a tensor; pass "
                            f"{name}.item() (one host sync) or fold it into D")
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"decay_outer_: {name} must be a real number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"decay_outer_: {name} = {v} is not finite")


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses of a non-empty strided tensor's elements."""
    size = t.element_size()
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * size
    extent = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * size


def check_inputs(W: Tensor, D: Tensor, F: Tensor, decay: float, alpha: float, *,
                 check_finite: bool = False) -> None:
    """Raise a clear error for anything ``decay_outer_`` cannot take (see its docstring).

    ``check_finite`` (one host sync, as in ``decay_outer_``) is off by default: the loops that
    check once and then launch (the simulator, the factored step) must not wait on the GPU."""
    _check_tensor("W", W)
    _check_tensor("D", D)
    _check_tensor("F", F)
    m, n = W.shape
    k, d_cols = D.shape
    f_rows, f_cols = F.shape
    if d_cols != m or f_cols != n or f_rows != k:
        raise ValueError(f"decay_outer_: shapes do not match W (m, n) = {tuple(W.shape)}, "
                         f"D (K, m) = {tuple(D.shape)}, F (K, n) = {tuple(F.shape)}")
    if k == 0:
        raise ValueError("decay_outer_: K = 0 (D and F have no rows): there is no update to apply")
    if D.dtype != W.dtype or F.dtype != W.dtype:
        raise ValueError(f"decay_outer_: W, D, F must share one dtype, got {W.dtype}, {D.dtype}, "
                         f"{F.dtype}")
    device = W.device
    if D.device != device or F.device != device:
        raise ValueError(f"decay_outer_: W, D, F must be on one device, got {W.device}, "
                         f"{D.device}, {F.device}")
    if not W.is_contiguous():
        raise ValueError(f"decay_outer_: W must be contiguous (it is updated in place), got "
                         f"strides {W.stride()} for shape {tuple(W.shape)}")
    _check_scalar("decay", decay)
    _check_scalar("alpha", alpha)
    if W.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("decay_outer_: W is an inference tensor (created under "
                           "torch.inference_mode()); it can only be updated in place inside "
                           "inference mode (or clone it first)")
    if (W.requires_grad or D.requires_grad or F.requires_grad) and torch.is_grad_enabled():
        needing = ", ".join(n for n, t in (("W", W), ("D", D), ("F", F)) if t.requires_grad)
        raise RuntimeError(f"decay_outer_: {needing} requires grad and grad mode is on; this "
                           "in-place update is not recorded by autograd (it is an optimizer "
                           "step): call it under torch.no_grad() or pass detached tensors")
    if device.type == "meta":  # no memory and no values: nothing more to check
        return
    if m and n:
        # Conservative: a strided tensor is taken to span everything between its first and
        # last element.
        w0, w1 = _byte_span(W)
        for name, t in (("D", D), ("F", F)):
            if t.numel():
                t0, t1 = _byte_span(t)
                if w0 < t1 and t0 < w1:
                    raise ValueError(f"decay_outer_: W and {name} share memory; W is written "
                                     f"while {name} is read, so {name} must not alias W (pass "
                                     "a copy)")
    if check_finite:
        for name, t in (("D", D), ("F", F)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"decay_outer_: {name} contains NaN or Inf")


def _order_variant(W: Tensor):
    """The key of this call in ``backends.AUTO_ORDER["decay_outer"]``: the dtype, and for float32
    on CUDA whether TF32 matmuls are allowed (Triton's dot then uses tensor cores)."""
    if W.dtype == torch.float32 and W.device.type == "cuda":
        with warnings.catch_warnings():  # newer torch steers towards fp32_precision; same answer
            warnings.simplefilter("ignore")
            if torch.backends.cuda.matmul.allow_tf32:
                return "float32-tf32"
    return W.dtype


def decay_outer_(W: Tensor, D: Tensor, F: Tensor, decay: float, alpha: float, *,
                 backend: str | None = "auto", check_finite: bool = False) -> Tensor:
    """In place ``W <- decay * W + alpha * D^T F``; returns ``W`` (the same tensor object).

    W (m, n) contiguous; D (K, m), F (K, n), K >= 1; one dtype (float32 or bfloat16) and one
    device for all three. ``check_finite=True`` also rejects NaN/Inf in D and F (one device sync).
    ``backend``: "auto" (default; or the LOWRANK_BACKEND environment variable), "torch",
    "triton" or "cuda" (see ``lowrank_kernels.backends``). Call it under ``torch.no_grad()`` when
    any of the tensors requires grad, as an optimizer step would.

    Example (SGD with weight decay from the factors of a Linear layer's weight gradient,
    ``grad_output`` (B, out), ``input`` (B, in))::

        with torch.no_grad():
            decay_outer_(layer.weight, grad_output / B, input, 1 - lr * wd, -lr)
    """
    check_inputs(W, D, F, decay, alpha, check_finite=check_finite)
    return _launch(choose_backend(W, backend), W, D, F, float(decay), float(alpha))


def choose_backend(W: Tensor, backend: str | None = "auto") -> str:
    """The concrete backend ``decay_outer_`` runs for W (its device and dtype) and ``backend``."""
    return resolve_backend(backend, W.device, op="decay_outer", variant=_order_variant(W))


def _launch(name: str, W: Tensor, D: Tensor, F: Tensor, decay: float, alpha: float) -> Tensor:
    """``decay_outer_`` without its input checks, on backend ``name`` (``choose_backend``).

    For loops that run ``check_inputs`` once on inputs whose kind (shapes, dtype, device,
    layout, grad mode) stays the same from call to call: the simulator's steps, the factored
    step's passes over one weight and its momentum buffer. ``decay`` and ``alpha`` are floats."""
    if W.numel() == 0:
        return W
    # Eager calls run the implementation directly, as the SGD step does: the op's dispatch
    # would cost more than a small update in the simulator's and the factored step's loops.
    (_decay_outer_op if compiling() else _decay_outer_impl)(W, D, F, decay, alpha, name)
    return W


# The update as a torch.library op (W declared mutated, a fake implementation for tracing): one
# opaque node for torch.compile whatever the backend, and something torch.library.opcheck can
# test. A custom op cannot return an alias of its input, so ``_launch`` returns W itself.
def _decay_outer_impl(W: Tensor, D: Tensor, F: Tensor, decay: float, alpha: float,
                      backend: str) -> None:
    if backend == "torch":
        W.addmm_(D.t(), F, beta=decay, alpha=alpha)
        return
    kernel_module("decay_outer", backend).launch_decay_outer(W, D.contiguous(), F.contiguous(),
                                                             decay, alpha)
    # The kernel wrote through W's data pointer, which autograd does not see; bump the version
    # as an in-place torch op would.
    torch.autograd.graph.increment_version(W)


_decay_outer_op = torch.library.custom_op("lowrank_kernels::decay_outer_",
                                          mutates_args=("W",))(_decay_outer_impl)


@_decay_outer_op.register_fake
def _decay_outer_fake(W, D, F, decay, alpha, backend) -> None:
    return None  # in place only
